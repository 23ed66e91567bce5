"""Tiny keras-hub backbones of every family with ``pyramid_outputs``, saved as preset folders
(``save_to_preset``): the keras-hub encoders of the encoder and decoder tests, no download."""

from __future__ import annotations

from pathlib import Path

import numpy as np

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def tiny_resnet(keras_hub, pre_activation=False, stacks=4):
    return keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64] + [8] * (stacks - 1),
        stackwise_num_blocks=[1] * stacks, stackwise_num_strides=[1] + [2] * (stacks - 1),
        block_type="basic_block", use_pre_activation=pre_activation)


FAMILIES = {  # tiny configurations of each keras-hub family
    "resnet": lambda kh: tiny_resnet(kh),
    "resnetv2": lambda kh: tiny_resnet(kh, pre_activation=True),
    "efficientnet": lambda kh: kh.models.EfficientNetBackbone(
        stackwise_kernel_sizes=[3, 3, 3, 3], stackwise_num_repeats=[1, 1, 1, 1],
        stackwise_input_filters=[8, 8, 8, 8], stackwise_output_filters=[8, 8, 8, 8],
        stackwise_expansion_ratios=[1, 2, 2, 2], stackwise_squeeze_and_excite_ratios=[0.0, 0.0, 0.25, 0.25],
        stackwise_strides=[2, 2, 2, 2], stackwise_block_types=["fused", "fused", "unfused", "unfused"],
        width_coefficient=1.0, depth_coefficient=1.0, dropout=0.0),  # num_features: keras-hub does not save it
    "densenet": lambda kh: kh.models.DenseNetBackbone(stackwise_num_repeats=[1, 1, 1, 1], growth_rate=4),
    "mit": lambda kh: kh.models.MiTBackbone(
        layerwise_depths=[1, 1, 1, 1], num_layers=4, layerwise_num_heads=[1, 1, 1, 1],
        layerwise_sr_ratios=[4, 2, 1, 1], max_drop_path_rate=0.0, layerwise_patch_sizes=[7, 3, 3, 3],
        layerwise_strides=[4, 2, 2, 2], hidden_dims=[4, 8, 8, 8], image_shape=(32, 32, 3)),
    "cspresnet": lambda kh: kh.models.CSPNetBackbone(
        stem_filters=8, stem_kernel_size=3, stem_strides=4, stackwise_depth=[1, 1, 1, 1],
        stackwise_strides=[1, 2, 2, 2], stackwise_num_filters=[8, 16, 16, 16], block_type="bottleneck_block",
        stage_type="csp", bottle_ratio=[0.5], block_ratio=[1.0], expand_ratio=[2.0], stem_pooling="max",
        cross_linear=True),
    "cspdarknet": lambda kh: kh.models.CSPNetBackbone(
        stem_filters=8, stem_kernel_size=3, stem_strides=1, stackwise_depth=[1] * 5, stackwise_strides=[2] * 5,
        stackwise_num_filters=[8, 16, 16, 16, 16], block_type="dark_block", stage_type="csp",
        bottle_ratio=(0.5, 1.0), block_ratio=(1.0, 0.5), expand_ratio=(2.0, 1.0), stem_padding="same",
        down_growth=True),
}


class PresetFolders:
    """``presets(family)``: ``"keras_hub:<folder>"`` of the family's tiny backbone, saved once under
    ``root`` (ResNet: with a known first kernel, 0.01, and an ImageNet mean / std converter)."""

    def __init__(self, keras_hub, root: Path):
        self.keras_hub, self.root, self.made = keras_hub, Path(root), {}

    def __call__(self, family: str) -> str:
        if family not in self.made:
            folder = self.root / family
            backbone = FAMILIES[family](self.keras_hub)
            if family == "resnet":  # a known weight, to see it arrive in the encoder
                conv = backbone.get_layer("conv1_conv")
                conv.kernel.assign(np.full(conv.kernel.shape, 0.01, np.float32))
            backbone.save_to_preset(str(folder))
            if family == "resnet":
                self.keras_hub.layers.ResNetImageConverter(
                    image_size=(224, 224), scale=list(1 / (255 * STD)), offset=list(-MEAN / STD),
                ).save_to_preset(str(folder))
            self.made[family] = "keras_hub:" + str(folder)
        return self.made[family]
