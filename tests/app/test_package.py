"""kseg as an installed package: the wheel builds, installs with --no-deps into a fresh virtual
environment (which sees the project's installed dependencies through a .pth file), and from an
unrelated empty working directory the ``kseg`` command writes the demo, trains, submits to an
exact path and predicts masks, writing nothing into the source tree."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import cv2
import pytest

ROOT = Path(__file__).resolve().parents[2]
SKIPPED_IN_LISTING = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis"}

pytestmark = pytest.mark.slow


def source_listing() -> dict[str, tuple[int, int]]:
    """Every file of the source tree (but git's and caches) with its size and modification time."""
    listing = {}
    for folder, names, files in os.walk(ROOT):
        names[:] = [n for n in names if n not in SKIPPED_IN_LISTING]
        for name in files:
            path = Path(folder) / name
            stat = path.stat()
            listing[str(path.relative_to(ROOT))] = (stat.st_size, stat.st_mtime_ns)
    return listing


def copy_sources(target: Path) -> None:
    """The tracked files (what a clone holds), so building leaves nothing in the checkout."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False)
    if tracked.returncode != 0:
        shutil.copytree(ROOT, target, ignore=shutil.ignore_patterns(*SKIPPED_IN_LISTING, "runs", "cache", "data"))
        return
    for name in tracked.stdout.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)


def run(command, cwd, env, timeout=600):
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_the_wheel_installs_and_runs_from_an_empty_folder(tmp_path):
    before = source_listing()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KSEG_HOME")}

    source = tmp_path / "src"
    copy_sources(source)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
         str(source)], cwd=tmp_path, env=env)
    (wheel,) = (tmp_path / "dist").glob("kseg-*.whl")

    environment = tmp_path / "env"
    venv.create(environment, with_pip=False, system_site_packages=False)
    python = environment / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=tmp_path, env=env).strip())
    (site / "project-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # As in an internet-off notebook: from a folder of wheels, no index, the image's own dependencies.
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-index", "--find-links",
         str(wheel.parent), "--no-deps", "kseg"], cwd=tmp_path, env=env)

    work = tmp_path / "work"
    work.mkdir()
    located = run([str(python), "-c", "import kseg, kseg.rle, sys; print(kseg.__file__); "
                   "print('keras' in sys.modules)"], cwd=work, env=env).split()
    assert Path(located[0]).resolve().is_relative_to(environment.resolve()), located
    assert located[1] == "False", "import kseg.rle must not import Keras"
    kseg = str(environment / "bin" / "kseg")
    assert run([kseg, "--version"], cwd=work, env=env).startswith("kseg ")

    run([kseg, "demo-data", "--out", "data/demo"], cwd=work, env=env)
    run([kseg, "train", "--set", "train.epochs=1", "--set", "train.steps_per_epoch=2", "--set", "train.verbose=0",
         "--set", "model.args.depth=2", "--set", "model.args.base_filters=4", "--set", "preprocess.n_jobs=1"],
        cwd=work, env=env, timeout=900)
    (run_dir,) = (work / "runs").iterdir()
    assert (run_dir / "best.keras").is_file() and (work / "cache").is_dir()
    assert (work / "data" / "demo").is_dir()

    out = work / "out"
    run([kseg, "submit", "--output", str(out / "submission.csv"), "--quiet"], cwd=work, env=env)
    with open(out / "submission.csv") as f:
        rows = list(csv.DictReader(f))
    test_ids = sorted(p.name for p in (work / "data" / "demo" / "stage1_test").iterdir())
    assert sorted({r["ImageId"] for r in rows}) == test_ids  # written, and it validated (exit 0)
    assert not (work / "submissions").exists(), "--output writes exactly that file"

    run([kseg, "predict", "--input", "data/demo/stage1_test", "--output", str(out / "masks"), "--quiet"],
        cwd=work, env=env)
    for image_id in test_ids:
        image = cv2.imread(str(work / "data" / "demo" / "stage1_test" / image_id / "images" / f"{image_id}.png"))
        mask = cv2.imread(str(out / "masks" / f"{image_id}.png"), cv2.IMREAD_UNCHANGED)
        assert mask is not None and mask.shape == image.shape[:2], image_id

    after = source_listing()
    assert after == before, f"written into the source tree: {sorted(set(after.items()) ^ set(before.items()))[:10]}"
