"experiments/mlip_study.py (issue 18): its own statistic (Wilson interval; the partial correlation is the library's, tested in 12_segmentation) and --quick."

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _study():
    spec = importlib.util.spec_from_file_location("mlip_study", ROOT / "experiments" / "mlip_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_wilson_interval():
    st = _study()
    lo, hi = st.wilson(6, 374)
    # reference value of the Wilson score interval for 6 / 374 (z = 1.96)
    p, n, z = 6 / 374, 374, 1.959964
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert abs(lo - (c - h)) < 1e-12 and abs(hi - (c + h)) < 1e-12 and lo < p < hi


@pytest.mark.slow
def test_study_quick(tmp_path):
    out = tmp_path / "study"
    r = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "mlip_study.py"), "--out", str(out), "--quick"]
        + ["--methods", "mlip", "random"],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    kinds = {(x["encoder"], x["kind"]) for x in rows}
    for k in ("diagnostics", "segmentation", "pointing_game", "ot_heldout", "ot_training", "layers"):
        assert ("mlip", k) in kinds and ("random", k) in kinds
    assert ("mlip", "phi") in kinds and ("mlip", "term_attribution") in kinds
    table = (out / "table.md").read_text()
    assert "Few-shot red-lesion segmentation" in table and "partial r given radius" in table
    prov = json.loads((out / "provenance.json").read_text())
    assert all("commit" in v and "command" in v for v in prov["invocations"].values())
