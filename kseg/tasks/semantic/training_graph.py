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
"""

from __future__ import annotations

import keras

from kseg.tasks.semantic import losses as kseg_losses

__all__ = ["PixelLoss", "build_training_model", "inference_model_of"]


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


def build_training_model(inference_model: keras.Model, loss: str = "bce", loss_kwargs: dict | None = None,
                         target_channels: int | None = None) -> keras.Model:
    """The training model of ``inference_model`` (see the module notes for the contract).

    ``target_channels`` defaults to 1 for ``loss="ce"`` (class indices) and to the model's
    output channels otherwise.
    """
    if len(inference_model.inputs) != 1 or len(inference_model.outputs) != 1:
        raise ValueError(f"model {inference_model.name!r} must map one image to one prediction; it has "
                         f"{len(inference_model.inputs)} inputs and {len(inference_model.outputs)} outputs")
    image_spec = inference_model.inputs[0]
    output_channels = inference_model.outputs[0].shape[-1]
    if target_channels is None:
        target_channels = 1 if loss == "ce" else output_channels
    spatial = tuple(image_spec.shape[1:-1])
    image = keras.Input(shape=tuple(image_spec.shape[1:]), dtype=image_spec.dtype, name="image")
    weight_map = keras.Input(shape=(*spatial, 1), dtype="float32", name="weight_map")
    target = keras.Input(shape=(*spatial, target_channels), dtype="float32", name="target")
    prediction = inference_model(image)
    output = PixelLoss(loss, loss_kwargs, name="pixel_loss")(prediction, target, weight_map)
    return keras.Model(inputs={"image": image, "weight_map": weight_map, "target": target}, outputs=output,
                       name=f"{inference_model.name}_training")


def inference_model_of(training_model: keras.Model) -> keras.Model:
    """The inference model nested in a model from ``build_training_model`` (e.g. after ``load_model``)."""
    nested = [layer for layer in training_model.layers if isinstance(layer, keras.Model)]
    if len(nested) != 1:
        raise ValueError(f"{training_model.name!r} does not look like a kseg training model: expected one "
                         f"nested model among its layers, found {len(nested)}")
    return nested[0]
