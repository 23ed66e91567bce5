"""The one value every reader returns, and the image-file helpers readers share."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np

from kseg.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".bmp")


@dataclasses.dataclass
class Sample:
    """One training or test item.

    ``image`` is uint8 H x W x C as read (C = 1 or 3; alpha dropped). ``labels`` is an int32
    H x W instance label image (0 = background, 1..K instances) for instance datasets, or ``mask`` a
    uint8 H x W class-index mask for semantic ones; test samples have neither.
    """

    id: str
    image: np.ndarray
    labels: np.ndarray | None = None
    mask: np.ndarray | None = None
    path: str | None = None

    @property
    def target(self) -> np.ndarray | None:
        """The label image if there is one, else the class mask."""
        return self.labels if self.labels is not None else self.mask


def _read_any(path: Path, flags: int) -> np.ndarray:
    """cv2.imread for every suffix we accept (cv2 cannot read GIF; PIL via skimage can)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file does not exist", path)
    array = None
    if path.suffix.lower() != ".gif":
        array = cv2.imread(str(path), flags)
    if array is None:
        try:
            import skimage.io

            array = np.asarray(skimage.io.imread(str(path)))
            if array.ndim == 4:  # animated GIF: first frame
                array = array[0]
        except Exception as exc:  # noqa: BLE001 - any decoder failure means a corrupt file
            raise DataError(f"cannot decode image ({exc.__class__.__name__}: {exc})", path) from exc
        if array.ndim == 3 and array.shape[2] in (3, 4) and flags != cv2.IMREAD_GRAYSCALE:
            array = array[..., 2::-1] if array.shape[2] == 3 else array[..., [2, 1, 0, 3]]
    if array is None or array.size == 0:
        raise DataError("cannot decode image (corrupt or unsupported file)", path)
    return array


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as uint8 H x W x C in RGB order (C = 1 for grayscale, alpha dropped)."""
    array = _read_any(Path(path), cv2.IMREAD_UNCHANGED)
    if array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    elif array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 2:
        return array[..., None]
    if array.shape[2] == 4:
        array = array[..., :3]
    if array.shape[2] == 3:
        array = array[..., ::-1]  # OpenCV reads BGR
    return np.ascontiguousarray(array)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask as a uint8 H x W array (first channel if the file has several)."""
    array = _read_any(Path(path), cv2.IMREAD_UNCHANGED)
    if array.ndim == 3:
        array = array[..., 0]
    if array.dtype != np.uint8:
        if array.max() > 255:
            raise DataError(f"mask values up to {array.max()} do not fit uint8 classes", path)
        array = array.astype(np.uint8)
    return np.ascontiguousarray(array)


def check_same_size(image: np.ndarray, mask: np.ndarray, path: str | Path) -> None:
    """Raise a DataError naming ``path`` when a mask and its image differ in height or width."""
    if image.shape[:2] != mask.shape[:2]:
        raise DataError(
            f"mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
            f"{image.shape[1]}x{image.shape[0]} (width x height)",
            path,
        )
