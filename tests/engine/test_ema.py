"""``train.ema``: validation, checkpoints and the final model use the moving average of the weights,
checked against a NumPy moving average of the raw weights recorded after every training step."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recorders import trainable_weights  # noqa: E402
from test_fit import Interrupt, history_rows, tiny_config  # noqa: E402

from kseg.engine.fit import train  # noqa: E402

MOMENTUM = 0.8


class RawWeights(keras.callbacks.Callback):
    """The training model's trainable weights after every step, by variable path."""

    def __init__(self):
        super().__init__()
        self.steps: list[dict[str, np.ndarray]] = []
        self.epoch_ends: list[int] = []  # steps done at each epoch's end

    def on_train_batch_end(self, batch, logs=None):
        self.steps.append(trainable_weights(self.model))

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_ends.append(len(self.steps))


def numpy_ema(steps: list[dict[str, np.ndarray]], momentum: float) -> dict[str, np.ndarray]:
    """Keras' rule: the first step copies the weights, each later one mixes them in."""
    average = {k: v.astype(np.float64) for k, v in steps[0].items()}
    for step in steps[1:]:
        average = {k: momentum * average[k] + (1 - momentum) * step[k] for k in average}
    return average


def checkpoint_weights(path: Path) -> dict[str, np.ndarray]:
    model = keras.saving.load_model(path, compile=False)
    return {v.path: keras.ops.convert_to_numpy(v.value) for v in model.trainable_variables}


def test_checkpoints_and_validation_use_the_moving_average(demo_root, tmp_path):
    recorder = RawWeights()
    cfg = tiny_config(demo_root, tmp_path, f"train.ema={MOMENTUM}", "train.epochs=3", "train.mixed_precision=off")
    result = train(cfg, extra_callbacks=[recorder])
    run = result.run_dir
    assert recorder.epoch_ends == [2, 4, 6]
    state = json.loads((run / "checkpoint_state.json").read_text())
    best_epoch = state["best_epoch"]

    for name, steps in (("best.keras", recorder.epoch_ends[best_epoch]), ("last.keras", recorder.epoch_ends[-1])):
        saved = checkpoint_weights(run / name)
        expected = numpy_ema(recorder.steps[:steps], MOMENTUM)
        raw = recorder.steps[steps - 1]
        assert set(saved) <= set(expected) and len(saved) == len(expected)
        moved = 0.0
        for key, value in saved.items():
            np.testing.assert_allclose(value, expected[key], rtol=1e-5, atol=1e-6, err_msg=f"{name} {key}")
            moved = max(moved, float(np.abs(expected[key] - raw[key]).max()))
        assert moved > 1e-3, "the average should differ from the raw weights, or this test proves nothing"

    # The logged score of the best epoch is the score of best.keras (what validation scored was saved).
    rows = history_rows(run)
    assert float(rows[best_epoch]["val_iou_map"]) == pytest.approx(result.val_score, abs=1e-12)




def test_a_resumed_run_continues_the_average(demo_root, tmp_path):
    """The average lives in the optimizer's state, which the epoch snapshot keeps: after a kill and a
    resume, last.keras is still the average over every step that counted."""
    cfg = tiny_config(demo_root, tmp_path, f"train.ema={MOMENTUM}", "train.epochs=3", "train.mixed_precision=off")
    recorder = RawWeights()
    with pytest.raises(KeyboardInterrupt):
        train(cfg, extra_callbacks=[recorder, Interrupt(epoch=1)])
    assert recorder.epoch_ends == [2] and len(recorder.steps) == 3
    del recorder.steps[2:]  # the interrupted epoch is replayed from its start
    result = train(cfg, extra_callbacks=[recorder])
    assert len(recorder.steps) == 6
    saved = checkpoint_weights(result.run_dir / "last.keras")
    expected = numpy_ema(recorder.steps, MOMENTUM)
    for key, value in saved.items():
        np.testing.assert_allclose(value, expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
