"""Pseudo-labelled images: a folder that ``kseg pseudo`` writes, read like any training set.

The folder holds ``pseudo.json`` (the rules, and per image its file, its confident share and
whether it was kept) and one ``<digest>.npz`` per kept image with ``target`` (the post-processed
prediction: an instance label image or a class mask, ``kind`` says which) and ``confident``
(uint8 0/1, the pixels whose prediction was confident). The image itself is read from where it
lies, under the run's intensity policy and modality. A sample's ``loss_mask`` is its confident
pixels, so the weight map, and with it the in-graph loss, is 0 where the prediction was unsure.

:class:`WithPseudoLabels` puts such a folder beside the real training set (``dataset.pseudo``):
pseudo-labelled ids carry the ``pseudo/`` prefix, and ``kseg.data.split`` never validates on them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kseg.core.errors import DataError
from kseg.io.sample import Sample, read_image

PSEUDO_PREFIX = "pseudo/"
MANIFEST = "pseudo.json"


def is_pseudo(sample_id: str) -> bool:
    return str(sample_id).startswith(PSEUDO_PREFIX)


class PseudoLabels:
    """Reader of a pseudo-label folder (its kept images)."""

    def __init__(self, folder: str | Path, intensity: str = "auto", modality: str = "keep"):
        self.folder = Path(folder)
        self.intensity = intensity
        self.modality = modality
        manifest = self.folder / MANIFEST
        if not manifest.is_file():
            raise DataError(f"not a pseudo-label folder (no {MANIFEST}); make one with `make pseudo`", self.folder)
        record = json.loads(manifest.read_text())
        self.kind = record["kind"]  # instance | semantic, as the training set's reader says
        self._images = {i: e for i, e in record["images"].items() if e["kept"]}

    def ids(self) -> list[str]:
        return list(self._images)

    def source_files(self, sample_id: str) -> list[Path]:
        entry = self._images[sample_id]
        return [Path(entry["path"]), self.folder / entry["file"]]

    def load(self, sample_id: str) -> Sample:
        entry = self._images[sample_id]
        image = read_image(entry["path"], self.intensity, {}, self.modality)
        with np.load(self.folder / entry["file"]) as data:
            target, confident, kind = data["target"], data["confident"], str(data["kind"])
        if target.shape[:2] != image.shape[:2]:
            raise DataError(f"pseudo-label of {sample_id!r} is {target.shape[:2]}, its image {image.shape[:2]}",
                            self.folder / entry["file"])
        labels, mask = (target, None) if kind == "labels" else (None, target)
        return Sample(sample_id, image, labels=labels, mask=mask, path=entry["path"], loss_mask=confident)


class WithPseudoLabels:
    """The real training set and a pseudo-label folder as one reader (ids of the second prefixed)."""

    def __init__(self, real, pseudo: PseudoLabels):
        self._real, self._pseudo = real, pseudo
        # What the preprocessing cache key reads (plain values: the readers' reprs are not stable).
        self.real = f"{type(real).__qualname__}{sorted((k, str(v)) for k, v in vars(real).items() if not k.startswith('_'))}"
        self.pseudo_folder = str(pseudo.folder)
        self.kind = real.kind
        self.intensity = getattr(real, "intensity", "auto")
        self.modality = getattr(real, "modality", "keep")

    def ids(self) -> list[str]:
        return [*self._real.ids(), *(PSEUDO_PREFIX + i for i in self._pseudo.ids())]

    def source_files(self, sample_id: str) -> list[Path]:
        if is_pseudo(sample_id):
            return self._pseudo.source_files(sample_id[len(PSEUDO_PREFIX):])
        return self._real.source_files(sample_id)

    def load(self, sample_id: str) -> Sample:
        if not is_pseudo(sample_id):
            return self._real.load(sample_id)
        sample = self._pseudo.load(sample_id[len(PSEUDO_PREFIX):])
        sample.id = sample_id
        return sample
