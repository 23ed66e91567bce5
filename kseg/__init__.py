"""kseg: from a Kaggle segmentation competition folder to a validated submission.

Data flows one way, layer by layer (import-linter checks it; see README "Layout"):
``kseg.core`` <- ``kseg.codecs`` <- ``kseg.io`` (readers) <- ``kseg.data`` (preprocessing, weight
maps, augmentation, splits) / ``kseg.nn`` (building blocks) / ``kseg.metrics`` <- ``kseg.tasks``
(one folder per model family, peers) <- ``kseg.engine`` (the fit loop) / ``kseg.submission`` (the
submission loop) <- ``kseg.app`` (CLI, tune, evaluate). Lower layers never import higher ones.
"""

__version__ = "0.1.0"
