"""The mixed precision policy chosen for the hardware (kseg.engine.precision)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kseg.core.errors import ConfigError
from kseg.engine.precision import (
    Hardware,
    choose_policy,
    cpu_flags,
    mixed_precision,
    set_mixed_precision,
)

AMX = Hardware("cpu", cpu_flags=frozenset({"avx2", "avx512f", "amx_bf16", "amx_tile"}))
AVX512_BF16 = Hardware("cpu", cpu_flags=frozenset({"avx512f", "avx512_bf16"}))
PLAIN_CPU = Hardware("cpu", cpu_flags=frozenset({"avx2", "fma"}))
T4, V100, P100 = Hardware("gpu", (7, 5)), Hardware("gpu", (7, 0)), Hardware("gpu", (6, 0))
A100, H100 = Hardware("gpu", (8, 0)), Hardware("gpu", (9, 0))


@pytest.fixture
def restore_policy():
    policy = keras.config.dtype_policy()
    yield
    keras.config.set_dtype_policy(policy)


@pytest.mark.parametrize("hardware, policy", [
    (AMX, "mixed_bfloat16"), (AVX512_BF16, "mixed_bfloat16"), (PLAIN_CPU, "float32"),
    (T4, "mixed_float16"), (V100, "mixed_float16"), (P100, "float32"),
    (A100, "mixed_bfloat16"), (H100, "mixed_bfloat16"), (Hardware("tpu"), "mixed_bfloat16"),
    (Hardware("gpu", None), "float32"),
])
def test_auto_uses_half_precision_only_where_the_hardware_makes_it_fast(hardware, policy):
    chosen, why = choose_policy("auto", hardware)
    assert chosen == policy
    assert why.startswith("auto: ")


@pytest.mark.parametrize("setting, hardware, policy", [
    (True, PLAIN_CPU, "mixed_bfloat16"), ("on", T4, "mixed_float16"), ("on", P100, "mixed_float16"),
    ("on", H100, "mixed_bfloat16"), (False, H100, "float32"), ("off", AMX, "float32"),
    ("bfloat16", T4, "mixed_bfloat16"), ("float16", AMX, "mixed_float16"), ("mixed_float16", AMX, "mixed_float16"),
])
def test_explicit_settings(setting, hardware, policy):
    assert choose_policy(setting, hardware)[0] == policy


def test_an_unknown_setting_is_a_clear_error():
    with pytest.raises(ValueError, match="train.mixed_precision must be one of auto, on, off, bfloat16, float16"):
        choose_policy("half", AMX)


def test_cpu_flags_from_cpuinfo():
    text = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse avx512_bf16 amx_bf16\n\nprocessor\t: 1\n"
    assert cpu_flags(text) == {"fpu", "sse", "avx512_bf16", "amx_bf16"}
    assert cpu_flags("Features\t: fp asimd bf16\n") == {"fp", "asimd", "bf16"}  # aarch64 wording
    assert cpu_flags("") == frozenset()


def test_the_config_accepts_the_settings_and_refuses_others(tmp_path):
    from kseg.core.config import load_config

    for value in ("auto", "on", "off", "bfloat16", "float16", "true", "false"):
        assert load_config("demo", overrides=[f"train.mixed_precision={value}"]).train.mixed_precision is not None
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config("demo", overrides=["train.mixed_precision=half"])


def test_the_policy_is_set_and_float16_training_scales_the_loss(restore_policy):
    policy, _ = set_mixed_precision("float16", PLAIN_CPU)
    assert policy == keras.config.dtype_policy().name == "mixed_float16"
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2), keras.layers.Activation("linear",
                                                                                               dtype="float32")])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.layers[0].compute_dtype == "float16" and model.layers[0].variable_dtype == "float32"
    model.fit(np.ones((4, 4), np.float32), np.zeros((4, 2), np.float32), epochs=1, verbose=0)
    assert set_mixed_precision("off", PLAIN_CPU)[0] == keras.config.dtype_policy().name == "float32"


def test_the_policy_holds_only_while_training(restore_policy):
    keras.config.set_dtype_policy("float32")
    with mixed_precision("bfloat16", PLAIN_CPU) as (policy, why):
        assert policy == keras.config.dtype_policy().name == "mixed_bfloat16"
        assert why == "train.mixed_precision: bfloat16"
    assert keras.config.dtype_policy().name == "float32"  # a notebook's next model is float32 again
