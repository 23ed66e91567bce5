"""The Mask R-CNN instance family: ResNet-FPN, RPN, RoIAlign, heads, the five losses, batches, task."""

from kseg.tasks.maskrcnn import model, task  # noqa: F401 (importing registers the models and the task)
