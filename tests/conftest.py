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
