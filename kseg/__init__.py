"""kseg: from a Kaggle segmentation competition folder to a validated submission.

Data flows one way: ``kseg.io`` (readers) -> ``kseg.data`` (preprocessing, weight maps,
augmentation, generators) -> ``kseg.models`` + ``kseg.losses`` / ``kseg.metrics`` -> training ->
prediction / post-processing -> submission. Lower layers never import higher ones.
"""

__version__ = "0.1.0"
