"""Atomic writes: an interrupted write leaves the old file intact and no temporary behind."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kseg.core.fileio import atomic_path, atomic_save_npz, atomic_write_text


def test_write_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "a.csv"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.csv"]


def test_failure_keeps_the_previous_file(tmp_path):
    target = tmp_path / "a.csv"
    target.write_text("complete")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "complete"
    assert [p.name for p in tmp_path.iterdir()] == ["a.csv"]


def test_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.csv", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.csv").stat().st_mode & 0o777 == 0o644


def test_npz_round_trip(tmp_path):
    atomic_save_npz(tmp_path / "a.npz", image=np.arange(6, dtype=np.uint8).reshape(2, 3))
    with np.load(tmp_path / "a.npz") as data:
        np.testing.assert_array_equal(data["image"], np.arange(6).reshape(2, 3))
