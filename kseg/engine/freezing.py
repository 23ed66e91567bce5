"""Training a pretrained encoder gently: frozen for the first epochs, a smaller learning rate after
(discriminative learning rates), BatchNorm statistics kept as loaded.

The encoder is the nested model named ``"encoder"`` of the inference model (``model.args.encoder``
of the U-Net, the Mask R-CNN backbone). Settings (``train.*``):

* ``freeze_encoder_epochs: N``: the encoder's trainable weights do not change in the first N
  epochs, then they train;
* ``encoder_lr: m``: after that, the encoder's learning rate is m times the others' (0: frozen for
  the whole run);
* ``freeze_batchnorm: true``: the encoder's BatchNorm layers run in inference mode for the whole
  run: their moving mean and variance, and their scale and offset, stay as loaded (small batches
  would give poor batch statistics). Keras 3 BatchNormalization runs in inference mode when the
  layer is not trainable, so those layers are made non-trainable before ``compile``.
  ``freeze_encoder_epochs`` alone leaves BatchNorm's moving statistics adapting to the new images.

**How.** The encoder stays trainable and the optimizer (:class:`EncoderRateAdam`) multiplies the
learning rate of the encoder's variables by a factor computed inside the train step from the
optimizer's own step counter: 0 while ``iterations < N * steps_per_epoch``, ``m`` after. Adam's
step is linear in the learning rate, so a factor of 0 leaves a weight exactly as it was.

* Resume: the step counter is optimizer state, saved in every epoch snapshot and restored with the
  weights (:mod:`kseg.engine.snapshots`), so a run resumed on either side of the boundary is in
  its phase with nothing else to save, and the learning-rate schedules read the same counter.
* Graphs: the factor is computed in the step from the counter (a variable), not fixed when the step
  is traced, so a train function traced once (``tf.function``, ``train.xla``, ``jax.jit``) switches
  phase without a retrace; JAX passes the optimizer's variables into its stateless step,
  TensorFlow strategies mirror them.
* EMA and mixed precision: the subclass is the optimizer that ``use_ema`` and Keras'
  ``LossScaleOptimizer`` wrap; a frozen weight's moving average is the weight.

Not chosen: ``trainable = False`` then a recompile at the boundary (the trainable list, and with
it the optimizer's slots and EMA averages, would differ between the two phases, so a snapshot of
one phase would not load into the other, and a recompile inside a distribution strategy retraces
everything); Keras' ``MultiOptimizer`` (it has no ``learning_rate``, which the plateau schedule
and the learning-rate log read, and rejects ``LossScaleOptimizer``); scaling the encoder's
gradients (Adam's step does not depend on the gradient's scale).

Costs: in the frozen phase the encoder's gradients are still computed, and Adam's moment estimates
of its weights keep accumulating, so the encoder starts training with warm estimates. Under float16
loss scaling a step skipped for non-finite gradients does not advance the counter, so unfreezing
comes that many steps late (never early).
"""

from __future__ import annotations

import dataclasses

import keras

from kseg.core.config import Config
from kseg.core.errors import ConfigError
from kseg.core.log import get_logger
from kseg.engine.averaging import batchnorm_layers

ENCODER = "encoder"  # the nested model's name (kseg.nn.backbones, kseg.nn.fpn)

log = get_logger("engine")


@dataclasses.dataclass(frozen=True)
class EncoderTraining:
    """The three settings; their defaults (0, 1.0, false) train the encoder like any other layer."""

    freeze_epochs: int = 0
    rate: float = 1.0
    freeze_batchnorm: bool = False

    @classmethod
    def of(cls, cfg: Config) -> EncoderTraining:
        t = cfg.train
        return cls(int(t.get("freeze_encoder_epochs", 0) or 0), float(t.get("encoder_lr", 1.0)),
                   bool(t.get("freeze_batchnorm", False)))

    @property
    def scales_rate(self) -> bool:
        return self.freeze_epochs > 0 or self.rate != 1.0

    def changed(self) -> list[str]:
        """The settings away from their defaults, as ``key: value`` for messages."""
        return [f"train.{key}: {value}" for key, value, default in (
            ("freeze_encoder_epochs", self.freeze_epochs, 0), ("encoder_lr", self.rate, 1.0),
            ("freeze_batchnorm", str(self.freeze_batchnorm).lower(), "false")) if value != default]

    def describe(self) -> str:
        parts = []
        if self.freeze_epochs:
            parts.append(f"encoder frozen for {self.freeze_epochs} epochs")
        if self.rate != 1.0:
            parts.append("encoder frozen" if self.rate == 0 else f"encoder learning rate x{self.rate:g}")
        if self.freeze_batchnorm:
            parts.append("encoder BatchNorm in inference mode")
        return "; ".join(parts)


def find_encoder(model: keras.Model) -> keras.Model | None:
    """The nested model named ``"encoder"``: a layer of ``model`` or of a model nested in it."""
    for layer in getattr(model, "layers", []):
        if layer.name == ENCODER and isinstance(layer, keras.Model):
            return layer
    for layer in getattr(model, "layers", []):
        if isinstance(layer, keras.Model):
            found = find_encoder(layer)
            if found is not None:
                return found
    return None


def prepare(cfg: Config, inference: keras.Model) -> keras.Model | None:
    """Before ``compile``: the encoder whose learning rate the optimizer scales (None when the
    settings are at their defaults), its BatchNorm layers frozen if asked. A ConfigError when a
    setting asks for an encoder the model does not have."""
    settings = EncoderTraining.of(cfg)
    if not settings.changed():
        return None
    encoder = find_encoder(inference)
    if encoder is None:
        raise ConfigError(
            f"{', '.join(settings.changed())} need a model with a pretrained encoder (a nested model named "
            f"'{ENCODER}'), and model {cfg.model.name!r} as configured has none: give it one (e.g. "
            f"model.args.encoder: resnet50 or keras_hub:<preset folder> for unet) or leave "
            f"train.freeze_encoder_epochs: 0, train.encoder_lr: 1.0, train.freeze_batchnorm: false")
    if settings.freeze_batchnorm:
        for layer in batchnorm_layers(encoder):
            layer.trainable = False
    log.info(settings.describe())
    return encoder


@keras.saving.register_keras_serializable(package="kseg")
class EncoderRateAdam(keras.optimizers.Adam):
    """Adam whose learning rate for the encoder's variables is ``encoder_rate`` times the others',
    and 0 for the first ``frozen_steps`` steps (see the module notes). The encoder's variables are
    given as objects (``encoder_variables``), before the optimizer is built."""

    def __init__(self, *args, encoder_rate: float = 1.0, frozen_steps: int = 0, encoder_variables=None, **kwargs):
        super().__init__(*args, **kwargs)
        if encoder_rate < 0 or frozen_steps < 0:
            raise ValueError(f"encoder_rate and frozen_steps must be >= 0, got {encoder_rate} and {frozen_steps}")
        self.encoder_rate, self.frozen_steps = float(encoder_rate), int(frozen_steps)
        self._encoder_keys = None if encoder_variables is None else {self._var_key(v) for v in encoder_variables}
        self._encoder_indices: set[int] = set()

    def build(self, variables):
        if self._encoder_keys is None:
            raise ValueError("EncoderRateAdam needs encoder_variables (the encoder's trainable variables) before "
                             "it is built")
        super().build(variables)
        self._encoder_indices = {self._get_variable_index(v) for v in variables
                                 if self._var_key(v) in self._encoder_keys}

    def encoder_factor(self):
        """The encoder's learning-rate factor at the current step (a tensor)."""
        rate = keras.ops.convert_to_tensor(self.encoder_rate, "float32")
        if not self.frozen_steps:
            return rate
        return keras.ops.where(keras.ops.less(self.iterations, self.frozen_steps), 0.0, rate)

    def update_step(self, gradient, variable, learning_rate):
        if self._get_variable_index(variable) in self._encoder_indices:
            factor = keras.ops.cast(self.encoder_factor(), variable.dtype)
            learning_rate = keras.ops.multiply(keras.ops.cast(learning_rate, variable.dtype), factor)
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "encoder_rate": self.encoder_rate, "frozen_steps": self.frozen_steps}


def adam(cfg: Config, steps_per_epoch: int, encoder: keras.Model | None, **adam_args) -> keras.optimizers.Optimizer:
    """Keras' Adam when the encoder trains like the rest (the default: old runs' snapshots load);
    :class:`EncoderRateAdam` on ``encoder``'s trainable variables otherwise."""
    settings = EncoderTraining.of(cfg)
    if encoder is None or not settings.scales_rate:
        return keras.optimizers.Adam(**adam_args)
    return EncoderRateAdam(encoder_rate=settings.rate, frozen_steps=settings.freeze_epochs * int(steps_per_epoch),
                           encoder_variables=encoder.trainable_variables, **adam_args)
