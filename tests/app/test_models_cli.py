"""``kseg models``: the registered models and encoders, and ``--params`` on a chosen combination."""

from __future__ import annotations

import re

import keras
import pytest

from kseg.app import cli
from kseg.nn.registry import build_model


def _rows(out: str) -> dict[tuple[str, str], str]:
    rows = {}
    for line in out.splitlines()[1:]:
        model, encoder, count = line.split(maxsplit=2)
        rows[model, encoder] = count
    return rows


def test_listing_names_models_and_encoders(capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("unet", "fcn8s", "resnet50", "resnet50v2", "efficientnetv2b0", "convnext_tiny",
                 "densenet121", "vgg16", "keras_hub:<folder>"):
        assert re.search(rf"^  {re.escape(name)}\s", out, re.MULTILINE), name
    assert re.search(r"^  unet\s+semantic\s+encoder$", out, re.MULTILINE)
    assert re.search(r"^  fcn8s\s+semantic\s*$", out, re.MULTILINE)
    assert re.search(r"^  convnext_tiny\s+keras\.applications\.ConvNeXtTiny\s+strides 4, 8, 16, 32\s+input raw255$",
                     out, re.MULTILINE)


def test_params_of_one_plain_combination(capsys):
    assert cli.main(["models", "--params", "--model", "unet", "--encoder", "none", "--size", "32"]) == 0
    rows = _rows(capsys.readouterr().out)
    expected = build_model("unet", input_shape=(32, 32, 3)).count_params()
    assert rows == {("unet", "none"): f"{expected:,}"}
    keras.backend.clear_session()


def test_params_with_a_keras_hub_preset_and_unknown_names(capsys, tmp_path):
    keras_hub = pytest.importorskip("keras_hub")
    keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 8, 8, 8],
        stackwise_num_blocks=[1, 1, 1, 1], stackwise_num_strides=[1, 2, 2, 2], block_type="basic_block",
    ).save_to_preset(str(tmp_path / "tiny"))
    encoder = f"keras_hub:{tmp_path / 'tiny'}"
    # fcn8s takes no encoder, so it has no row here
    assert cli.main(["models", "--params", "--model", "fcn8s,unet", "--encoder", encoder, "--size", "64"]) == 0
    rows = _rows(capsys.readouterr().out)
    expected = build_model("unet", input_shape=(64, 64, 3), encoder=encoder).count_params()
    assert rows == {("unet", encoder): f"{expected:,}"}

    assert cli.main(["models", "--params", "--encoder", "resnet18"]) == 2
    assert "unknown encoder 'resnet18'" in capsys.readouterr().err
    assert cli.main(["models", "--params", "--model", "unte", "--encoder", "none"]) == 2
    assert "did you mean 'unet'" in capsys.readouterr().err
