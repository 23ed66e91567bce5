"""Uploading a validated CSV with the kaggle command-line tool.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from kseg.core.errors import ConfigError, KsegError
from kseg.core.log import get_logger


def kaggle_submit(csv_path: str | Path, competition: str | None, message: str) -> bool:
    """Upload with the kaggle CLI (``kaggle competitions submit``) when it is installed.

    The user asked for an upload, so a missing kaggle command and a failed upload both raise (the
    command exits non-zero); the CSV is valid and kept either way.
    """
    executable = shutil.which("kaggle")
    if executable is None:
        raise KsegError(f"KAGGLE=1 but there is no kaggle command on the PATH (pip install kaggle); {csv_path} "
                        "is written and valid but not uploaded")
    if not competition:
        raise ConfigError("KAGGLE=1 needs submission.competition (the competition's URL slug) in the config")
    result = subprocess.run([executable, "competitions", "submit", "-c", competition, "-f", str(csv_path),
                             "-m", message], check=False)
    if result.returncode != 0:
        raise KsegError(f"kaggle competitions submit exited with status {result.returncode}")
    get_logger("submission").info(f"uploaded {csv_path} to {competition}")
    return True
