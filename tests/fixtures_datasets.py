"""Tiny datasets of every reader layout, written into a test's tmp_path.

Each writer returns the ground truth it wrote ({id: (image, target)}) so a test can compare what
a reader loads with what is on disk. Images are small and random; targets are a few rectangles.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def imwrite(path: Path, array: np.ndarray) -> Path:
    """Write an RGB/RGBA/grey uint8 array with OpenCV (which wants BGR order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 3 and array.shape[2] == 3:
        array = array[..., ::-1]
    elif array.ndim == 3 and array.shape[2] == 4:
        array = array[..., [2, 1, 0, 3]]
    if not cv2.imwrite(str(path), np.ascontiguousarray(array)):
        raise OSError(f"cv2.imwrite could not write {path}")
    return path


def write_gif(path: Path, values: np.ndarray) -> Path:
    """A palette GIF whose palette is grey (entry v = grey level v), as Carvana's masks."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = np.ascontiguousarray(values, np.uint8)
    image = Image.frombytes("P", (values.shape[1], values.shape[0]), values.tobytes())
    image.putpalette([v for g in range(256) for v in (g, g, g)])
    image.save(path)
    return path


def random_image(rng: np.random.Generator, shape: tuple[int, int], channels: int = 3) -> np.ndarray:
    size = (*shape, channels) if channels > 1 else shape
    return rng.integers(0, 256, size=size, dtype=np.uint8)


def random_labels(rng: np.random.Generator, shape: tuple[int, int], n: int) -> np.ndarray:
    """``n`` non-overlapping rectangles labelled 1..n (one per column band, so they never touch)."""
    labels = np.zeros(shape, np.int32)
    band = shape[1] // max(n, 1)
    for k in range(n):
        top = int(rng.integers(0, shape[0] // 2))
        height = int(rng.integers(2, shape[0] - top))
        left = k * band + int(rng.integers(0, max(band // 3, 1)))
        width = int(rng.integers(1, max(band - (left - k * band) - 1, 2)))
        labels[top : top + height, left : left + width] = k + 1
    return labels


def write_dsb_dataset(root: Path, n_samples: int = 3, shape=(24, 40), n_instances: int = 3,
                      masks: bool = True, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """``root/<id>/images/<id>.png`` (RGBA, as in DSB 2018) + one 0/255 PNG per instance."""
    rng = np.random.default_rng(seed)
    truth = {}
    for i in range(n_samples):
        sample_id = f"{i:02d}{rng.integers(1 << 30):08x}"
        image = random_image(rng, shape, 3)
        rgba = np.concatenate([image, np.full((*shape, 1), 255, np.uint8)], axis=2)
        imwrite(root / sample_id / "images" / f"{sample_id}.png", rgba)
        labels = None
        if masks:
            labels = random_labels(rng, shape, n_instances)
            (root / sample_id / "masks").mkdir(parents=True)
            for k in range(1, n_instances + 1):
                name = f"{rng.integers(1 << 40):010x}.png"  # random names: order is by sorted name
                imwrite(root / sample_id / "masks" / name, (labels == k).astype(np.uint8) * 255)
        truth[sample_id] = (image, labels)
    return truth


def write_paired_dataset(images_dir: Path, masks_dir: Path, n: int = 3, shape=(20, 28), image_ext=".png",
                         mask_ext=".png", mask_suffix: str = "", classes: int | None = None,
                         grey: bool = False, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Image/mask pairs. Binary masks (0/255 on disk, 0/1 in the truth) unless ``classes=K``."""
    rng = np.random.default_rng(seed)
    truth = {}
    for i in range(n):
        stem = f"img{i}"
        image = random_image(rng, shape, 1 if grey else 3)
        imwrite(Path(images_dir) / f"{stem}{image_ext}", image)
        if classes is None:
            mask = (random_labels(rng, shape, 2) > 0).astype(np.uint8)
            on_disk = mask * 255
        else:
            mask = (random_labels(rng, shape, classes - 1) % classes).astype(np.uint8)
            on_disk = mask
        mask_path = Path(masks_dir) / f"{stem}{mask_suffix}{mask_ext}"
        if mask_ext == ".gif":
            write_gif(mask_path, on_disk)
        else:
            imwrite(mask_path, on_disk)
        truth[stem] = (image, mask)
    return truth


def write_csv_rle_dataset(images_dir: Path, csv_path: Path, n: int = 4, shape=(18, 26), n_instances: int = 3,
                          image_ext=".jpg", with_extension: bool = True, empty_images: int = 1,
                          severstal: bool = False, order: str = "F",
                          seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Images + a CSV of RLE rows.

    Airbus style (default): ``ImageId,EncodedPixels``, one row per instance; the last
    ``empty_images`` images get a single empty row. ``severstal=True``: ``ImageId,ClassId,
    EncodedPixels``, one row per present class (classes 1..4), empty images left out of the CSV.
    The truth is the label image (Airbus) or the class mask (Severstal).
    """
    from kseg.codecs.rle import encode

    rng = np.random.default_rng(seed)
    truth = {}
    lines = ["ImageId,ClassId,EncodedPixels" if severstal else "ImageId,EncodedPixels"]
    for i in range(n):
        stem = f"{i:03d}{rng.integers(1 << 24):06x}"
        image = random_image(rng, shape, 3)
        imwrite(Path(images_dir) / f"{stem}{image_ext}", image)
        image_id = stem + image_ext if with_extension else stem
        empty = i >= n - empty_images
        labels = np.zeros(shape, np.int32) if empty else random_labels(rng, shape, n_instances)
        if severstal:
            classes = np.zeros(shape, np.uint8)
            for k in range(1, n_instances + 1):
                class_id = 1 + (k + i) % 4
                classes[labels == k] = class_id
            for class_id in np.unique(classes[classes > 0]):
                lines.append(f"{image_id},{class_id},{encode(classes == class_id, order)}")
            truth[image_id] = (image, classes)
        else:
            if empty:
                lines.append(f"{image_id},")
            for k in range(1, int(labels.max()) + 1):
                lines.append(f"{image_id},{encode(labels == k, order)}")
            truth[image_id] = (image, labels)
    Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
    Path(csv_path).write_text("\n".join(lines) + "\n")
    return truth


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Two label images describe the same instances, whatever numbers they carry."""
    if a.shape != b.shape or not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def nuclei_12bit(n: int = 21, shape=(96, 128), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(uint16 image of 12-bit values, int label image): ``n`` discs, each a different brightness
    between 180 and 4000 on a background of 40, as a 12-bit fluorescence camera saves them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    centres = [(r, c) for r in range(10, shape[0] - 8, 19) for c in range(10, shape[1] - 8, 19)]
    for index, (r, c) in enumerate(centres[:n], start=1):
        labels[(yy - r) ** 2 + (xx - c) ** 2 <= 36] = index
    assert labels.max() == n
    brightness = np.linspace(180, 4000, n).round().astype(np.uint16)
    rng.shuffle(brightness)
    image = np.full(shape, 40, np.uint16)
    image[labels > 0] = brightness[labels[labels > 0] - 1]
    return image, labels


def paired_12bit(root: Path, n: int = 3) -> tuple[Path, Path]:
    """A paired images/masks dataset of ``nuclei_12bit`` images (seeds 0..n-1), ids s0, s1, ..."""
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for index in range(n):
        image, labels = nuclei_12bit(seed=index)
        imwrite(images / f"s{index}.png", image)
        imwrite(masks / f"s{index}.png", ((labels > 0) * 255).astype(np.uint8))
    return images, masks
