"""experiments/pretrain.ipynb opened from experiments/ (as JupyterLab does) writes its run under the repo root, like a
papermill run from the root; and the tracked notebook carries only the metadata `nbdev_clean` leaves."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
NB = ROOT / "experiments" / "pretrain.ipynb"


def _setup_code() -> str:
    "The parameters cell and the set-up cell (config, paths), as the notebook runs them."
    cells = [c for c in json.loads(NB.read_text())["cells"] if c["cell_type"] == "code"]
    assert "parameters" in cells[0]["metadata"].get("tags", [])
    return (
        "".join(cells[0]["source"])
        + "\n"
        + "".join(cells[1]["source"])
        + "\nprint('OUT', run_dir.resolve())\n"
    )


def test_relative_output_dir_is_taken_from_the_repo_root(tmp_path):
    repo = tmp_path / "checkout"  # a checkout: settings.ini + experiments/
    (repo / "experiments").mkdir(parents=True)
    (repo / "settings.ini").write_text("[DEFAULT]\nlib_name = maskedclip\n")
    code = _setup_code()
    for cwd in (repo / "experiments", repo):  # JupyterLab's cwd, papermill's cwd
        r = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        out = [l for l in r.stdout.splitlines() if l.startswith("OUT ")][-1][4:]
        assert Path(out) == (repo / "runs" / "pretrain").resolve(), (cwd, out)
    absolute = code.replace(
        'output_dir = "runs/pretrain"', f"output_dir = {str(tmp_path / 'elsewhere')!r}", 1
    )
    r = subprocess.run(
        [sys.executable, "-c", absolute],
        cwd=repo / "experiments",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == f"OUT {(tmp_path / 'elsewhere').resolve()}"


def test_tracked_notebook_metadata_is_clean():
    nb = json.loads(NB.read_text())
    assert nb["metadata"] == {
        "kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}
    }
    assert all(
        c.get("execution_count") is None and not c.get("outputs")
        for c in nb["cells"]
        if c["cell_type"] == "code"
    )
