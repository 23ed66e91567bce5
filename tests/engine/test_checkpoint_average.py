"""``train.average_checkpoints``: ``averaged.keras`` holds the mean of the chosen epochs' weights
(recorded independently at each epoch's end), its BatchNorm statistics are the mean of the batch
statistics of training batches under the averaged weights, and it is scored and loadable."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recorders import EpochEndWeights  # noqa: E402
from test_fit import history_rows, tiny_config  # noqa: E402

from kseg.engine.averaging import batch_images, batchnorm_layers, chosen_epochs  # noqa: E402
from kseg.engine.fit import train  # noqa: E402
from kseg.tasks.base import get_task, load_run  # noqa: E402


def trainable(model) -> dict[str, np.ndarray]:
    return {v.path: keras.ops.convert_to_numpy(v.value) for v in model.trainable_variables}


def test_chosen_epochs():
    scores = {0: 0.1, 1: 0.5, 2: float("nan"), 3: 0.3, 4: 0.5}
    assert chosen_epochs(scores, 2, "last") == [3, 4]
    assert chosen_epochs(scores, 2, "best") == [1, 4]
    assert chosen_epochs(scores, 3, "best") == [1, 3, 4]  # never the unscored epoch
    with pytest.raises(ValueError):
        chosen_epochs(scores, 2, "worst")


@pytest.mark.parametrize("average_from", ["last", "best"])
def test_the_averaged_checkpoint_is_the_mean_of_the_chosen_epochs(demo_root, tmp_path, average_from):
    recorder = EpochEndWeights()
    cfg = tiny_config(demo_root, tmp_path, "train.epochs=4", "train.average_checkpoints=2",
                      f"train.average_from={average_from}", "train.mixed_precision=off",
                      "model.args.batch_norm=true")
    result = train(cfg, extra_callbacks=[recorder])
    run = result.run_dir
    scores = [float(r["val_iou_map"]) for r in history_rows(run)]
    if average_from == "last":
        chosen = [2, 3]
    else:
        chosen = sorted(sorted(range(4), key=lambda e: (-scores[e], -e))[:2])
    results = json.loads((run / "results.json").read_text())
    assert results["averaged"]["epochs"] == chosen
    assert sorted(p.name for p in (run / "epochs").glob("*.h5")) == [f"epoch-{e:04d}.weights.h5" for e in chosen]

    averaged = load_run(run, checkpoint="averaged")
    saved = trainable(averaged.model)
    assert len(saved) == len(recorder.epochs[0])
    for key, value in saved.items():
        expected = np.mean([recorder.epochs[e][key] for e in chosen], axis=0)
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-7, err_msg=key)

    # BatchNorm: the first layer's moving mean is the mean over the training batches of its input's
    # batch mean, under the averaged weights (earlier layers use batch statistics in training mode).
    model = averaged.model
    first = batchnorm_layers(model)[0]
    probe = keras.Model(model.inputs, first.input)
    task = get_task(cfg)
    ids, strata = task.prepare()
    from kseg.data.split import split_ids

    train_ids, valid_ids = split_ids(cfg, ids, strata)
    batches = task.build(train_ids, valid_ids).batches
    batches.set_epoch(0)  # the first epoch's batches, as the recomputation uses
    count = results["averaged"]["batchnorm_batches"]
    assert count == len(batches) == 2
    expected_mean = np.mean([keras.ops.convert_to_numpy(probe(batch_images(batches[i]), training=True)).mean(axis=(0, 1, 2))
                             for i in range(count)], axis=0)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(first.moving_mean), expected_mean, rtol=1e-4, atol=1e-5)
    assert 0.0 <= results["averaged"]["score"] <= 1.0
