"""The semantic family: U-Net, U-Net++, FPN, DeepLabV3+, LinkNet and FCN builders, pixel targets
and losses, the weight-map training graph, the predictor (TTA, tiles, ensembles) and
post-processing."""

from kseg.tasks.semantic import (  # noqa: F401 (importing registers the models and the task)
    deeplab,
    fcn,
    fpn_decoder,
    linknet,
    task,
    unet,
    unetpp,
)
