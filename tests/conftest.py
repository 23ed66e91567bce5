"""Shared fixtures: the optional real data beside the project, and test markers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("KSEG_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs (seconds to minutes); CI runs them too")
    config.addinivalue_line("markers", "jax: runs Keras on the JAX backend in a subprocess")


@pytest.fixture(params=["library", "portable"])
def kernels(request):
    """Run a test with TensorFlow's detector kernels ("library") and with the keras.ops twins
    ("portable"): both must match the test's reference (kseg.nn.kernels chooses between them)."""
    from kseg.nn.kernels import library_kernels, portable_kernels

    if request.param == "portable":
        with portable_kernels():
            assert not library_kernels()
            yield request.param
    else:
        assert library_kernels()
        yield request.param


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real public data folder (../shared/data); skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (it sits beside the project in CI)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A tiny synthetic demo competition (10 training, 2 test images) shared by the end-to-end
    training tests, which read it and write their caches and runs elsewhere."""
    from kseg.io.demo import write_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    write_demo_dataset(root, seed=3, n_train=10, n_test=2)
    return root


@pytest.fixture
def golden_run():
    """``copy(folder, family, key, value)``: a copy of a committed golden run (``tests/golden``) in
    ``folder`` whose config.yaml says ``preprocess.<key>: value``, or says nothing of the key when
    ``value`` is None (as runs saved before the key existed)."""
    import shutil

    import yaml

    from kseg.core.runs import CONFIG

    def copy(folder: Path, family: str, key: str, value) -> Path:
        run = Path(folder) / family
        shutil.copytree(Path(__file__).resolve().parent / "golden" / family, run)
        saved = yaml.safe_load((run / CONFIG).read_text())
        assert key not in saved["preprocess"]
        if value is not None:
            saved["preprocess"][key] = value
            (run / CONFIG).write_text(yaml.safe_dump(saved, sort_keys=False))
        return run

    return copy


@pytest.fixture
def assert_read_as_trained():
    """``check(training, submission, images)``: every image of the ``training`` reader (one grey
    channel) is what ``submission.read`` gives for its file in ``images``, on each channel (detectors
    replicate grey to their input channels)."""
    import numpy as np

    def check(training, submission, images: Path) -> None:
        for sample_id in training.ids():
            trained_on = training.load(sample_id).image
            predicted_from = submission.read(images / f"{sample_id}.png")
            assert trained_on.shape[-1] == 1
            for channel in range(predicted_from.shape[-1]):
                np.testing.assert_array_equal(predicted_from[..., channel], trained_on[..., 0])

    return check


@pytest.fixture(scope="session")
def keras_hub():
    return pytest.importorskip("keras_hub")


@pytest.fixture(scope="session")
def presets(keras_hub, tmp_path_factory):
    """``presets(family)``: a local preset folder of a tiny keras-hub backbone (``tests/hub_presets.py``)."""
    from hub_presets import PresetFolders

    return PresetFolders(keras_hub, tmp_path_factory.mktemp("presets"))
