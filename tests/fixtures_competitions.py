"""Tiny competitions in the file formats Kaggle (and the ISBI challenge) ship, written into a test's
tmp_path: the same folder layout, file names, image type, bit depth, colour mode and run-length
order as the real downloads, with a handful of small synthetic images.

    write_tgs_salt        train/images/<id>.png (101x101 8-bit RGB, 3 equal channels), train/masks/<id>.png
                          (16-bit 0/65535), train.csv (id,rle_mask, F), test/images/, sample_submission.csv
    write_carvana         train/<car>_<NN>.jpg (1918x1280 RGB JPEG), train_masks/<car>_<NN>_mask.gif (palette
                          0/1), train_masks.csv (img,rle_mask, C), test/, sample_submission.csv
    write_isbi2012        images/N.png + masks/N.png (512x512 8-bit grey; 255 = cell, 0 = membrane)
    write_dsb2018         stage1_train/<id>/images/<id>.png (RGBA) + masks/*.png (one 0/255 PNG per nucleus),
                          stage1_test/<id>/images/<id>.png, stage1_sample_submission.csv
    write_severstal       train_images/<id>.jpg (1600x256 JPEG), train.csv (ImageId,ClassId,EncodedPixels, F,
                          defect rows only, classes 1..4), test_images/
    write_airbus          train_v2/<id>.jpg (768x768 JPEG), train_ship_segmentations_v2.csv (ImageId,EncodedPixels,
                          one row per ship, one empty row for an image without ships), test_v2/,
                          sample_submission_v2.csv
    write_siim_acr        train-rle.csv (ImageId, EncodedPixels: relative RLE, "-1" when empty; several rows for an
                          image with several regions), images as 8-bit grey PNGs named by the DICOM UID (the
                          usual conversion of the .dcm files), and the same masks as 0/255 PNGs

Every writer returns a :class:`Competition`: the root, the ids it wrote per split and the ground
truth of the training images (label images or class masks), so a test can check what a reader loads.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
from fixtures_datasets import imwrite

from kseg.codecs import rle
from kseg.codecs.relative import to_relative


@dataclasses.dataclass
class Competition:
    root: Path
    train_ids: list[str]
    test_ids: list[str]
    truth: dict[str, np.ndarray]  # training id -> label image (instances) or class mask


def hex_id(rng: np.random.Generator, digits: int) -> str:
    return "".join(rng.choice(list("0123456789abcdef"), size=digits))


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: int = 8) -> np.ndarray:
    """Low-frequency float texture in 0..1 (a coarse random grid, upsampled)."""
    coarse = rng.uniform(size=(max(shape[0] // scale, 2), max(shape[1] // scale, 2))).astype(np.float32)
    return cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC).clip(0, 1)


def to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.round(values * 255), 0, 255).astype(np.uint8)


def grey_rgb(grey: np.ndarray) -> np.ndarray:
    """An H x W x 3 image of three equal channels (how TGS, Severstal and DSB store grey images)."""
    return np.repeat(grey[..., None], 3, axis=2)


def write_palette_gif(path: Path, indices: np.ndarray, palette: list[int]) -> Path:
    """A palette ('P' mode) GIF of ``indices`` with an explicit palette (flat RGB triples)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.ascontiguousarray(indices, np.uint8), mode="P")
    image.putpalette(palette + [0] * (768 - len(palette)))
    image.save(path, optimize=False)
    return path


def write_csv(path: Path, header: str, rows: list[tuple]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [header] + [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- TGS Salt --------------------------------------------------------------------------------------
TGS_SIZE = 101


def tgs_salt_mask(rng: np.random.Generator, kind: str) -> np.ndarray:
    """0/1 salt mask of one tile: none, all, or the region below a smooth random boundary."""
    if kind == "empty":
        return np.zeros((TGS_SIZE, TGS_SIZE), np.uint8)
    if kind == "full":
        return np.ones((TGS_SIZE, TGS_SIZE), np.uint8)
    x = np.arange(TGS_SIZE)
    boundary = rng.uniform(25, 75) + rng.uniform(5, 15) * np.sin(x / rng.uniform(8, 20) + rng.uniform(0, 6))
    return (np.arange(TGS_SIZE)[:, None] > boundary[None, :]).astype(np.uint8)


def write_tgs_salt(root: Path, n_train: int = 6, n_test: int = 2, kinds=("empty", "partial"),
                   seed: int = 0) -> Competition:
    """TGS Salt Identification as shipped (see the module docstring). Masks cycle through
    ``kinds``: "empty" (no salt), "partial" (salt below a wavy boundary), "full" (all salt)."""
    rng = np.random.default_rng(seed)
    truth, train_ids, test_ids, rows = {}, [], [], []
    for i in range(n_train + n_test):
        tile_id = hex_id(rng, 10)
        mask = tgs_salt_mask(rng, kinds[i % len(kinds)])
        grey = to_uint8(0.25 + 0.5 * smooth_noise(rng, (TGS_SIZE, TGS_SIZE), 6) + 0.15 * mask)
        if i < n_train:
            imwrite(root / "train" / "images" / f"{tile_id}.png", grey_rgb(grey))
            imwrite(root / "train" / "masks" / f"{tile_id}.png", mask.astype(np.uint16) * 65535)
            rows.append((tile_id, rle.encode(mask, "F")))
            truth[tile_id] = mask
            train_ids.append(tile_id)
        else:
            imwrite(root / "test" / "images" / f"{tile_id}.png", grey_rgb(grey))
            test_ids.append(tile_id)
    write_csv(root / "train.csv", "id,rle_mask", rows)
    write_csv(root / "sample_submission.csv", "id,rle_mask", [(i, "1 1") for i in test_ids])
    return Competition(root, train_ids, test_ids, truth)


# -- Carvana ---------------------------------------------------------------------------------------
CARVANA_SHAPE = (1280, 1918)  # height, width
CARVANA_GIF_PALETTE = [0, 0, 0, 255, 255, 255]  # index 0 black, 1 white: the masks hold indices 0/1


def carvana_mask(rng: np.random.Generator, angle: int) -> np.ndarray:
    """0/1 mask of a car-like blob (body ellipse + cabin ellipse), a little different per angle."""
    height, width = CARVANA_SHAPE
    mask = np.zeros(CARVANA_SHAPE, np.uint8)
    cx, cy = width // 2 + int(rng.integers(-80, 80)), height // 2 + 120
    body = (int(600 + 20 * np.cos(angle)), int(230 + rng.integers(-20, 20)))
    cv2.ellipse(mask, (cx, cy), body, 0, 0, 360, 1, thickness=-1)
    cv2.ellipse(mask, (cx - 60, cy - 200), (330, 170), 0, 180, 360, 1, thickness=-1)
    return mask


def write_carvana(root: Path, n_cars: int = 1, angles=(1, 2, 3), n_test: int = 1, seed: int = 0) -> Competition:
    """Carvana Image Masking as shipped: ``<car id>_<angle 01..16>.jpg`` photographs and
    ``<car id>_<angle>_mask.gif`` palette masks (indices 0/1 under a black/white palette)."""
    rng = np.random.default_rng(seed)
    height, width = CARVANA_SHAPE
    studio = np.linspace(0.95, 0.75, height, dtype=np.float32)[:, None].repeat(width, 1)
    truth, train_ids, test_ids, rows = {}, [], [], []
    cars = [hex_id(rng, 12) for _ in range(n_cars + n_test)]
    for n, car in enumerate(cars):
        for angle in angles if n < n_cars else angles[:1]:
            stem = f"{car}_{angle:02d}"
            mask = carvana_mask(rng, angle)
            colour = rng.uniform(0.1, 0.6, size=3).astype(np.float32)
            image = np.where(mask[..., None] > 0, colour * (0.8 + 0.4 * smooth_noise(rng, CARVANA_SHAPE, 64)[..., None]),
                             studio[..., None])
            image = to_uint8(image)
            if n < n_cars:
                imwrite(root / "train" / f"{stem}.jpg", image)
                write_palette_gif(root / "train_masks" / f"{stem}_mask.gif", mask, CARVANA_GIF_PALETTE)
                rows.append((f"{stem}.jpg", rle.encode(mask, "C")))
                truth[stem] = mask
                train_ids.append(stem)
            else:
                imwrite(root / "test" / f"{stem}.jpg", image)
                test_ids.append(f"{stem}.jpg")
    write_csv(root / "train_masks.csv", "img,rle_mask", rows)
    write_csv(root / "sample_submission.csv", "img,rle_mask", [(i, "1 1") for i in test_ids])
    return Competition(root, train_ids, test_ids, truth)


# -- ISBI 2012 -------------------------------------------------------------------------------------
ISBI_SIZE = 512


def isbi_cells(rng: np.random.Generator, n_cells: int = 60) -> np.ndarray:
    """0/255 mask of a membrane network: Voronoi cells (255) separated by 3-5 px membranes (0)."""
    from scipy import ndimage

    seeds = np.zeros((ISBI_SIZE, ISBI_SIZE), np.int32)
    points = rng.integers(0, ISBI_SIZE, size=(n_cells, 2))
    seeds[points[:, 0], points[:, 1]] = np.arange(1, n_cells + 1)
    _, (rows, cols) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    cells = seeds[rows, cols]
    edges = np.zeros(cells.shape, bool)
    edges[:-1] |= cells[:-1] != cells[1:]
    edges[:, :-1] |= cells[:, :-1] != cells[:, 1:]
    membrane = cv2.dilate(edges.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=int(rng.integers(1, 3)))
    return np.where(membrane > 0, 0, 255).astype(np.uint8)


def write_isbi2012(root: Path, n: int = 4, seed: int = 0) -> Competition:
    """The ISBI 2012 membrane pairs as redistributed for U-Net: ``images/N.png`` (512x512 8-bit
    grey) and ``masks/N.png`` (255 = cell interior, 0 = membrane), N = 0..n-1."""
    rng = np.random.default_rng(seed)
    truth = {}
    for i in range(n):
        mask = isbi_cells(rng)
        image = to_uint8(0.35 + 0.35 * (mask > 0) + 0.2 * smooth_noise(rng, mask.shape, 16)
                         + rng.normal(0, 0.04, mask.shape))
        imwrite(root / "images" / f"{i}.png", image)
        imwrite(root / "masks" / f"{i}.png", mask)
        truth[str(i)] = (mask > 0).astype(np.uint8)
    return Competition(root, list(truth), [], truth)


# -- Data Science Bowl 2018 ------------------------------------------------------------------------
def dsb_nuclei(rng: np.random.Generator, shape: tuple[int, int], n: int) -> np.ndarray:
    """int32 label image of ``n`` separate elliptical nuclei (1..n)."""
    labels = np.zeros(shape, np.int32)
    placed = 0
    for _ in range(200):
        if placed == n:
            break
        axes = (int(rng.integers(5, 10)), int(rng.integers(5, 10)))
        centre = (int(rng.integers(12, shape[1] - 12)), int(rng.integers(12, shape[0] - 12)))
        blob = np.zeros(shape, np.uint8)
        cv2.ellipse(blob, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, thickness=-1)
        if (cv2.dilate(blob, np.ones((5, 5), np.uint8)) & (labels > 0)).any():
            continue
        placed += 1
        labels[blob > 0] = placed
    return labels


def write_dsb2018(root: Path, n_train: int = 4, n_test: int = 2, shape=(72, 96), n_nuclei: int = 4,
                  seed: int = 0) -> Competition:
    """The 2018 Data Science Bowl stage-1 layout: ``<sha256 id>/images/<id>.png`` (RGBA, alpha
    255, a grey fluorescence image in three equal channels) and one 0/255 grey PNG per nucleus."""
    rng = np.random.default_rng(seed)
    truth, train_ids, test_ids = {}, [], []
    for i in range(n_train + n_test):
        image_id = hex_id(rng, 64)
        labels = dsb_nuclei(rng, shape, n_nuclei)
        grey = to_uint8(0.05 + 0.1 * smooth_noise(rng, shape, 8) + 0.6 * (labels > 0)
                        + rng.normal(0, 0.03, shape))
        rgba = np.concatenate([grey_rgb(grey), np.full((*shape, 1), 255, np.uint8)], axis=2)
        folder = root / ("stage1_train" if i < n_train else "stage1_test") / image_id
        imwrite(folder / "images" / f"{image_id}.png", rgba)
        if i < n_train:
            for k in range(1, int(labels.max()) + 1):
                imwrite(folder / "masks" / f"{hex_id(rng, 64)}.png", (labels == k).astype(np.uint8) * 255)
            truth[image_id] = labels
            train_ids.append(image_id)
        else:
            test_ids.append(image_id)
    write_csv(root / "stage1_sample_submission.csv", "ImageId,EncodedPixels", [(i, "1 1") for i in test_ids])
    return Competition(root, train_ids, test_ids, truth)


# -- Severstal -------------------------------------------------------------------------------------
SEVERSTAL_SHAPE = (256, 1600)


def write_severstal(root: Path, n_train: int = 4, n_test: int = 1, seed: int = 0,
                    shape: tuple[int, int] = SEVERSTAL_SHAPE) -> Competition:
    """Severstal Steel Defect Detection: grey steel strips stored as 3-channel JPEGs named
    ``<9 hex>.jpg``, ``train.csv`` with ``ImageId,ClassId,EncodedPixels`` rows (order F) for the
    defects present only (classes 1..4; the last training image has no defect and no row)."""
    rng = np.random.default_rng(seed)
    truth, train_ids, test_ids, rows = {}, [], [], []
    for i in range(n_train + n_test):
        name = f"{hex_id(rng, 9)}.jpg"
        classes = np.zeros(shape, np.uint8)
        if i < n_train - 1:
            for class_id in sorted({1 + (i + k) % 4 for k in range(2)}):
                band = shape[1] // 4
                left = (class_id - 1) * band + int(rng.integers(0, band // 3))
                top = int(rng.integers(0, shape[0] // 2))
                classes[top:top + int(rng.integers(20, shape[0] // 2)), left:left + int(rng.integers(20, band // 2))] = class_id
        grey = to_uint8(0.45 + 0.2 * smooth_noise(rng, shape, 32) - 0.08 * classes + rng.normal(0, 0.02, shape))
        if i < n_train:
            imwrite(root / "train_images" / name, grey_rgb(grey))
            for class_id in np.unique(classes[classes > 0]):
                rows.append((name, int(class_id), rle.encode(classes == class_id, "F")))
            truth[name] = classes
            train_ids.append(name)
        else:
            imwrite(root / "test_images" / name, grey_rgb(grey))
            test_ids.append(name)
    write_csv(root / "train.csv", "ImageId,ClassId,EncodedPixels", rows)
    return Competition(root, train_ids, test_ids, truth)


# -- Airbus ----------------------------------------------------------------------------------------
AIRBUS_SIZE = 768


def airbus_ships(rng: np.random.Generator, n: int) -> np.ndarray:
    """int32 label image of ``n`` separate rotated rectangles (ships) on a 768x768 scene."""
    labels = np.zeros((AIRBUS_SIZE, AIRBUS_SIZE), np.int32)
    placed = 0
    for _ in range(200):
        if placed == n:
            break
        centre = (float(rng.uniform(60, AIRBUS_SIZE - 60)), float(rng.uniform(60, AIRBUS_SIZE - 60)))
        box = cv2.boxPoints((centre, (float(rng.uniform(30, 90)), float(rng.uniform(8, 20))), float(rng.uniform(0, 180))))
        ship = np.zeros(labels.shape, np.uint8)
        cv2.fillPoly(ship, [np.round(box).astype(np.int32)], 1)
        if (cv2.dilate(ship, np.ones((5, 5), np.uint8)) & (labels > 0)).any():
            continue
        placed += 1
        labels[ship > 0] = placed
    return labels


def write_airbus(root: Path, n_train: int = 3, n_test: int = 2, seed: int = 0) -> Competition:
    """Airbus Ship Detection (v2 files): 768x768 JPEGs ``<9 hex>.jpg``; one CSV row per ship
    (order F), an image without ships has a single row with an empty EncodedPixels."""
    rng = np.random.default_rng(seed)
    truth, train_ids, test_ids, rows = {}, [], [], []
    shape = (AIRBUS_SIZE, AIRBUS_SIZE)
    for i in range(n_train + n_test):
        name = f"{hex_id(rng, 9)}.jpg"
        labels = airbus_ships(rng, 0 if i == n_train - 1 else int(rng.integers(2, 4)))
        sea = np.stack([0.05 + 0.05 * smooth_noise(rng, shape, 48), 0.2 + 0.1 * smooth_noise(rng, shape, 48),
                        0.3 + 0.1 * smooth_noise(rng, shape, 48)], axis=2)
        image = to_uint8(np.where(labels[..., None] > 0, 0.85, sea))
        if i < n_train:
            imwrite(root / "train_v2" / name, image)
            cells = rle.labels_to_rles(labels, "F")
            rows.extend((name, c) for c in cells or [""])
            truth[name] = labels
            train_ids.append(name)
        else:
            imwrite(root / "test_v2" / name, image)
            test_ids.append(name)
    write_csv(root / "train_ship_segmentations_v2.csv", "ImageId,EncodedPixels", rows)
    write_csv(root / "sample_submission_v2.csv", "ImageId,EncodedPixels", [(i, "1 2") for i in test_ids])
    return Competition(root, train_ids, test_ids, truth)


# -- SIIM-ACR --------------------------------------------------------------------------------------
def siim_uid(rng: np.random.Generator) -> str:
    """A DICOM SOPInstanceUID of the shape the competition's ImageIds have."""
    return (f"1.2.276.0.7230010.3.1.4.8323329.{int(rng.integers(1000, 32000))}."
            f"{int(rng.integers(1517874000, 1517876000))}.{int(rng.integers(100000, 999999))}")


def write_siim_acr(root: Path, n_train: int = 4, n_test: int = 2, size: int = 128, seed: int = 0) -> Competition:
    """SIIM-ACR Pneumothorax: ``train-rle.csv`` as shipped (header ``ImageId, EncodedPixels``,
    relative RLE in column-major order, ``-1`` for no pneumothorax, one row per region) beside the
    DICOMs converted to 8-bit grey PNGs ``<UID>.png`` in ``train/`` and ``test/`` (kseg reads no
    DICOM), and the masks as 0/255 PNGs in ``masks/`` (the converted datasets' layout).

    The first training image has two regions (two rows), the last none (one ``-1`` row).
    """
    rng = np.random.default_rng(seed)
    shape = (size, size)
    truth, train_ids, test_ids, rows = {}, [], [], []
    for i in range(n_train + n_test):
        uid = siim_uid(rng)
        regions = np.zeros(shape, np.int32)
        n_regions = 2 if i == 0 else (0 if i == n_train - 1 else 1)
        for k in range(1, n_regions + 1):
            left = size // 8 + (k - 1) * size // 2
            regions[size // 8:size // 2 + int(rng.integers(0, size // 4)), left:left + size // 6] = k
        chest = to_uint8(0.2 + 0.5 * smooth_noise(rng, shape, 16) - 0.15 * (regions > 0))
        if i < n_train:
            imwrite(root / "train" / f"{uid}.png", chest)
            imwrite(root / "masks" / f"{uid}.png", (regions > 0).astype(np.uint8) * 255)
            cells = [to_relative(c) for c in rle.labels_to_rles(regions, "F")]
            rows.extend((uid, " " + c) for c in cells or ["-1"])
            truth[uid] = (regions > 0).astype(np.uint8)
            train_ids.append(uid)
        else:
            imwrite(root / "test" / f"{uid}.png", chest)
            test_ids.append(uid)
    write_csv(root / "train-rle.csv", "ImageId, EncodedPixels", rows)
    return Competition(root, train_ids, test_ids, truth)
