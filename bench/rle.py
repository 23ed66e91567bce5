"""Benchmark: kseg.rle encode/decode/labels_to_rles vs plain Python loops, on realistic masks.

Masks: Airbus-like 768 x 768 with a few thin rotated ships (F order), a TGS-like 101 x 101 salt
body (F), a Carvana-like 1280 x 1918 car silhouette (C) and a DSB-like 520 x 696 field of
nuclei (F). Every result is checked against its baseline before timing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import best_of, report  # noqa: E402

from kseg import rle  # noqa: E402


def airbus_labels(rng: np.random.Generator, shape=(768, 768), n_ships=5) -> np.ndarray:
    """A few thin rotated rectangles (ships) on open water."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    for k in range(1, n_ships + 1):
        cy, cx = rng.integers(60, shape[0] - 60, 2)
        angle = rng.uniform(0, np.pi)
        along = (yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)
        across = -(yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
        labels[(np.abs(along) < rng.integers(10, 50)) & (np.abs(across) < rng.integers(3, 9))] = k
    return labels


def tgs_mask(shape=(101, 101)) -> np.ndarray:
    """A salt body below a wavy boundary."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy > 40 + 12 * np.sin(xx / 9.0)).astype(np.uint8)


def carvana_mask(shape=(1280, 1918)) -> np.ndarray:
    """A large car-like blob: an ellipse with a cabin on top."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    body = ((yy - 760) / 260) ** 2 + ((xx - 959) / 820) ** 2 < 1
    cabin = ((yy - 520) / 200) ** 2 + ((xx - 900) / 420) ** 2 < 1
    return (body | cabin).astype(np.uint8)


def dsb_labels(rng: np.random.Generator, shape=(520, 696), n_nuclei=100) -> np.ndarray:
    """Many small nuclei (disks)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    for k in range(1, n_nuclei + 1):
        cy, cx, radius = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(4, 14)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = k
    return labels


def loop_encode(mask: np.ndarray, order: str) -> str:
    """Baseline: walk every pixel in scan order in Python."""
    tokens, run_start = [], None
    for position, value in enumerate(mask.ravel(order=order).tolist() + [0], start=1):
        if value and run_start is None:
            run_start = position
        elif not value and run_start is not None:
            tokens += [run_start, position - run_start]
            run_start = None
    return " ".join(map(str, tokens))


def loop_decode(text: str, shape: tuple[int, int], order: str) -> np.ndarray:
    """Baseline: the common Kaggle decoder, one slice assignment per run."""
    tokens = text.split()
    flat = np.zeros(shape[0] * shape[1], np.uint8)
    for start, length in zip(tokens[0::2], tokens[1::2]):
        start = int(start) - 1
        flat[start : start + int(length)] = 1
    return flat.reshape(shape, order=order)


def bench_mask(name: str, mask: np.ndarray, order: str) -> None:
    text = rle.encode(mask, order)
    assert text == loop_encode(mask, order), f"{name}: encode disagrees with the loop baseline"
    assert np.array_equal(rle.decode(text, mask.shape, order), mask != 0)
    assert np.array_equal(loop_decode(text, mask.shape, order), mask != 0)
    runs = len(text.split()) // 2
    label = f"{name} {mask.shape[0]}x{mask.shape[1]} {order}, {runs} runs"
    report(
        f"encode {label}",
        best_of(lambda: rle.encode(mask, order), 20),
        best_of(lambda: loop_encode(mask, order), 3),
    )
    report(
        f"decode {label}",
        best_of(lambda: rle.decode(text, mask.shape, order), 50),
        best_of(lambda: loop_decode(text, mask.shape, order), 50),
    )


def bench_instances(name: str, labels: np.ndarray) -> None:
    """labels_to_rles (bounding-box crops) vs one full-image comparison per instance."""
    ids = [i for i in np.unique(labels) if i != 0]

    def full_image() -> list[str]:
        return [rle.encode(labels == i) for i in ids]

    assert rle.labels_to_rles(labels) == full_image()
    report(
        f"labels_to_rles {name} {labels.shape[0]}x{labels.shape[1]}, {len(ids)} instances",
        best_of(lambda: rle.labels_to_rles(labels), 10),
        best_of(full_image, 3),
    )
    rles = full_image()
    expected = np.unique(labels, return_inverse=True)[1].reshape(labels.shape)
    assert np.array_equal(rle.rles_to_labels(rles, labels.shape), expected)

    def loop_labels() -> np.ndarray:
        out = np.zeros(labels.shape, np.int32)
        for k, text in enumerate(rles, start=1):
            out[loop_decode(text, labels.shape, "F") != 0] = k
        return out

    assert np.array_equal(loop_labels(), expected)
    report(
        f"rles_to_labels {name}, {len(ids)} instances",
        best_of(lambda: rle.rles_to_labels(rles, labels.shape), 10),
        best_of(loop_labels, 3),
    )


def main() -> None:
    rng = np.random.default_rng(2018)
    airbus = airbus_labels(rng)
    dsb = dsb_labels(rng)
    bench_mask("airbus", (airbus > 0).astype(np.uint8), "F")
    bench_mask("tgs", tgs_mask(), "F")
    bench_mask("carvana", carvana_mask(), "C")
    bench_mask("dsb", (dsb > 0).astype(np.uint8), "F")
    bench_instances("dsb", dsb)
    bench_instances("airbus", airbus)


if __name__ == "__main__":
    main()
