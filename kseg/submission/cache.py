"""Per-image predictions of ``make submit`` kept beside the output, so an interrupted submission
resumes where it stopped instead of predicting a few thousand images again.

An entry holds one test image's CSV rows, its size and (for the first images) its contact-sheet
panel. Its key covers what decides the rows: each run's checkpoint (path, size, time), the run
config's prediction, post-processing and format settings as resolved, and the image file's
content and id. The folder sits beside the CSV (the run folder may be read-only, as in a notebook);
entries are written atomically and removed once the submission validates.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from kseg.core.fileio import atomic_write_bytes, atomic_write_text


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class PredictionCache:
    def __init__(self, folder: Path, checkpoints: Sequence[Path], settings: dict):
        self.folder = Path(folder)
        stats = [(str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns) for p in checkpoints]
        self.prefix = hashlib.sha256(json.dumps([stats, settings], sort_keys=True, default=str).encode()).hexdigest()
        self.used: list[Path] = []

    def _key(self, image_id: str, image_path: Path) -> str:
        """Rows name their image, so the id is part of the key beside the content."""
        return hashlib.sha256(f"{self.prefix}:{image_id}:{_file_digest(image_path)}".encode()).hexdigest()[:40]

    def get(self, image_id: str, image_path: Path) -> dict | None:
        """The cached entry of an image (``rows``, ``size``, ``num_classes``, ``panel`` or None)."""
        key = self._key(image_id, image_path)
        entry_path = self.folder / f"{key}.json"
        if not entry_path.is_file():
            return None
        try:
            entry = json.loads(entry_path.read_text())
        except ValueError:  # an entry is written atomically, so this is foreign: predict again
            return None
        panel_path = self.folder / f"{key}.png"
        panel = cv2.imread(str(panel_path))[..., ::-1] if panel_path.is_file() else None
        self.used += [entry_path, panel_path]
        return {"rows": [tuple(r) for r in entry["rows"]], "size": tuple(entry["size"]),
                "num_classes": entry.get("num_classes"), "panel": panel}

    def put(self, image_id: str, image_path: Path, rows: list[tuple], size: tuple[int, int],
            num_classes: int | None, panel: np.ndarray | None) -> None:
        key = self._key(image_id, image_path)
        if panel is not None:
            ok, data = cv2.imencode(".png", np.ascontiguousarray(panel[..., ::-1]))
            if ok:
                atomic_write_bytes(self.folder / f"{key}.png", data.tobytes())
                self.used.append(self.folder / f"{key}.png")
        entry = {"rows": [list(r) for r in rows], "size": list(size), "num_classes": num_classes,
                 "image": str(image_path)}
        atomic_write_text(self.folder / f"{key}.json", json.dumps(entry))
        self.used.append(self.folder / f"{key}.json")

    def clear_used(self) -> None:
        """Remove the entries this submission read or wrote (it validated), and the folder if empty."""
        for path in self.used:
            path.unlink(missing_ok=True)
        if self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()
