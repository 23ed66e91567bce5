"""Benchmark: kseg's U-Net training step against the same network built as plainly as Keras 3 allows.

Run from the repository root: ``python bench/unet_plain.py [--steps 3] [--rounds 2] [--size 256]
[--batch 8]``. Random weights and data (no download), TensorFlow backend, XLA off, float32.

The network is U-Net with a ResNet-50 encoder (``keras.applications.ResNet50``, skips at strides
2..16, bottleneck at 32) and a decoder of 2x2 transposed convolutions, concatenation and two
3x3 conv-BN-ReLU units per level (256, 128, 64, 32, 16 filters), one sigmoid output channel.
Variants, each timed over whole ``train_on_batch`` steps (Adam) after two warm-up steps, in turn
for ``--rounds`` rounds (best round kept, so load drifts on all alike):

* ``plain`` (baseline): one flat ``keras.Model`` (the ResNet-50 layers and the decoder in one
  graph) compiled with ``loss="binary_crossentropy"``; ``train_on_batch(x, y)``;
* ``kseg model, compiled loss``: ``kseg.models.build_model("unet", encoder="resnet50")`` (nested
  encoder model, float32 output layers) compiled with the same Keras loss: the cost of kseg's graph;
* ``kseg training graph``: the same model inside ``build_training_model(loss="bce")`` (the weight
  map is an input, the pixel-weighted loss is in the graph), as ``make train`` runs it: the cost
  of in-graph weighting;
* ``kseg, bilinear upsampling``: the training graph with ``upsampling="bilinear"`` (UpSampling2D
  + 1x1 conv instead of transposed convolutions): the cost of that decoder choice.

* ``segmentation_models on tf-keras (peer)``, only when ``segmentation_models`` (qubvel, 1.0.x) and
  ``tf_keras`` are importable (e.g. ``pip install --target DIR tf_keras segmentation-models
  keras-applications image-classifiers efficientnet --no-deps`` and ``PYTHONPATH=DIR``): its
  ``Unet("resnet50")`` on Keras 2 (``TF_USE_LEGACY_KERAS=1``, which changes only ``tf.keras``;
  kseg uses ``keras``, Keras 3), compiled with the same loss and optimizer. That is the peer
  competitors use; kseg does not depend on it.

Each line prints images/s and the variant's cost against ``plain`` (positive = slower).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import importlib.util  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
PEER = all(importlib.util.find_spec(name) for name in ("segmentation_models", "tf_keras"))
if PEER:  # before TensorFlow is imported: tf.keras is then Keras 2 (tf_keras); `keras` stays Keras 3
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ["SM_FRAMEWORK"] = "tf.keras"

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssd import device_text  # noqa: E402


def plain_unet(size: int):
    """The U-Net-ResNet50 as one flat Keras model with plain layers (no kseg code but the skip names)."""
    import keras
    from keras import layers

    from kseg.nn.backbones import get_encoder_spec

    image = keras.Input((size, size, 3), name="image")
    encoder = keras.applications.ResNet50(include_top=False, weights=None, input_tensor=image)
    features = get_encoder_spec("resnet50").features  # stride -> layer name
    skips = {stride: encoder.get_layer(name).output for stride, name in features.items() if stride < 32}
    x = encoder.get_layer(features[32]).output
    for level in reversed(range(5)):
        filters = 16 * 2**level
        x = layers.Conv2DTranspose(filters, 2, strides=2, padding="same")(x)
        if 2**level in skips:
            x = layers.Concatenate()([x, skips[2**level]])
        for _ in range(2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
            x = layers.BatchNormalization()(x)
            x = layers.Activation("relu")(x)
    output = layers.Conv2D(1, 1, activation="sigmoid")(x)
    return keras.Model(image, output, name="plain_unet")


def kseg_unet(size: int, upsampling: str = "transpose"):
    from kseg.models import build_model

    return build_model("unet", input_shape=(size, size, 3), n_classes=1, encoder="resnet50", base_filters=16,
                       upsampling=upsampling)


def variants(size: int, batch: int) -> dict:
    """name -> (compiled model, batch to train on)."""
    import keras

    from kseg.tasks.semantic.training_graph import build_training_model

    rng = np.random.default_rng(0)
    x = rng.random((batch, size, size, 3), dtype=np.float32)
    y = (rng.random((batch, size, size, 1)) > 0.5).astype(np.float32)
    graph_batch = {"image": x, "weight_map": np.ones_like(y), "target": y}

    def compiled(model, **kwargs):
        model.compile(optimizer=keras.optimizers.Adam(1e-4), jit_compile=False, **kwargs)
        return model

    keras.utils.set_random_seed(0)
    out = {"plain": (compiled(plain_unet(size), loss="binary_crossentropy"), (x, y))}
    keras.utils.set_random_seed(0)
    out["kseg model, compiled loss"] = (compiled(kseg_unet(size), loss="binary_crossentropy"), (x, y))
    keras.utils.set_random_seed(0)
    out["kseg training graph"] = (compiled(build_training_model(kseg_unet(size), loss="bce")), (graph_batch,))
    keras.utils.set_random_seed(0)
    out["kseg, bilinear upsampling"] = (compiled(build_training_model(kseg_unet(size, "bilinear"), loss="bce")),
                                        (graph_batch,))
    if PEER:
        import segmentation_models as sm
        import tf_keras

        tf_keras.utils.set_random_seed(0)
        peer = sm.Unet("resnet50", encoder_weights=None, input_shape=(size, size, 3), classes=1, activation="sigmoid")
        peer.compile(optimizer=tf_keras.optimizers.Adam(1e-4), loss="binary_crossentropy")
        out["segmentation_models on tf-keras (peer)"] = (peer, (x, y))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of all variants (best kept)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    import keras

    if keras.backend.backend() != "tensorflow":
        print("bench/unet_plain.py measures the TensorFlow backend: run it with KERAS_BACKEND=tensorflow")
        return 0
    start = time.perf_counter()
    print(device_text())
    models = variants(args.size, args.batch)
    for name, (model, data) in models.items():
        for _ in range(2):
            loss = model.train_on_batch(*data)
        assert np.isfinite(float(np.ravel(loss)[0])), f"{name}: loss is not finite"
    best = {name: float("inf") for name in models}
    for _ in range(args.rounds):
        for name, (model, data) in models.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                model.train_on_batch(*data)
            best[name] = min(best[name], (time.perf_counter() - t0) / args.steps)
    plain = best["plain"]
    peer = models.get("segmentation_models on tf-keras (peer)")
    print(f"U-Net-ResNet50, {args.size}x{args.size}, batch {args.batch}, float32, XLA off; "
          f"{models['plain'][0].count_params():,} parameters (plain) vs "
          f"{models['kseg model, compiled loss'][0].count_params():,} (kseg)"
          + (f" vs {peer[0].count_params():,} (peer)" if peer else "; the peer (segmentation_models on tf-keras) "
             "is not installed"))
    for name, seconds in best.items():
        print(f"{name:28s} {args.batch / seconds:6.2f} images/s  {seconds * 1e3:7.0f} ms/step  "
              f"cost vs plain {seconds / plain - 1:+.1%}")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
