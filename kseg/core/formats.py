"""The competitions kseg writes for: one :class:`SubmissionFormat` per competition says what one
CSV row is, how masks are run-length encoded (or boxes written) and which metric scores it.

It sits in ``core`` because the tasks read it too: a run monitors the metric its competition is
scored with, on the target its format writes (instance labels, a mask, class indices, boxes).

    dsb_instances     ImageId,EncodedPixels           one row per instance, order F; an image with
    airbus_instances  ImageId,EncodedPixels           no object gets one row with an empty cell
    sartorius         id,predicted                    one row per instance, order C (row-major)
    tgs_salt          id,rle_mask                     one row per image, order F
    carvana           img,rle_mask                    one row per image, order C
    severstal         ImageId,ClassId,EncodedPixels   one row per image and class, order F
    siim_acr          ImageId,EncodedPixels           one row per image, relative RLE, "-1" if empty
    wheat_boxes       image_id,PredictionString       one row per image (rows kind image_boxes):
                                                      groups "score x y w h", empty if no box

Box formats (``SubmissionFormat.boxes``) hold no RLE: boxes in kseg are float (K, 4) pixel
corners ``(x_min, y_min, x_max, y_max)`` with no +1 (:mod:`kseg.core.boxes`).
"""

from __future__ import annotations

import dataclasses

from kseg.core.errors import ConfigError

ROW_KINDS = ("instance", "image", "image_class", "image_boxes")


@dataclasses.dataclass(frozen=True)
class SubmissionFormat:
    """How one competition wants predictions written (see the module docstring)."""

    name: str
    columns: tuple[str, ...]
    rows: str  # instance | image | image_class | image_boxes (detection: one PredictionString per image)
    order: str  # "F" column-major | "C" row-major ("" for box formats: no RLE)
    id_style: str = "stem"  # test ids without a sample submission: file stem or file name
    empty: str = ""  # the cell of an image (or class) without any object
    relative: bool = False  # starts count from the end of the previous run (SIIM-ACR)
    metric: str = "iou_map"  # iou_map | f2 | tgs_iou_map | dice | voc_map (box formats)
    competition: str = ""

    @property
    def id_column(self) -> str:
        return self.columns[0]

    @property
    def rle_column(self) -> str:
        """The last column: the RLE cell, or a box format's PredictionString."""
        return self.columns[-1]

    @property
    def boxes(self) -> bool:
        """A detection format: cells are box groups, not run-length masks."""
        return self.rows == "image_boxes"


FORMATS: dict[str, SubmissionFormat] = {f.name: f for f in (
    SubmissionFormat("dsb_instances", ("ImageId", "EncodedPixels"), "instance", "F", "stem",
                     metric="iou_map", competition="Data Science Bowl 2018"),
    SubmissionFormat("airbus_instances", ("ImageId", "EncodedPixels"), "instance", "F", "name",
                     metric="f2", competition="Airbus Ship Detection"),
    SubmissionFormat("sartorius", ("id", "predicted"), "instance", "C", "stem",
                     metric="iou_map", competition="Sartorius Cell Instance Segmentation"),
    SubmissionFormat("tgs_salt", ("id", "rle_mask"), "image", "F", "stem",
                     metric="tgs_iou_map", competition="TGS Salt Identification"),
    SubmissionFormat("carvana", ("img", "rle_mask"), "image", "C", "name",
                     metric="dice", competition="Carvana Image Masking"),
    SubmissionFormat("severstal", ("ImageId", "ClassId", "EncodedPixels"), "image_class", "F", "name",
                     metric="dice", competition="Severstal Steel Defect Detection"),
    SubmissionFormat("siim_acr", ("ImageId", "EncodedPixels"), "image", "F", "stem", empty="-1",
                     relative=True, metric="dice", competition="SIIM-ACR Pneumothorax Segmentation"),
    SubmissionFormat("wheat_boxes", ("image_id", "PredictionString"), "image_boxes", "", "stem",
                     metric="voc_map", competition="Global Wheat Detection"),
)}


def get_format(name: str) -> SubmissionFormat:
    if name not in FORMATS:
        raise ConfigError(f"submission.format {name!r} is not one of {', '.join(FORMATS)}")
    return FORMATS[name]
