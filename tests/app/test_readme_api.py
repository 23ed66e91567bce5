"""The README's notebook example, extracted from README.md when the test runs (not a copy), runs as
written in an empty working directory, and writes nothing outside it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Installed, and in a Kaggle notebook"


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    assert SECTION in text, "the README lost its notebook section"
    block = re.search(r"```python\n(.*?)```", text[text.index(SECTION):], re.S)
    assert block, "no python block in the README's notebook section"
    return block.group(1)


def test_the_example_is_the_readme_block():
    code = readme_example()
    assert "kseg.train(cfg)" in code and "kseg.submit(" in code and "kseg.predict(" in code


@pytest.mark.slow
def test_the_readme_notebook_example_runs_as_written(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "KSEG_HOME"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", readme_example()], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^\d+ test images, \d+ objects in .*submission\.csv$", result.stdout, re.M), result.stdout
    # Everything went into the working directory: the demo data, the cache, the run, the CSV.
    assert (tmp_path / "data" / "demo" / "stage1_test").is_dir()
    assert (tmp_path / "cache").is_dir() and any((tmp_path / "runs").iterdir())
    assert (tmp_path / "submission.csv").is_file()
    lines = (tmp_path / "submission.csv").read_text().splitlines()
    assert lines[0] == "ImageId,EncodedPixels" and len(lines) > 1
