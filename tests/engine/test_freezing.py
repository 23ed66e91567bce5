"""A pretrained encoder frozen for the first epochs, at a smaller learning rate after, its BatchNorm
statistics kept (``kseg.engine.freezing``): the optimizer's steps against NumPy's Adam, the phase
switch inside one compiled train step (TensorFlow with XLA, a mirrored strategy, JAX), end-to-end runs
of a tiny model with a nested ``"encoder"`` interrupted on either side of the unfreezing boundary, and
a U-Net on a tiny keras-hub preset."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from backends import run_on_jax
from keras import layers
from test_fit import Interrupt, history_rows, tiny_config

from kseg.core.config import load_config
from kseg.core.errors import ConfigError
from kseg.engine import fit, freezing
from kseg.engine.averaging import recompute_batchnorm
from kseg.engine.fit import train
from kseg.nn.registry import register_model
from kseg.tasks.semantic.heads import AUTO, resolve_head, segmentation_head

MODEL = "freezing_test_encoder_net"


@register_model(MODEL, divisor=2)
def encoder_net(input_shape=(None, None, 3), n_classes=None, *, targets=None, base_filters=4, name=MODEL,
                **unet_options) -> keras.Model:
    """A U-Net-like model whose contracting path is a nested model named "encoder", with BatchNorm in
    the encoder and in the decoder (the U-Net options of the shared test config are ignored)."""
    n_out, activation = resolve_head(n_classes, targets, AUTO)
    pixels = keras.Input(shape=tuple(input_shape))
    x = layers.Conv2D(base_filters, 3, padding="same", name="enc_conv")(pixels)
    x = layers.BatchNormalization(name="enc_bn")(x)
    skip = layers.Activation("relu", name="enc_relu")(x)
    deep = layers.Conv2D(2 * base_filters, 3, strides=2, padding="same", activation="relu", name="enc_down")(skip)
    encoder = keras.Model(pixels, [skip, deep], name="encoder")

    image = keras.Input(shape=tuple(input_shape), name="image")
    skip, deep = encoder(image)
    x = layers.UpSampling2D(2, name="dec_up")(deep)
    x = layers.Concatenate(name="dec_concat")([x, skip])
    x = layers.Conv2D(base_filters, 3, padding="same", name="dec_conv")(x)
    x = layers.BatchNormalization(name="dec_bn")(x)
    x = layers.Activation("relu", name="dec_relu")(x)
    return keras.Model(image, segmentation_head(x, n_out, activation), name=name)


def numpy_adam(grads: list[np.ndarray], rates: list[float], start: np.ndarray, beta_1=0.9, beta_2=0.999,
               epsilon=1e-7) -> list[np.ndarray]:
    """The weights after each Adam step (Keras' formulation), step t taking ``rates[t]``."""
    w, m, v, out = start.astype(np.float64), 0.0, 0.0, []
    for t, (g, rate) in enumerate(zip(grads, rates), start=1):
        m = m + (g - m) * (1 - beta_1)
        v = v + (g * g - v) * (1 - beta_2)
        w = w - m * (rate * np.sqrt(1 - beta_2**t) / (1 - beta_1**t)) / (np.sqrt(v) + epsilon)
        out.append(w)
    return out


def value(variable) -> np.ndarray:
    return keras.ops.convert_to_numpy(variable.value).copy()


# -- the optimizer --------------------------------------------------------------------------------------
def test_encoder_steps_follow_numpy_adam_frozen_then_scaled():
    rng = np.random.default_rng(0)
    start = rng.normal(size=(2, 5)).astype(np.float32)
    encoder, other = keras.Variable(start[0], name="enc"), keras.Variable(start[1], name="dec")
    grads = [rng.normal(size=(2, 5)).astype(np.float32) for _ in range(5)]
    optimizer = freezing.EncoderRateAdam(learning_rate=0.01, encoder_rate=0.1, frozen_steps=2,
                                         encoder_variables=[encoder])
    after = []
    for g in grads:
        optimizer.apply([g[0], g[1]], [encoder, other])
        after.append((value(encoder), value(other)))

    for step in (0, 1):
        np.testing.assert_array_equal(after[step][0], start[0], err_msg=f"frozen step {step}")
    assert np.abs(after[2][0] - start[0]).max() > 1e-4, "the encoder must move once unfrozen"
    expected_encoder = numpy_adam([g[0] for g in grads], [0, 0, 0.001, 0.001, 0.001], start[0])
    expected_other = numpy_adam([g[1] for g in grads], [0.01] * 5, start[1])
    for step, (got_encoder, got_other) in enumerate(after):
        np.testing.assert_allclose(got_encoder, expected_encoder[step], rtol=1e-6, atol=1e-7, err_msg=f"step {step}")
        np.testing.assert_allclose(got_other, expected_other[step], rtol=1e-6, atol=1e-7, err_msg=f"step {step}")


def tiny_encoder_model(seed=0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    pixels = keras.Input((4,))
    encoder = keras.Model(pixels, layers.Dense(3, activation="tanh", name="enc_dense")(pixels), name="encoder")
    x = keras.Input((4,))
    model = keras.Model(x, layers.Dense(1, name="dec_dense")(encoder(x)))
    return model


def regression_data(n=12, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return x, (x @ np.array([1.0, -2.0, 0.5, 3.0], np.float32))[:, None]


class StepWeights(keras.callbacks.Callback):
    """The encoder's and the rest's trainable weights after every training step."""

    def __init__(self):
        super().__init__()
        self.steps: list[tuple[list[np.ndarray], list[np.ndarray]]] = []

    def on_train_batch_end(self, batch, logs=None):
        encoder = self.model.get_layer("encoder")
        ids = {id(v) for v in encoder.trainable_variables}
        self.steps.append(([value(v) for v in encoder.trainable_variables],
                           [value(v) for v in self.model.trainable_variables if id(v) not in ids]))


def assert_frozen_then_training(steps, start_encoder, frozen: int):
    for step, (encoder, _) in enumerate(steps):
        moved = max(float(np.abs(a - b).max()) for a, b in zip(encoder, start_encoder))
        if step < frozen:
            assert moved == 0.0, f"the encoder moved at frozen step {step}"
        else:
            assert moved > 1e-6, f"the encoder did not move at step {step}"
    for step in range(1, len(steps)):
        assert max(float(np.abs(a - b).max()) for a, b in zip(steps[step][1], steps[step - 1][1])) > 1e-6


@pytest.mark.parametrize("wrapping", ["none", "ema", "loss_scale"])
def test_the_phase_switches_inside_one_compiled_xla_train_step(wrapping):
    """The factor is read from the step counter inside the graph: one trace serves both phases, with
    the moving average on and inside Keras' LossScaleOptimizer (float16 training) too."""
    model = tiny_encoder_model()
    start = [value(v) for v in model.get_layer("encoder").trainable_variables]
    optimizer = freezing.EncoderRateAdam(learning_rate=0.05, frozen_steps=3, use_ema=wrapping == "ema",
                                         encoder_variables=model.get_layer("encoder").trainable_variables)
    if wrapping == "loss_scale":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=True)
    recorder = StepWeights()
    x, y = regression_data()
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0, callbacks=[recorder])
    assert len(recorder.steps) == 6
    assert_frozen_then_training(recorder.steps, start, frozen=3)


# The check above in a fresh interpreter: {setup} picks the backend's devices and gives ``scope``;
# {jit}: whether the train step is compiled with XLA.
PHASE_CHECK = """
import contextlib
import numpy as np, keras
from keras import layers
from kseg.engine.freezing import EncoderRateAdam
{setup}
keras.utils.set_random_seed(0)
with scope:
    pixels = keras.Input((4,))
    encoder = keras.Model(pixels, layers.Dense(3, activation="tanh")(pixels), name="encoder")
    x = keras.Input((4,))
    model = keras.Model(x, layers.Dense(1)(encoder(x)))
    start = [keras.ops.convert_to_numpy(v.value) for v in encoder.trainable_variables]
    model.compile(optimizer=EncoderRateAdam(learning_rate=0.05, frozen_steps=3,
                                            encoder_variables=encoder.trainable_variables),
                  loss="mse", jit_compile={jit})
moved = []


class Record(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        getattr(self.model, "jax_state_sync", lambda: None)()  # JAX: the step's weights into the variables
        moved.append(max(float(np.abs(keras.ops.convert_to_numpy(v.value) - s).max())
                         for v, s in zip(encoder.trainable_variables, start)))


data = np.random.default_rng(1).normal(size=(12, 4)).astype("float32")
model.fit(data, data.sum(axis=1, keepdims=True), batch_size=4, epochs=2, shuffle=False, verbose=0,
          callbacks=[Record()])
assert len(moved) == 6 and moved[:3] == [0.0, 0.0, 0.0] and min(moved[3:]) > 1e-6, moved
print("ok")
"""


@pytest.mark.jax
@pytest.mark.slow
def test_the_phase_switches_inside_one_jitted_train_step_on_jax():
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed")
    setup = 'assert keras.backend.backend() == "jax"\nscope = contextlib.nullcontext()'
    run_on_jax(PHASE_CHECK.format(setup=setup, jit=True))


@pytest.mark.slow
def test_the_phase_switches_under_a_mirrored_strategy():
    """Two replicas (the CPU split into two logical devices): the optimizer's variables are mirrored.
    A tf.function step: XLA cannot reach a variable of the other CPU device."""
    setup = """
import tensorflow as tf
assert keras.backend.backend() == "tensorflow"
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
assert strategy.num_replicas_in_sync == 2
scope = strategy.scope()
"""
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run([sys.executable, "-c", PHASE_CHECK.format(setup=setup, jit=False)], env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def config(*overrides):
    return load_config("demo", overrides=[f"model.name={MODEL}", "train.epochs=3", *overrides])


def test_encoder_lr_scales_the_first_step_of_a_keras_train_step():
    """Through the fit loop's optimizer: from the same weights and batch, the gradients are the same,
    and Adam's step is linear in the learning rate, so encoder_lr=0.1 moves the encoder by exactly a
    tenth of what encoder_lr=1 does (the rest by the same amount)."""
    x, y = regression_data(n=4)
    deltas = {}
    for rate in (1.0, 0.1):
        model = tiny_encoder_model(seed=0)
        encoder = freezing.prepare(config(f"train.encoder_lr={rate}", "train.schedule=constant"), model)
        if rate == 1.0:
            assert encoder is None, "the defaults need no encoder and change nothing"
            encoder = model.get_layer("encoder")
        optimizer = fit.optimizer(config(f"train.encoder_lr={rate}", "train.schedule=constant"), 3, encoder)
        assert isinstance(optimizer, freezing.EncoderRateAdam) == (rate != 1.0)
        model.compile(optimizer=optimizer, loss="mse")
        ids = {id(v) for v in model.get_layer("encoder").trainable_variables}
        before = [value(v) for v in model.trainable_variables]
        model.train_on_batch(x, y)
        deltas[rate] = [(id(v) in ids, value(v) - b) for v, b in zip(model.trainable_variables, before)]
    assert {is_encoder for is_encoder, _ in deltas[1.0]} == {True, False}
    for (is_encoder, full), (_, scaled) in zip(deltas[1.0], deltas[0.1]):
        assert np.abs(full).min() > 1e-4
        # The steps are measured on float32 weights of magnitude < 1: exact to a few 1e-8.
        np.testing.assert_allclose(scaled, (0.1 if is_encoder else 1.0) * full, rtol=0, atol=1e-7)


def test_defaults_keep_keras_adam_so_old_snapshots_load():
    optimizer = fit.optimizer(config(), 3, None)
    assert type(optimizer) is keras.optimizers.Adam


# -- BatchNorm and the encoder check -----------------------------------------------------------------------
def test_freeze_batchnorm_runs_the_encoders_batchnorm_in_inference_mode():
    model = encoder_net(input_shape=(16, 16, 3), targets="mask")
    assert freezing.prepare(config("train.freeze_batchnorm=true"), model) is model.get_layer("encoder")
    encoder_bn, decoder_bn = model.get_layer("encoder").get_layer("enc_bn"), model.get_layer("dec_bn")
    assert not encoder_bn.trainable and decoder_bn.trainable
    x = np.random.default_rng(0).random((2, 16, 16, 3)).astype(np.float32)
    encoder = model.get_layer("encoder")
    for a, b in zip(encoder(x, training=True), encoder(x, training=False)):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    # ... and its statistics survive the recomputation of checkpoint averaging, the decoder's do not.
    frozen = value(encoder_bn.moving_mean), value(encoder_bn.moving_variance)
    assert recompute_batchnorm(model, [x, x]) == 2
    np.testing.assert_array_equal(value(encoder_bn.moving_mean), frozen[0])
    np.testing.assert_array_equal(value(encoder_bn.moving_variance), frozen[1])
    assert np.abs(value(decoder_bn.moving_mean)).max() > 1e-3


class ConvBnBlock(layers.Layer):
    """A block layer holding its BatchNormalization as an attribute, as keras-hub's EfficientNet
    blocks do: ``Model.layers`` lists the block, not the BatchNormalization inside it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = layers.Conv2D(4, 3, padding="same")
        self.norm = layers.BatchNormalization()

    def call(self, x, training=None):
        return self.norm(self.conv(x), training=training)


def test_freeze_batchnorm_reaches_batchnorm_inside_block_layers():
    image = keras.Input((8, 8, 3))
    encoder = keras.Model(image, ConvBnBlock(name="block")(image), name="encoder")
    x = keras.Input((8, 8, 3), name="image")
    model = keras.Model(x, layers.Conv2D(1, 1)(encoder(x)))
    freezing.prepare(config("train.freeze_batchnorm=true"), model)
    norm = encoder.get_layer("block").norm
    assert not norm.trainable
    batch = np.random.default_rng(0).random((2, 8, 8, 3)).astype(np.float32) * 5
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(encoder(batch, training=True)),
                                  keras.ops.convert_to_numpy(encoder(batch, training=False)))


@pytest.mark.parametrize("override", ["train.freeze_encoder_epochs=1", "train.encoder_lr=0.5",
                                      "train.freeze_batchnorm=true"])
def test_a_model_without_an_encoder_is_a_config_error(override):
    model = tiny_encoder_model()
    plain = keras.Model(model.inputs, layers.Dense(1)(model.inputs[0]))
    with pytest.raises(ConfigError) as caught:
        freezing.prepare(config("model.name=unet", override), plain)
    key = override.split("=")[0]
    message = str(caught.value)
    assert key in message and "has none" in message and "model.args.encoder" in message
    assert freezing.prepare(config("model.name=unet"), plain) is None  # the defaults need none


# -- end to end: the fit loop, interrupted across the boundary ------------------------------------------
class EpochWeights(keras.callbacks.Callback):
    """Every weight of the training model (BatchNorm statistics included) by path, split into the
    encoder's and the rest, when training starts and after every epoch."""

    def __init__(self):
        super().__init__()
        self.begin: dict | None = None
        self.trainable: set[str] = set()
        self.epochs: dict[int, dict] = {}

    def _weights(self) -> dict[str, dict[str, np.ndarray]]:
        encoder = freezing.find_encoder(self.model)
        ids = {id(v) for v in encoder.weights}
        self.trainable |= {v.path for v in self.model.trainable_variables}
        found = {"encoder": {}, "rest": {}}
        for v in self.model.weights:
            found["encoder" if id(v) in ids else "rest"][v.path] = value(v)
        return found

    def on_train_begin(self, logs=None):
        if self.begin is None:
            self.begin = self._weights()

    def on_epoch_end(self, epoch, logs=None):
        self.epochs[epoch] = self._weights()


def moved(a: dict, b: dict, keys) -> float:
    keys = list(keys)
    assert keys
    return max(float(np.abs(a[k] - b[k]).max()) for k in keys)


def e2e_config(demo_root, tmp_path, *extra):
    return tiny_config(demo_root, tmp_path, f"model.name={MODEL}", "train.freeze_encoder_epochs=2",
                       "train.mixed_precision=off", "train.schedule=constant", "train.early_stopping=0", *extra)


@pytest.mark.slow
def test_killed_in_the_frozen_phase_the_run_resumes_frozen_then_trains(demo_root, tmp_path):
    """freeze_encoder_epochs=2 of 3, stopped in epoch 1 (0-based): the resumed run keeps epoch 1
    frozen and trains the encoder in epoch 2."""
    cfg = e2e_config(demo_root, tmp_path)
    recorder = EpochWeights()
    with pytest.raises(KeyboardInterrupt):
        train(cfg, extra_callbacks=[recorder, Interrupt(epoch=1)])
    assert sorted(recorder.epochs) == [0]
    result = train(cfg, extra_callbacks=[recorder])
    assert sorted(recorder.epochs) == [0, 1, 2]
    start, epochs = recorder.begin, recorder.epochs
    encoder = [k for k in start["encoder"] if k in recorder.trainable]
    rest = [k for k in start["rest"] if k in recorder.trainable]
    assert any("enc_conv" in k for k in encoder) and any("dec_conv" in k for k in rest)
    for epoch in (0, 1):
        assert moved(epochs[epoch]["encoder"], start["encoder"], encoder) == 0.0, f"encoder moved in epoch {epoch}"
    assert moved(epochs[0]["rest"], start["rest"], rest) > 1e-4
    assert moved(epochs[1]["rest"], epochs[0]["rest"], rest) > 1e-4
    assert moved(epochs[2]["encoder"], epochs[1]["encoder"], encoder) > 1e-4, "the encoder must train in epoch 2"
    # Without freeze_batchnorm the encoder's BatchNorm statistics adapt while its weights are frozen.
    statistics = [k for k in start["encoder"] if "moving_" in k]
    assert moved(epochs[0]["encoder"], start["encoder"], statistics) > 1e-4
    assert [int(r["epoch"]) for r in history_rows(result.run_dir)] == [0, 1, 2]


@pytest.mark.slow
def test_killed_after_the_frozen_phase_the_run_resumes_training_with_batchnorm_kept(demo_root, tmp_path):
    """Stopped in epoch 2, the first unfrozen one: the resumed run trains the encoder; with
    freeze_batchnorm the encoder's BatchNorm weights and statistics never change, the decoder's do."""
    cfg = e2e_config(demo_root, tmp_path, "train.freeze_batchnorm=true")
    recorder = EpochWeights()
    with pytest.raises(KeyboardInterrupt):
        train(cfg, extra_callbacks=[recorder, Interrupt(epoch=2)])
    assert sorted(recorder.epochs) == [0, 1]
    train(cfg, extra_callbacks=[recorder])
    start, epochs = recorder.begin, recorder.epochs
    encoder = [k for k in start["encoder"] if k in recorder.trainable]
    assert not any("enc_bn" in k for k in encoder), "frozen BatchNorm has no trainable weights"
    for epoch in (0, 1):
        assert moved(epochs[epoch]["encoder"], start["encoder"], encoder) == 0.0, f"encoder moved in epoch {epoch}"
    assert moved(epochs[2]["encoder"], epochs[1]["encoder"], encoder) > 1e-4, "the encoder must train in epoch 2"
    encoder_bn = [k for k in start["encoder"] if "enc_bn" in k]
    decoder_statistics = [k for k in start["rest"] if "dec_bn" in k and "moving_" in k]
    assert len(encoder_bn) == 4 and len(decoder_statistics) == 2
    for epoch in (0, 1, 2):
        assert moved(epochs[epoch]["encoder"], start["encoder"], encoder_bn) == 0.0, f"encoder BN moved ({epoch})"
        previous = epochs[epoch - 1]["rest"] if epoch else start["rest"]
        assert moved(epochs[epoch]["rest"], previous, decoder_statistics) > 1e-4, f"decoder BN kept ({epoch})"


@pytest.mark.slow
def test_a_unet_on_a_keras_hub_preset_keeps_the_preset_for_one_frozen_epoch_then_trains_it(demo_root, tmp_path):
    """The acceptance run: a tiny keras-hub ResNet saved with save_to_preset, a U-Net built on it
    (model.args.encoder: keras_hub:<folder>), frozen for one epoch of two."""
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 8, 8, 8],
        stackwise_num_blocks=[1, 1, 1, 1], stackwise_num_strides=[1, 2, 2, 2], block_type="basic_block",
        use_pre_activation=False)
    folder = tmp_path / "preset"
    backbone.save_to_preset(str(folder))
    preset = {v.path: value(v) for v in keras_hub.models.Backbone.from_preset(str(folder)).weights}

    cfg = tiny_config(demo_root, tmp_path, f"model.args.encoder=keras_hub:{folder}", "model.args.depth=null",
                      "model.args.input_norm=null", "train.epochs=2", "train.freeze_encoder_epochs=1",
                      "train.mixed_precision=off", "train.schedule=constant", "train.early_stopping=0")
    recorder = EpochWeights()
    train(cfg, extra_callbacks=[recorder])
    start, epochs = recorder.begin, recorder.epochs
    assert set(start["encoder"]) == set(preset) and len(preset) > 20
    for path, weights in preset.items():
        np.testing.assert_array_equal(start["encoder"][path], weights, err_msg=f"{path} is not the preset's")
    encoder = [k for k in start["encoder"] if k in recorder.trainable]
    rest = [k for k in start["rest"] if k in recorder.trainable]
    assert moved(epochs[0]["encoder"], start["encoder"], encoder) == 0.0, "the encoder moved in its frozen epoch"
    assert moved(epochs[0]["rest"], start["rest"], rest) > 1e-4, "the decoder must train in the frozen epoch"
    assert moved(epochs[1]["encoder"], epochs[0]["encoder"], encoder) > 1e-4, "the encoder must train in epoch 1"
