"""Deep supervision and the image-level classification head (kseg.tasks.semantic.auxiliary) and
their losses in the training graph, on tiny U-Net, U-Net++ and LinkNet models."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from backends import run_on_jax

from kseg.app.tune import search_postprocess
from kseg.core.config import load_config
from kseg.core.errors import ConfigError
from kseg.core.formats import get_format
from kseg.core.pictures import picture_row
from kseg.nn.registry import build_model
from kseg.tasks.semantic.auxiliary import main_model, output_roles
from kseg.tasks.semantic.callbacks import TensorBoardImages
from kseg.tasks.semantic.postprocess import gate, probabilities_to_target
from kseg.tasks.semantic.task import build_models
from kseg.tasks.semantic.training_graph import build_training_model, inference_model_of

TINY = {"input_shape": (None, None, 1), "depth": 3, "base_filters": 4}


def batch(n=4, size=32, seed=0):
    """A fixed batch: image 0 has an empty target; image 2's only foreground carries weight 0;
    image 3 has no weighted pixel at all."""
    rng = np.random.default_rng(seed)
    image = rng.random((n, size, size, 1)).astype(np.float32)
    target = (rng.random((n, size, size, 1)) > 0.6).astype(np.float32)
    weight = rng.uniform(0.5, 2.0, (n, size, size, 1)).astype(np.float32)
    target[0] = 0
    target[2] = 0
    target[2, :4, :4] = 1
    weight[2, :4, :4] = 0
    weight[3] = 0
    return {"image": image, "weight_map": weight, "target": target}


def numpy_bce(target, prediction, weight):
    """Mean over pixels of w * BCE, the definition of the ``bce`` loss."""
    p = np.clip(prediction.astype(np.float64), 1e-7, 1 - 1e-7)
    return float(np.mean(weight * -(target * np.log(p) + (1 - target) * np.log(1 - p))))


def output_names(model):
    return [t._keras_history[0].name for t in model.outputs]


@pytest.mark.parametrize("decoder, supervised", [
    ("unet", ["dec2_out", "dec1_out"]),  # every decoder stage above full resolution, deepest first
    ("unetpp", ["x0_1_out", "x0_2_out"]),  # Zhou et al.'s X^{0,j}, j < depth
    ("linknet", ["add2", "add1"]),
])
def test_deep_supervision_heads_read_the_decoder_depths(decoder, supervised):
    keras.utils.set_random_seed(0)
    model = build_model(decoder, **TINY, deep_supervision=True)
    assert output_names(model) == ["probs", "aux1_probs", "aux2_probs"]
    read = [model.get_layer(f"aux{k}_head").input._keras_history[0].name for k in (1, 2)]
    assert read == supervised
    assert output_roles(model) == (0, [1, 2], None)

    x = np.random.default_rng(0).random((2, 32, 32, 1)).astype(np.float32)
    outputs = model.predict(x, verbose=0)
    assert [o.shape for o in outputs] == [(2, 32, 32, 1)] * 3
    inference = main_model(model)
    assert len(inference.outputs) == 1 and inference.name == decoder
    assert not [w for w in inference.weights if w.path.startswith("aux")]
    np.testing.assert_array_equal(inference.predict(x, verbose=0), outputs[0])


@pytest.mark.parametrize("decoder, options, deepest", [
    ("unet", TINY, "bottleneck_out"),
    ("fpn", {"input_shape": (None, None, 1), "base_filters": 1, "pyramid_filters": 8, "segmentation_filters": 4},
     "bottleneck_out"),
    ("deeplabv3plus", {"input_shape": (None, None, 1), "base_filters": 1, "aspp_filters": 8, "low_level_filters": 4,
                       "decoder_filters": 8, "atrous_rates": (1, 2)}, "bottleneck_out"),
])
def test_classification_head_reads_the_deepest_encoder_feature(decoder, options, deepest):
    keras.utils.set_random_seed(8)
    model = build_model(decoder, **options, classification_head=True)
    assert output_names(model) == ["probs", "classification"]
    assert model.get_layer("classification_pool").input._keras_history[0].name == deepest
    x = np.random.default_rng(8).random((2, 32, 32, 1)).astype(np.float32)
    main, probability = model.predict(x, verbose=0)
    assert probability.shape == (2, 1) and np.all((probability > 0) & (probability < 1))
    out = main_model(model).predict(x, verbose=0)
    np.testing.assert_array_equal(out[..., :1], main)
    np.testing.assert_allclose(out[..., 1], np.broadcast_to(probability[:, :, None], (2, 32, 32)), rtol=1e-6)

def test_options_off_build_the_same_model():
    keras.utils.set_random_seed(0)
    plain = build_model("unet", **TINY)
    keras.utils.set_random_seed(0)
    off = build_model("unet", **TINY, deep_supervision=False, classification_head=False)
    assert len(off.outputs) == 1 and [w.path for w in off.weights] == [w.path for w in plain.weights]
    x = np.random.default_rng(1).random((1, 32, 32, 1)).astype(np.float32)
    np.testing.assert_array_equal(off.predict(x, verbose=0), plain.predict(x, verbose=0))


def test_training_loss_is_main_plus_weighted_auxiliary_losses():
    keras.utils.set_random_seed(1)
    model = build_model("unet", **TINY, deep_supervision=True)
    training = build_training_model(model, loss="bce", deep_supervision_weight=[0.3, 0.5])
    training.compile(optimizer="adam", run_eagerly=True)
    x = batch(seed=1)
    main, aux1, aux2 = model.predict(x["image"], verbose=0)
    t, w = x["target"], x["weight_map"]
    expected = numpy_bce(t, main, w) + 0.3 * numpy_bce(t, aux1, w) + 0.5 * numpy_bce(t, aux2, w)
    assert training.evaluate(x, batch_size=4, verbose=0) == pytest.approx(expected, rel=1e-5)
    # One weight for every head; the graph's output is the main prediction alone.
    same = build_training_model(model, loss="bce", deep_supervision_weight=0.4)
    same.compile(optimizer="adam", run_eagerly=True)
    expected = numpy_bce(t, main, w) + 0.4 * (numpy_bce(t, aux1, w) + numpy_bce(t, aux2, w))
    assert same.evaluate(x, batch_size=4, verbose=0) == pytest.approx(expected, rel=1e-5)
    np.testing.assert_array_equal(same.predict(x, verbose=0), main)


def test_classification_loss_is_bce_against_any_weighted_foreground():
    keras.utils.set_random_seed(2)
    model = build_model("linknet", **TINY, classification_head=True)
    assert output_names(model) == ["probs", "classification"]
    training = build_training_model(model, loss="bce", classification_weight=0.7)
    training.compile(optimizer="adam", run_eagerly=True)
    x = batch(seed=2)
    main, probability = model.predict(x["image"], verbose=0)
    assert probability.shape == (4, 1)
    # Image 0: empty (0); 1: foreground (1); 2: foreground only at weight 0 (0); 3: no weight (left out).
    labels, valid = np.array([0.0, 1.0, 0.0]), slice(0, 3)
    p = np.clip(probability[valid, 0].astype(np.float64), 1e-7, 1 - 1e-7)
    bce = float(np.mean(-(labels * np.log(p) + (1 - labels) * np.log(1 - p))))
    expected = numpy_bce(x["target"], main, x["weight_map"]) + 0.7 * bce
    assert training.evaluate(x, batch_size=4, verbose=0) == pytest.approx(expected, rel=1e-5)


def test_a_training_step_moves_the_auxiliary_heads_and_the_main_path():
    keras.utils.set_random_seed(3)
    model = build_model("unetpp", **TINY, deep_supervision=True, classification_head=True)
    training = build_training_model(model, loss="bce_dice")
    training.compile(optimizer=keras.optimizers.Adam(1e-2), run_eagerly=True)
    watched = ("aux1_head", "aux2_head", "classification_dense", "head", "x0_1_1_conv", "enc0_1_conv")
    before = {n: keras.ops.convert_to_numpy(model.get_layer(n).weights[0]).copy() for n in watched}
    x = batch(seed=3)
    training.fit(x, batch_size=4, epochs=1, verbose=0)
    for name, value in before.items():
        assert not np.allclose(keras.ops.convert_to_numpy(model.get_layer(name).weights[0]), value), name


def test_saved_inference_and_training_models_reload(tmp_path):
    keras.utils.set_random_seed(4)
    model = build_model("unet", **TINY, deep_supervision=True, classification_head=True)
    training = build_training_model(model, loss="bce")
    inference = main_model(model)
    x = batch(seed=4)
    inference.save(tmp_path / "inference.keras")
    loaded = keras.saving.load_model(tmp_path / "inference.keras")
    assert len(loaded.outputs) == 1 and not [layer for layer in loaded.layers if layer.name.startswith("aux")]
    np.testing.assert_array_equal(loaded.predict(x["image"], verbose=0), inference.predict(x["image"], verbose=0))

    training.compile(optimizer="adam", run_eagerly=True)
    training.save(tmp_path / "training.keras")
    reloaded = keras.saving.load_model(tmp_path / "training.keras")
    reloaded.compile(optimizer="adam", run_eagerly=True)
    assert reloaded.evaluate(x, batch_size=4, verbose=0) == pytest.approx(
        training.evaluate(x, batch_size=4, verbose=0), rel=1e-6)
    recovered = inference_model_of(reloaded)
    assert len(recovered.outputs) == 1
    np.testing.assert_array_equal(recovered.predict(x["image"], verbose=0), inference.predict(x["image"], verbose=0))


def test_bad_options_name_what_works():
    with pytest.raises(ConfigError, match="deep_supervision on unet needs .*depth >= 2"):
        build_model("unet", **{**TINY, "depth": 1}, deep_supervision=True)
    with pytest.raises(ConfigError, match="classification_dropout must be in"):
        build_model("unet", **TINY, classification_head=True, classification_dropout=1.0)
    model = build_model("unet", **TINY, deep_supervision=True)
    with pytest.raises(ConfigError, match=r"train.deep_supervision_weight .* list of 2"):
        build_training_model(model, deep_supervision_weight=[0.4])
    with pytest.raises(ConfigError, match="has no option 'deep_supervision'"):
        build_model("fpn", input_shape=(None, None, 1), deep_supervision=True)


def test_inference_model_carries_the_image_probability_as_a_last_channel():
    keras.utils.set_random_seed(5)
    model = build_model("unet", **TINY, targets="mask+border", deep_supervision=True, classification_head=True)
    x = batch(seed=5)["image"]
    main, _, _, probability = model.predict(x, verbose=0)
    inference = main_model(model)
    assert len(inference.outputs) == 1
    out = inference.predict(x, verbose=0)
    assert out.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(out[..., :2], main)
    np.testing.assert_allclose(out[..., 2], np.broadcast_to(probability[:, :, None], (4, 32, 32)), rtol=1e-6)


def two_squares(probability):
    """A 20 x 20 mask-probability map with two squares, and the image-level channel."""
    pixels = np.zeros((20, 20, 1), np.float32)
    pixels[2:8, 2:8] = pixels[12:18, 12:18] = 0.9
    return pixels, np.concatenate([pixels, np.full((20, 20, 1), probability, np.float32)], axis=-1)


@pytest.mark.parametrize("fmt", ["dsb_instances", "tgs_salt"])
def test_gate_empties_exactly_the_images_below_the_threshold(fmt):
    post = {"method": "components", "threshold": 0.5, "min_size": 4, "empty_threshold": 0.3}
    for probability in (0.05, 0.29, 0.3, 0.8):
        pixels, with_channel = two_squares(probability)
        plain = probabilities_to_target(pixels, get_format(fmt), {**post, "empty_threshold": None})
        assert plain.max() >= 1
        gated = probabilities_to_target(with_channel, get_format(fmt), post)
        assert gated.dtype == plain.dtype and gated.shape == plain.shape
        if probability < 0.3:
            assert not gated.any()
        else:
            np.testing.assert_array_equal(gated, plain)
        # Threshold off: the channel is only taken off.
        np.testing.assert_array_equal(probabilities_to_target(with_channel, get_format(fmt), {**post, "empty_threshold": None}),
                                      plain)
    target = np.ones((3, 3), np.uint8)
    assert gate(target, 0.9, 0.5) is target and gate(target, None, 0.5) is target and gate(target, 0.1, None) is target
    np.testing.assert_array_equal(gate(target, 0.1, 0.5), np.zeros((3, 3), np.uint8))


def test_tune_searches_the_gate_with_the_pixel_settings_fixed(tmp_path):
    """Two images with objects (head: 0.8, 0.75) and two empty ones where the pixels see an object
    (head: 0.2, 0.25). Ungated 0.5; a gate in (0.25, 0.75] empties exactly the two: 1.0."""
    cfg = load_config("demo", data_root=str(tmp_path), overrides=[
        "generator.targets=mask", "postprocess.method=components", "postprocess.threshold=0.5",
        "postprocess.min_size=0"])
    square = np.zeros((20, 20), np.int32)
    square[2:8, 2:8] = 1

    def predicted(probability):  # the square at 0.9, and the head's channel
        return np.stack([0.9 * square, np.full((20, 20), probability)], axis=-1).astype(np.float32)

    cases = [(square, predicted(0.8)), (square, predicted(0.75)),
             (0 * square, predicted(0.2)), (0 * square, predicted(0.25))]
    found = search_postprocess(cases, cfg, thresholds=[0.5], min_sizes=[0], methods=["components"], progress=False)
    assert found["gate"]["ungated_score"] == pytest.approx(0.5)
    assert found["params"]["empty_threshold"] == pytest.approx(0.3) and found["score"] == pytest.approx(1.0)
    by_gate = {g["empty_threshold"]: g["score"] for g in found["grid"] if g.get("empty_threshold") is not None}
    assert by_gate == pytest.approx({0.1: 0.5, 0.2: 0.5, 0.3: 1.0, 0.4: 1.0, 0.5: 1.0, 0.6: 1.0, 0.7: 1.0,
                                     0.8: 0.75, 0.9: 0.5})
    ungated = search_postprocess([(t, p[..., :1]) for t, p in cases], cfg, thresholds=[0.5], min_sizes=[0],
                                 methods=["components"], progress=False)
    assert ungated["gate"] is None and ungated["score"] == pytest.approx(0.5)
    assert all(g.get("empty_threshold") is None for g in ungated["grid"])


def test_tensorboard_pictures_draw_the_pixels_and_log_the_image_probability(tmp_path):
    """The head's channel is not a third colour in the prediction panel: a scalar per image."""
    image = keras.Input((None, None, 1))
    head = keras.layers.Conv2D(1, 1, activation="sigmoid", kernel_initializer="zeros",
                               bias_initializer=keras.initializers.Constant(np.log(0.25 / 0.75)))(image)
    model = keras.Model(image, keras.layers.Concatenate()([image, head]))
    rng = np.random.default_rng(0)
    picture = rng.random((16, 16, 1)).astype(np.float32)
    truth, weight = np.zeros((16, 16), np.int32), np.ones((16, 16, 1), np.float32)
    callback = TensorBoardImages(model, tmp_path, [picture], [truth], [weight], pad_multiple=8, targets="mask")
    [(title, drawn)] = callback.pictures()
    np.testing.assert_array_equal(drawn, picture_row(picture, truth, picture, weight))
    [(name, value)] = callback.scalars()
    assert name == "validation/0: non-empty probability" and value == pytest.approx(0.25, abs=1e-6)
    plain = TensorBoardImages(model, tmp_path, [picture], [truth], [weight], pad_multiple=8, targets="mask+border")
    assert plain.pictures()[0][1].shape == drawn.shape and plain.scalars() == []


def test_classification_head_with_softmax_classes_is_refused(tmp_path):
    cfg = load_config("demo", data_root=str(tmp_path), overrides=[
        "generator.targets=classes", "train.loss=ce", "model.args.n_classes=3", "model.args.depth=2",
        "model.args.base_filters=4", "model.args.classification_head=true"])
    with pytest.raises(ConfigError, match="classification_head needs sigmoid targets"):
        build_models(cfg, 3)


@pytest.mark.slow
def test_a_tiny_model_learns_which_images_are_empty():
    keras.utils.set_random_seed(6)
    rng = np.random.default_rng(6)
    image = rng.normal(0.3, 0.05, (8, 32, 32, 1)).astype(np.float32)
    target = np.zeros((8, 32, 32, 1), np.float32)
    for i in range(4):  # images 0-3 hold a bright square; 4-7 are empty
        r, c = rng.integers(0, 20, 2)
        image[i, r:r + 10, c:c + 10] = 0.9
        target[i, r:r + 10, c:c + 10] = 1
    model = build_model("unet", input_shape=(None, None, 1), depth=2, base_filters=4, classification_head=True,
                        classification_dropout=0.0)
    training = build_training_model(model, loss="bce", classification_weight=1.0)
    training.compile(optimizer=keras.optimizers.Adam(1e-2))
    x = {"image": image, "weight_map": np.ones_like(target), "target": target}
    training.fit(x, batch_size=8, epochs=40, verbose=0)
    probability = main_model(model).predict(image, verbose=0)[:, 0, 0, 1]
    assert probability[:4].min() > 0.5 > probability[4:].max(), probability


@pytest.mark.slow
def test_auxiliary_losses_and_image_channel_on_jax():
    run_on_jax("""
        import keras, numpy as np
        from kseg.nn.registry import build_model
        from kseg.tasks.semantic import losses
        from kseg.tasks.semantic.auxiliary import main_model
        from kseg.tasks.semantic.training_graph import build_training_model
        keras.utils.set_random_seed(7)
        model = build_model("unetpp", input_shape=(None, None, 1), depth=2, base_filters=4,
                            deep_supervision=True, classification_head=True)
        training = build_training_model(model, loss="bce", deep_supervision_weight=0.5, classification_weight=0.0)
        training.compile(optimizer="adam")
        rng = np.random.default_rng(7)
        x = {"image": rng.random((2, 32, 32, 1), dtype=np.float32), "weight_map": np.ones((2, 32, 32, 1), np.float32)}
        x["target"] = (x["image"] > 0.5).astype(np.float32)
        main, aux, probability = model.predict(x["image"], verbose=0)
        bce = losses.loss_function("bce")
        expected = float(bce(x["target"], main, x["weight_map"])) + 0.5 * float(bce(x["target"], aux, x["weight_map"]))
        assert abs(training.evaluate(x, verbose=0) - expected) < 1e-5 * expected
        out = main_model(model).predict(x["image"], verbose=0)
        assert np.array_equal(out[..., 0], main[..., 0]) and np.allclose(out[0, :, :, 1], probability[0, 0])
        print("ok")
    """)


class Interrupt(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_demo_run_with_auxiliary_outputs_trains_resumes_and_saves_one_output(demo_root, tmp_path):
    from kseg.core.runs import find_resumable_run
    from kseg.engine.fit import train

    cfg = load_config("demo", data_root=str(demo_root), overrides=[
        f"preprocess.cache_dir={tmp_path / 'cache'}", "preprocess.n_jobs=1", "preprocess.progress=false",
        f"train.runs_dir={tmp_path / 'runs'}", "train.epochs=2", "train.steps_per_epoch=2", "train.verbose=0",
        "generator.batch_size=2", "generator.crop_size=[32,32]", "model.args.depth=2", "model.args.base_filters=4",
        "model.args.deep_supervision=true", "model.args.classification_head=true", "model.args.hypercolumns=true",
        "train.deep_supervision_weight=[0.5]", "train.classification_weight=0.2", "dataset.demo=false"])
    with pytest.raises(KeyboardInterrupt):
        train(cfg, extra_callbacks=[Interrupt()])
    interrupted = find_resumable_run(cfg)
    assert interrupted is not None
    started = []
    result = train(cfg, extra_callbacks=[keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: started.append(epoch))])
    assert result.run_dir == interrupted and started == [1]
    best = keras.saving.load_model(result.run_dir / "best.keras")
    assert len(best.outputs) == 1 and not [layer for layer in best.layers if layer.name.startswith("aux")]
    assert best.outputs[0].shape[-1] == len(cfg.generator.targets.split("+")) + 1  # + the image-level channel
    assert np.isfinite(result.val_score)
    import tensorflow as tf

    from kseg.app.tune import tune_postprocess

    tags = {value.tag for path in (result.run_dir / "logs" / "images").glob("events.out.tfevents.*")
            for event in tf.compat.v1.train.summary_iterator(str(path)) for value in event.summary.value}
    assert "validation/0: non-empty probability" in tags and any(t.endswith("| weight map") for t in tags)
    record = tune_postprocess(result.run_dir, thresholds=[0.5], min_sizes=[0], methods=["distance"], limit=3,
                              progress=False)
    gates = [g["empty_threshold"] for g in record["grid"] if g.get("empty_threshold") is not None]
    assert gates == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    assert record["score"] >= record["gate"]["ungated_score"] >= record["config_score"] - 1e-12
