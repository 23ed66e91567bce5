"""The SSD box detector family: model, multibox loss and targets, batches, task."""

from kseg.tasks.ssd import model, task  # noqa: F401 (importing registers the models and the task)
