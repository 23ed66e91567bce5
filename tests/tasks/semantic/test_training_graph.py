"""kseg.tasks.semantic.training_graph: the weight-map training model around a tiny two-conv inference model."""

from __future__ import annotations

import importlib.util
import textwrap
import warnings

import keras
import numpy as np
import pytest
from backends import run_on_jax

from kseg.core.errors import ConfigError
from kseg.tasks.semantic import losses
from kseg.tasks.semantic.keras_metrics import MaskIoU
from kseg.tasks.semantic.training_graph import (
    PixelLoss,
    build_training_model,
    inference_model_of,
)


def tiny_model(channels=1, outputs=1, activation="sigmoid", name="tiny"):
    image = keras.Input((None, None, channels), name="pixels")
    hidden = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(image)
    prediction = keras.layers.Conv2D(outputs, 1, activation=activation, name="head")(hidden)
    return keras.Model(image, prediction, name=name)


def batch(n=4, size=8, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.random((n, size, size, 1)).astype(np.float32)
    target = np.repeat(image > 0.5, channels, axis=-1).astype(np.float32)
    weight = rng.uniform(0.5, 2.0, (n, size, size, 1)).astype(np.float32)
    return {"image": image, "weight_map": weight, "target": target}


def test_contract_inputs_output_and_shared_layers():
    keras.utils.set_random_seed(0)
    inference = tiny_model(outputs=2)
    training = build_training_model(inference, loss="bce_dice")
    assert set(training.input) == {"image", "weight_map", "target"}
    assert tuple(training.input["target"].shape) == (None, None, None, 2)
    assert tuple(training.input["weight_map"].shape) == (None, None, None, 1)
    assert inference_model_of(training) is inference
    assert {id(v) for v in inference.weights} <= {id(v) for v in training.weights}
    x = batch(channels=2)
    np.testing.assert_array_equal(training.predict(x, verbose=0), inference.predict(x["image"], verbose=0))
    assert build_training_model(tiny_model(outputs=3, activation="softmax"), loss="ce").input["target"].shape[-1] == 1


@pytest.mark.parametrize("name", ["bce", "dice", "bce_dice", "focal", "lovasz"])
def test_reported_loss_is_the_weighted_function(name):
    keras.utils.set_random_seed(1)
    inference = tiny_model()
    training = build_training_model(inference, loss=name)
    training.compile(optimizer="adam", run_eagerly=True)
    x = batch(seed=1)
    reported = training.evaluate(x, batch_size=4, verbose=0)
    prediction = inference.predict(x["image"], verbose=0)
    expected = float(losses.loss_function(name)(x["target"], prediction, x["weight_map"]))
    assert reported == pytest.approx(expected, rel=1e-5)


def test_ce_loss_kwargs_and_rank3_weight_map():
    keras.utils.set_random_seed(2)
    inference = tiny_model(outputs=3, activation="softmax")
    training = build_training_model(inference, loss="ce")
    training.compile(optimizer="adam", run_eagerly=True)
    x = batch(seed=2)
    x["target"] = np.random.default_rng(2).integers(0, 3, x["target"].shape).astype(np.float32)
    x["weight_map"] = x["weight_map"][..., 0]  # (B, H, W): Keras adds the channel axis
    reported = training.evaluate(x, batch_size=4, verbose=0)
    expected = float(losses.weighted_ce(x["target"], inference.predict(x["image"], verbose=0), x["weight_map"]))
    assert reported == pytest.approx(expected, rel=1e-5)

    weighted = build_training_model(tiny_model(), loss="bce_dice", loss_kwargs={"bce_weight": 0.0, "dice_weight": 2.0})
    assert weighted.get_layer("pixel_loss").loss_kwargs == {"bce_weight": 0.0, "dice_weight": 2.0}


def test_zero_weight_map_gives_zero_loss():
    training = build_training_model(tiny_model(), loss="bce")
    training.compile(optimizer="adam", run_eagerly=True)
    x = batch(seed=3)
    x["weight_map"] = np.zeros_like(x["weight_map"])
    assert training.evaluate(x, batch_size=4, verbose=0) == 0.0


def test_bad_loss_names_and_arguments_fail_when_built():
    with pytest.raises(ConfigError, match="lovasz"):
        build_training_model(tiny_model(), loss="jaccard")
    with pytest.raises(ConfigError, match="gama"):
        build_training_model(tiny_model(), loss="focal", loss_kwargs={"gama": 2.0})
    image = keras.Input((4, 4, 1))
    two_outputs = keras.Model(image, [keras.layers.Conv2D(1, 1)(image), keras.layers.Conv2D(1, 1)(image)])
    with pytest.raises(ValueError, match="one image to one prediction"):
        build_training_model(two_outputs)


def test_one_eager_step_with_metrics_and_save_roundtrip(tmp_path):
    keras.utils.set_random_seed(4)
    inference = tiny_model()
    training = build_training_model(inference, loss="lovasz")
    training.compile(optimizer="adam", metrics=[MaskIoU()], run_eagerly=True)
    x = batch(seed=4)
    history = training.fit(x, x["target"], batch_size=4, epochs=1, verbose=0)  # y feeds the metric only
    assert set(history.history) == {"loss", "mask_iou"}

    path = tmp_path / "training.keras"
    training.save(path)
    restored = keras.saving.load_model(path)
    predictor = inference_model_of(restored)
    np.testing.assert_allclose(predictor.predict(x["image"], verbose=0), inference.predict(x["image"], verbose=0),
                               rtol=1e-6)
    assert restored.get_layer("pixel_loss").get_config()["loss"] == "lovasz"
    # the predictor saved on its own reloads without any kseg code
    predictor.save(tmp_path / "inference.keras")
    plain = keras.saving.load_model(tmp_path / "inference.keras", custom_objects={}, safe_mode=True)
    assert plain.input_shape == (None, None, None, 1)

    layer = PixelLoss.from_config(PixelLoss("focal", {"gamma": 1.0}).get_config())
    assert (layer.loss_name, layer.loss_kwargs, layer.dtype) == ("focal", {"gamma": 1.0}, "float32")


@pytest.mark.slow
def test_fit_reduces_loss_and_moves_the_shared_inference_model():
    keras.utils.set_random_seed(5)
    inference = tiny_model()
    training = build_training_model(inference, loss="bce_dice")
    training.compile(optimizer=keras.optimizers.Adam(0.05))
    x = batch(n=8, size=16, seed=5)
    before = inference.predict(x["image"], verbose=0)
    history = training.fit(x, None, batch_size=4, epochs=15, verbose=0)  # 30 steps
    loss = history.history["loss"]
    assert loss[-1] < 0.7 * loss[0], loss
    after = inference.predict(x["image"], verbose=0)
    assert np.abs(after - before).max() > 0.05
    np.testing.assert_allclose(training.predict(x, verbose=0), after, rtol=1e-6)
    # the trained predictor fits the target better than the untrained one
    assert losses.weighted_bce(x["target"], after) < losses.weighted_bce(x["target"], before)


@pytest.mark.jax
@pytest.mark.slow
def test_training_graph_fits_on_jax():
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed")
    code = textwrap.dedent(
        """
        import numpy as np, keras
        from kseg.tasks.semantic.training_graph import build_training_model
        assert keras.backend.backend() == "jax"
        keras.utils.set_random_seed(0)
        image = keras.Input((None, None, 1))
        hidden = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(image)
        inference = keras.Model(image, keras.layers.Conv2D(1, 1, activation="sigmoid")(hidden))
        training = build_training_model(inference, loss="lovasz")
        training.compile(optimizer=keras.optimizers.Adam(0.02))
        rng = np.random.default_rng(0)
        x = rng.random((8, 16, 16, 1)).astype("float32")
        data = {"image": x, "weight_map": np.ones((8, 16, 16, 1), "float32"), "target": (x > 0.5).astype("float32")}
        before = inference.predict(x, verbose=0)
        loss = training.fit(data, None, batch_size=4, epochs=5, verbose=0).history["loss"]
        assert loss[-1] < loss[0], loss
        assert np.abs(inference.predict(x, verbose=0) - before).max() > 0.01
        print("ok")
        """
    )
    run_on_jax(code)


class SizedBatches(keras.utils.PyDataset):
    """Whole-image validation batches whose size changes only after the first two."""

    def __init__(self, sizes):
        super().__init__()
        self.sizes = sizes

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, index):
        return batch(n=1, size=self.sizes[index], seed=index)


def test_validation_batches_may_change_size_after_the_first_two():
    # DSB 2018 case: most images are 256x256, so the first batches fix no varying dimension.
    from kseg.engine.tf_data import variable_size_input

    keras.utils.set_random_seed(0)
    training = build_training_model(tiny_model(), loss="bce")
    training.compile(optimizer="adam")
    sizes = [8, 8, 8, 16, 12]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "Your input ran out of data" when the length is unknown
        history = training.fit(SizedBatches([8, 8]),
                               validation_data=variable_size_input(SizedBatches(sizes)), epochs=2, verbose=0)
    assert len(history.history["val_loss"]) == 2 and np.isfinite(history.history["val_loss"]).all()
    evaluated = training.evaluate(variable_size_input(SizedBatches(sizes)), verbose=0, return_dict=True)
    assert evaluated["loss"] == pytest.approx(history.history["val_loss"][-1], rel=1e-5)
