"""The semantic family: U-Net and FCN builders, pixel targets and losses, the weight-map training
graph, the predictor (TTA, tiles, ensembles) and post-processing."""

from kseg.tasks.semantic import fcn, task, unet  # noqa: F401 (importing registers the models and the task)
