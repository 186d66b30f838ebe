"Provenance shared by the experiment scripts (`mlip_study.py`, `mae_corpus_study.py`): git output of this repository."

from __future__ import annotations

import subprocess
from pathlib import Path


def git(*args) -> str:
    "Stripped stdout of `git *args` run in this repository; 'unknown' when git or the repository is unavailable."
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except Exception:
        return "unknown"
