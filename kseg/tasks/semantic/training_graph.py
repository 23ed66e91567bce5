"""The pixel-weighted training graph: wraps an inference model so that the model owns its loss.

``build_training_model(inference_model, loss="bce")`` returns a Functional model with inputs
``{"image", "weight_map", "target"}`` and the inference model's prediction as output. A
``PixelLoss`` layer between the prediction and the output computes
``kseg.tasks.semantic.losses.loss_function(loss)(target, prediction, weight_map, **loss_kwargs)`` and registers it
with ``add_loss``, so training needs no compiled loss and no ``y``::
    training = build_training_model(inference, loss="bce_dice")
    training.compile(optimizer="adam")
    training.fit(x={"image": x, "weight_map": w, "target": t}, y=None, epochs=...)
    inference.predict(x)                      # same layers, image only

Why ``add_loss`` in a Functional model rather than a Model subclass with ``compute_loss``: the
graph stays a plain Functional model that ``save`` / ``load_model`` round-trip with one registered
layer, and Keras 3.15 handles forward-pass losses on both backends -- the TF trainer sums
``model.losses`` in ``compute_loss`` and scales them for ``tf.distribute`` replicas
(``_aggregate_additional_loss``); the JAX trainer collects them from ``stateless_call`` and hands
them to ``compute_loss``. The layer calls the pure loss function, never a ``keras.losses.Loss``,
whose own distribution scaling would be applied a second time.

Contract:
- ``image``: the inference model's input; ``weight_map``: float ``(B, H, W, 1)`` (``(B, H, W)``
  is accepted, Keras adds the channel axis); ``target``: float ``(B, H, W, C)`` 0/1 masks with C
  the model's output channels, or ``(B, H, W, 1)`` class indices for ``loss="ce"``.
- ``y`` may be ``None``; pass ``y=target`` as well to feed compiled metrics such as
  ``kseg.tasks.semantic.keras_metrics.MaskIoU`` (the loss ignores ``y``). ``validation_data=(x_dict, None)``
  gives ``val_loss``.
- The inference model is a nested layer (``inference_model_of(training)`` finds it), so the two
  always share weights. Save the inference model for prediction: it needs no kseg code to load.
  A saved training model loads with ``keras.saving.load_model`` once ``kseg.tasks.semantic.training_graph``
  is imported (it registers ``PixelLoss``); ``inference_model_of`` then recovers the predictor.
  On JAX, read the model through a callback's ``self.model`` (which syncs the trained values
  into the variables) before saving the inference model from inside ``fit``.

Auxiliary outputs (``kseg.tasks.semantic.auxiliary``): given a builder's model whose outputs are
``[main, aux1, ..., auxN, classification]``, the graph nests that model and its loss is

    loss(main) + sum_k w_k * loss(aux_k) + classification_weight * BCE(classification, any foreground)

(``DeepSupervisionLoss`` with ``w_k = deep_supervision_weight``, one number for every head or one
per head; ``ClassificationLoss``). The graph's output is still the main prediction, and
``inference_model_of`` gives the one-output model over the same layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops

from kseg.core.errors import ConfigError
from kseg.tasks.semantic import losses as kseg_losses
from kseg.tasks.semantic.auxiliary import main_model, output_roles

__all__ = ["ClassificationLoss", "DeepSupervisionLoss", "PixelLoss", "build_training_model", "inference_model_of"]

DEEP_SUPERVISION_WEIGHT = 0.4
CLASSIFICATION_WEIGHT = 0.1


@keras.saving.register_keras_serializable(package="kseg")
class PixelLoss(keras.layers.Layer):
    """Adds ``loss(target, prediction, weight_map)`` to the model's losses; returns the prediction.

    Computes in float32 (the layer's default dtype) so mixed-precision predictions are upcast
    before any log; the prediction it passes on is float32 too.
    """

    def __init__(self, loss="bce", loss_kwargs=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.loss_name = str(loss)
        self.loss_kwargs = dict(loss_kwargs or {})
        kseg_losses.check_loss_args(self.loss_name, self.loss_kwargs)
        self._loss_fn = kseg_losses.loss_function(self.loss_name)

    def call(self, prediction, target, weight_map):
        self.add_loss(self._loss_fn(target, prediction, weight_map=weight_map, **self.loss_kwargs))
        return prediction

    def compute_output_shape(self, prediction_shape, target_shape=None, weight_map_shape=None):
        return prediction_shape

    def get_config(self):
        return {**super().get_config(), "loss": self.loss_name, "loss_kwargs": dict(self.loss_kwargs)}


@keras.saving.register_keras_serializable(package="kseg")
class DeepSupervisionLoss(keras.layers.Layer):
    """Adds ``sum_k weights[k] * loss(target, auxiliary[k], weight_map)``; returns the prediction.

    The auxiliary heads see the main head's target and weight map, so each is pushed towards the
    same answer at its own depth (Zhou et al.'s deep supervision of U-Net++).
    """

    def __init__(self, loss="bce", loss_kwargs=None, weights=(DEEP_SUPERVISION_WEIGHT,), **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.loss_name = str(loss)
        self.loss_kwargs = dict(loss_kwargs or {})
        self.head_weights = [float(w) for w in weights]
        self._loss_fn = kseg_losses.loss_function(self.loss_name)

    def call(self, prediction, auxiliary, target, weight_map):
        total = 0.0
        for weight, output in zip(self.head_weights, auxiliary):
            total = total + weight * self._loss_fn(target, output, weight_map=weight_map, **self.loss_kwargs)
        self.add_loss(total)
        return prediction

    def compute_output_shape(self, prediction_shape, *args, **kwargs):
        return prediction_shape

    def get_config(self):
        return {**super().get_config(), "loss": self.loss_name, "loss_kwargs": dict(self.loss_kwargs),
                "weights": list(self.head_weights)}


def any_foreground(target, weight_map):
    """(valid, label) per image: whether any pixel carries loss weight, and whether any such
    pixel is foreground (channel 0 above 0.5: a 0/1 mask, or a class index >= 1).

    Pixels of weight 0 (a pad margin, unconfident pseudo-label pixels) are no evidence either
    way, and an image with no weighted pixel at all is left out of the classification loss.
    """
    weighted = ops.cast(weight_map[..., 0] > 0, "float32")
    foreground = ops.cast(target[..., 0] > 0.5, "float32") * weighted
    return ops.max(weighted, axis=(1, 2)), ops.max(foreground, axis=(1, 2))


@keras.saving.register_keras_serializable(package="kseg")
class ClassificationLoss(keras.layers.Layer):
    """Adds ``weight * BCE(probability, any foreground)`` averaged over the images that carry
    loss weight (see ``any_foreground``); returns the prediction."""

    def __init__(self, weight=CLASSIFICATION_WEIGHT, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.weight = float(weight)

    def call(self, prediction, probability, target, weight_map):
        valid, label = any_foreground(target, weight_map)
        p = ops.clip(ops.cast(probability[:, 0], "float32"), 1e-7, 1.0 - 1e-7)
        bce = -(label * ops.log(p) + (1.0 - label) * ops.log(1.0 - p))
        self.add_loss(self.weight * ops.sum(valid * bce) / ops.maximum(ops.sum(valid), 1.0))
        return prediction

    def compute_output_shape(self, prediction_shape, *args, **kwargs):
        return prediction_shape

    def get_config(self):
        return {**super().get_config(), "weight": self.weight}


def head_weights(weight: float | Sequence[float], n_heads: int) -> list[float]:
    """One weight per auxiliary head from ``train.deep_supervision_weight`` (a number or a list)."""
    weights = [weight] * n_heads if isinstance(weight, (int, float)) else list(weight)
    if len(weights) != n_heads or any(isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0
                                      for w in weights):
        raise ConfigError(f"train.deep_supervision_weight must be a number >= 0 or a list of {n_heads} such "
                          f"numbers (one per auxiliary head, deepest first), got {weight!r}")
    return [float(w) for w in weights]


def build_training_model(inference_model: keras.Model, loss: str = "bce", loss_kwargs: dict | None = None,
                         target_channels: int | None = None,
                         deep_supervision_weight: float | Sequence[float] = DEEP_SUPERVISION_WEIGHT,
                         classification_weight: float = CLASSIFICATION_WEIGHT) -> keras.Model:
    """The training model of ``inference_model`` (see the module notes for the contract).

    ``target_channels`` defaults to 1 for ``loss="ce"`` (class indices) and to the model's
    output channels otherwise. ``inference_model`` may have auxiliary outputs (see the module
    notes); the two weights apply to them only.
    """
    _, auxiliary, classification = output_roles(inference_model)
    image_spec = inference_model.inputs[0]
    output_channels = inference_model.outputs[0].shape[-1]
    if target_channels is None:
        target_channels = 1 if loss == "ce" else output_channels
    spatial = tuple(image_spec.shape[1:-1])
    image = keras.Input(shape=tuple(image_spec.shape[1:]), dtype=image_spec.dtype, name="image")
    weight_map = keras.Input(shape=(*spatial, 1), dtype="float32", name="weight_map")
    target = keras.Input(shape=(*spatial, target_channels), dtype="float32", name="target")
    outputs = inference_model(image)
    prediction = outputs[0] if len(inference_model.outputs) > 1 else outputs
    output = PixelLoss(loss, loss_kwargs, name="pixel_loss")(prediction, target, weight_map)
    if auxiliary:
        weights = head_weights(deep_supervision_weight, len(auxiliary))
        output = DeepSupervisionLoss(loss, loss_kwargs, weights, name="deep_supervision_loss")(
            output, [outputs[i] for i in auxiliary], target, weight_map)
    if classification is not None:
        output = ClassificationLoss(classification_weight, name="classification_loss")(
            output, outputs[classification], target, weight_map)
    return keras.Model(inputs={"image": image, "weight_map": weight_map, "target": target}, outputs=output,
                       name=f"{inference_model.name}_training")


def inference_model_of(training_model: keras.Model) -> keras.Model:
    """The inference model nested in a model from ``build_training_model`` (e.g. after ``load_model``);
    without its auxiliary outputs, if it has any."""
    nested = [layer for layer in training_model.layers if isinstance(layer, keras.Model)]
    if len(nested) != 1:
        raise ValueError(f"{training_model.name!r} does not look like a kseg training model: expected one "
                         f"nested model among its layers, found {len(nested)}")
    return main_model(nested[0])
