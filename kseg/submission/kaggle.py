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

    Without the executable nothing is uploaded and a warning says so (the CSV is still valid and
    kept); a failed upload raises, since the user asked for one.
    """
    executable = shutil.which("kaggle")
    if executable is None:
        get_logger("submission").warning("warning: KAGGLE=1 but no kaggle command on the PATH (pip install kaggle); "
                                          "not uploaded")
        return False
    if not competition:
        raise ConfigError("KAGGLE=1 needs submission.competition (the competition's URL slug) in the config")
    result = subprocess.run([executable, "competitions", "submit", "-c", competition, "-f", str(csv_path),
                             "-m", message], check=False)
    if result.returncode != 0:
        raise KsegError(f"kaggle competitions submit exited with status {result.returncode}")
    get_logger("submission").info(f"uploaded {csv_path} to {competition}")
    return True
