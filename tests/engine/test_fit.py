"""End-to-end training on a tiny demo competition: run directory, resume after an interruption,
determinism. Tiny U-Net (depth 2, 4 filters), 32x32 crops, a few steps per epoch."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from kseg.core.config import load_config
from kseg.core.runs import find_resumable_run
from kseg.data.split import split_ids
from kseg.engine.fit import image_groups, train
from kseg.tasks.base import get_task, load_model

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def tiny_config(demo_root, tmp_path, *extra):
    return load_config("demo", data_root=str(demo_root), overrides=[
        f"preprocess.cache_dir={tmp_path / 'cache'}", "preprocess.n_jobs=1", "preprocess.progress=false",
        f"train.runs_dir={tmp_path / 'runs'}", "train.epochs=3", "train.steps_per_epoch=2", "train.verbose=0",
        "train.image_every=1", "generator.batch_size=2", "generator.crop_size=[32,32]",
        "model.args.depth=2", "model.args.base_filters=4", "split.n_folds=5", "dataset.demo=false", *extra])


def history_rows(run):
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


def test_run_directory_holds_checkpoints_logs_and_scores(demo_root, tmp_path):
    result = train(tiny_config(demo_root, tmp_path))
    run = result.run_dir
    for name in ("config.yaml", "best.keras", "last.keras", "history.csv", "results.json", "status.json"):
        assert (run / name).is_file(), name
    assert list((run / "logs").rglob("events.out.tfevents.*")), "no TensorBoard event files"
    assert list((run / "logs" / "images").glob("events.out.tfevents.*")), "no TensorBoard image panel"
    rows = history_rows(run)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert all(0.0 <= float(r["val_iou_map"]) <= 1.0 for r in rows)
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    results = json.loads((run / "results.json").read_text())
    assert results["val_score"] == pytest.approx(result.val_score)

    # Per image group: the groups' scores, weighted by their image counts, make the overall score.
    cfg = tiny_config(demo_root, tmp_path)
    task = get_task(cfg)
    ids, strata = task.prepare()
    images, _ = task.validation(split_ids(cfg, ids, strata)[1])
    counts = {group: n for group, n in zip(*np.unique(image_groups(images), return_counts=True))}
    assert len(counts) > 1, "the demo's validation split should hold fluorescence and bright-field images"
    for row in rows:
        weighted = sum(n * float(row[f"val_iou_map_{group}"]) for group, n in counts.items()) / sum(counts.values())
        assert weighted == pytest.approx(float(row["val_iou_map"]), abs=1e-9)
    assert 0.0 <= results["baselines"]["otsu"] <= 1.0
    # The best checkpoint is an image-only model that predicts mask + border probabilities.
    model = keras.saving.load_model(run / "best.keras", compile=False)
    probabilities = keras.ops.convert_to_numpy(model(np.zeros((1, 32, 32, 3), np.float32)))
    assert probabilities.shape == (1, 32, 32, 2) and np.all((probabilities >= 0) & (probabilities <= 1))


def test_validation_groups_are_the_images_own_under_modality_fluorescence(demo_root, tmp_path):
    """preprocess.modality=fluorescence makes every image look like fluorescence; its validation
    groups must still be those of the images as decoded (the reader's inversion notes say so)."""
    groups = {}
    for modality in ("keep", "fluorescence"):
        cfg = tiny_config(demo_root, tmp_path, f"preprocess.modality={modality}")
        task = get_task(cfg)
        ids, strata = task.prepare()
        valid_ids = split_ids(cfg, ids, strata)[1]
        images, _ = task.validation(valid_ids)
        groups[modality] = image_groups(images, [task.data.notes(i) for i in valid_ids])
        if modality == "fluorescence":
            assert set(image_groups(images)) == {"fluorescence"}  # what the converted images alone say
    assert len(set(groups["keep"])) > 1
    assert groups["fluorescence"] == groups["keep"]


class Interrupt(keras.callbacks.Callback):
    """Stops training in the middle of ``epoch`` as a Ctrl-C would."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch, self.current = epoch, -1

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.current == self.epoch and batch == 0:
            raise KeyboardInterrupt


def test_interrupted_run_resumes_at_the_epoch_it_reached(demo_root, tmp_path):
    cfg = tiny_config(demo_root, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, extra_callbacks=[Interrupt(epoch=1)])
    interrupted = find_resumable_run(cfg)
    assert interrupted is not None, "an interrupted run must be found for resuming"
    assert [int(r["epoch"]) for r in history_rows(interrupted)] == [0]

    started = []
    recorder = keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: started.append(epoch))
    result = train(cfg, extra_callbacks=[recorder])
    assert result.run_dir == interrupted
    assert started == [1, 2], "the resumed run must continue at epoch 1, not restart"
    assert [int(r["epoch"]) for r in history_rows(result.run_dir)] == [0, 1, 2]
    assert find_resumable_run(cfg) is None


def test_deterministic_runs_give_the_same_metrics(demo_root, tmp_path):
    """Two runs of ``python -m kseg train`` with ``train.deterministic=true``, as a user repeats one."""
    histories, weights = [], []
    for attempt in range(2):
        cfg = tiny_config(demo_root, tmp_path / str(attempt), "train.deterministic=true")
        overrides = [f"--set={key}={value}" for key, value in _flat(cfg.to_dict(), ("preprocess", "train", "generator",
                                                                                      "model", "split", "dataset"))]
        result = subprocess.run([sys.executable, "-m", "kseg", "train", *overrides], cwd=ROOT, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        (run,) = (tmp_path / str(attempt) / "runs").iterdir()
        histories.append(history_rows(run))
        weights.append(load_model(run / "last.keras").get_weights())
    first, second = histories
    assert len(first) == len(second) == 3
    # Same data order, augmentation, weight maps, initial weights and schedule: bit for bit.
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(first, second):
        assert a["learning_rate"] == b["learning_rate"]
        for key in ("loss", "val_loss", "val_iou_map"):
            assert float(a[key]) == float(b[key]), key


def _flat(data, sections, prefix=""):
    """``{"a": {"b": 1}}`` -> ``[("a.b", 1)]`` for the named top-level sections (lists as YAML)."""
    items = []
    for key, value in data.items():
        if not prefix and key not in sections:
            continue
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            items += _flat(value, sections, path + ".")
        elif not isinstance(value, dict):
            items.append((path, json.dumps(value) if isinstance(value, (list, tuple, type(None), bool)) else value))
    return items


def test_mirrored_strategy_over_two_cpu_devices(demo_root, tmp_path):
    """The multi-replica path (MirroredStrategy, as on several GPUs) on two logical CPU devices."""
    code = f"""
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, {str(ROOT / "tests" / "engine")!r})
from pathlib import Path
from test_fit import tiny_config
from kseg.engine.fit import train
result = train(tiny_config(Path({str(demo_root)!r}), Path({str(tmp_path)!r}), "train.strategy=mirrored",
                           "train.epochs=2"))
print(json.dumps(json.loads((result.run_dir / "results.json").read_text())))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["placement"] == "MirroredStrategy over 2 CPU devices"
    (run,) = (tmp_path / "runs").iterdir()
    rows = history_rows(run)
    assert len(rows) == 2 and all(np.isfinite(float(r["loss"])) for r in rows)
    assert all(0.0 <= float(r["val_iou_map"]) <= 1.0 for r in rows)
    # Replicas hold one copy of the weights: the checkpoint is an ordinary single-device model.
    assert load_model(run / "best.keras").count_params() > 0


def test_unknown_strategy_is_a_config_error():
    from kseg.core.errors import ConfigError
    from kseg.engine.distribute import strategy_scope

    with pytest.raises(ConfigError, match="train.strategy"):
        strategy_scope("mirored")


def test_a_run_stuck_at_a_trivial_baseline_says_so(tmp_path):
    from kseg.engine.fit import stuck_at_baseline

    history = tmp_path / "history.csv"
    history.write_text("epoch,val_tgs_iou_map\n0,0.41\n1,0.41\n2,0.41\n")
    (warning,) = stuck_at_baseline(history, "val_tgs_iou_map", {"empty": 0.41, "all_foreground": 0.1, "otsu": 0.2})
    assert "empty baseline's 0.4100 for all 3 epochs" in warning
    (warning,) = stuck_at_baseline(history, "val_tgs_iou_map", {"empty": 0.5})
    assert "never moved from 0.4100 in 3 epochs" in warning
    history.write_text("epoch,val_tgs_iou_map\n0,0.41\n1,0.45\n2,0.41\n")
    assert stuck_at_baseline(history, "val_tgs_iou_map", {"empty": 0.41}) == []
    assert stuck_at_baseline(tmp_path / "absent.csv", "val_tgs_iou_map", {}) == []
