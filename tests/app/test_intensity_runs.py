"""The intensity policy travels with the run: ``submit`` and ``predict`` decode a test image exactly
as training decoded the same file, for every family, and runs saved before the policy existed
keep the decoding they were trained with (16-bit shifted right by 8 bits)."""

from __future__ import annotations


import cv2
import numpy as np
import pytest
from fixtures_datasets import nuclei_12bit, paired_12bit

from kseg.app.predict import open_prediction
from kseg.core.runs import run_config
from kseg.io.readers import open_dataset

FAMILIES = ("unet", "ssd", "maskrcnn")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", ["auto", "percentile"])
def test_test_images_decode_as_the_training_images_did(family, policy, tmp_path, golden_run, assert_read_as_trained):
    images, masks = paired_12bit(tmp_path / "data", n=2)
    training = open_dataset("paired", images, masks, intensity=policy)  # what preprocessing reads
    submission, _ = open_prediction([golden_run(tmp_path, family, "intensity", policy)])
    assert_read_as_trained(training, submission, images)
    trained_on = training.load(training.ids()[-1]).image
    assert len(np.unique(trained_on)) > 16  # more than a 12-bit image keeps after ">> 8"


def test_runs_saved_before_the_policy_keep_their_decoding(tmp_path, golden_run):
    run = golden_run(tmp_path, "unet", "intensity", None)
    assert run_config(run).preprocess.intensity == "uint8"
    image, _ = nuclei_12bit()
    path = tmp_path / "test.png"
    assert cv2.imwrite(str(path), image)
    submission, _ = open_prediction([run])
    np.testing.assert_array_equal(submission.read(path)[..., 0], image >> 8)
