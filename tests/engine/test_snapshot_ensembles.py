"""Snapshot ensembles: ``cosine_restarts`` restarts the learning rate every ``cycle_epochs`` epochs,
the model at each cycle's end is kept, and ``predict.checkpoint: cycles`` ensembles the snapshots."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recorders import EpochEndWeights  # noqa: E402
from test_fit import history_rows, tiny_config  # noqa: E402

from kseg.core.errors import ConfigError  # noqa: E402
from kseg.engine.fit import train  # noqa: E402
from kseg.tasks.base import load_members  # noqa: E402
from kseg.tasks.semantic.predictor import Predictor  # noqa: E402


def cosine_with_restarts(step: int, cycle: int, rate: float, alpha: float = 0.05) -> float:
    """SGDR (Loshchilov & Hutter 2017) with equal cycles, written out."""
    position = (step % cycle) / cycle
    return rate * (alpha + (1 - alpha) * 0.5 * (1 + math.cos(math.pi * position)))


def test_cycles_restart_the_rate_and_leave_one_snapshot_each(demo_root, tmp_path):
    recorder = EpochEndWeights()
    cfg = tiny_config(demo_root, tmp_path, "train.epochs=4", "train.schedule=cosine_restarts", "train.cycle_epochs=2",
                      "train.mixed_precision=off", "train.early_stopping=0")
    result = train(cfg, extra_callbacks=[recorder])
    run = result.run_dir
    rate = float(cfg.train.learning_rate)
    logged = [float(r["learning_rate"]) for r in history_rows(run)]
    steps = 2  # per epoch (tiny_config): a cycle is 4 steps
    assert logged == pytest.approx([cosine_with_restarts((e + 1) * steps, 4, rate) for e in range(4)], rel=1e-5)
    assert logged[1] == pytest.approx(rate) and logged[0] < 0.6 * rate  # the restart

    assert sorted(p.name for p in (run / "cycles").iterdir()) == ["cycle-001.keras", "cycle-002.keras"]
    members = load_members(run, "cycles")
    assert [m.checkpoint for m in members] == ["cycles/cycle-001", "cycles/cycle-002"]
    for member, epoch in zip(members, (1, 3)):
        saved = {v.path: keras.ops.convert_to_numpy(v.value) for v in member.model.trainable_variables}
        for key, value in saved.items():
            np.testing.assert_array_equal(value, recorder.epochs[epoch][key], err_msg=key)

    # The ensemble averages the snapshots' probabilities.
    image = (np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)
    both = Predictor(members).predict(image)
    each = [Predictor([m]).predict(image) for m in members]
    np.testing.assert_allclose(both, (each[0] + each[1]) / 2, rtol=1e-5, atol=1e-6)
    assert np.abs(each[0] - each[1]).max() > 1e-3, "the snapshots should differ"


def test_restarts_need_a_cycle_length(demo_root, tmp_path):
    cfg = tiny_config(demo_root, tmp_path, "train.schedule=cosine_restarts")
    with pytest.raises(ConfigError, match="cycle_epochs"):
        train(cfg)
    assert not (tmp_path / "runs").exists()  # refused before a run directory was made


def test_out_of_fold_predictions_never_use_a_checkpoint_chosen_on_them():
    from kseg.app.cv import oof_checkpoint
    from kseg.core.config import Config, apply_overrides, load_config

    def chosen(*overrides):
        return oof_checkpoint(Config(apply_overrides(load_config("demo").to_dict(), list(overrides))))

    assert chosen() == "last"
    assert chosen("predict.checkpoint=best") == "last"
    assert chosen("predict.checkpoint=cycles") == "cycles"
    assert chosen("train.average_checkpoints=3") == "averaged"
    assert chosen("train.average_checkpoints=3", "train.average_from=best") == "last"


def test_a_run_without_cycles_says_so(demo_root, tmp_path):
    result = train(tiny_config(demo_root, tmp_path, "train.epochs=1"))
    with pytest.raises(Exception, match="cosine_restarts"):
        load_members(result.run_dir, "cycles")
