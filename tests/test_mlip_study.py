"experiments/mlip_study.py (issue 18): its own statistics (Wilson and Fisher-z intervals; the partial correlation is the library's, tested in 12_segmentation) and --quick."

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


def test_fisher_interval_matches_scipy():
    "The study's Fisher-z interval of a (partial) correlation against scipy's interval of Pearson's r."
    import numpy as np
    from scipy.stats import pearsonr

    st = _study()
    x = np.random.default_rng(0).normal(size=(2, 40))
    r = pearsonr(x[0], x[0] + x[1])
    ref = r.confidence_interval(0.95)
    lo, hi = st.fisher_ci(r.statistic, 40, k=0)
    assert abs(lo - ref.low) < 1e-6 and abs(hi - ref.high) < 1e-6
    # k controlled regressors cost k points: the partial correlation's interval is the plain one over n - k
    assert st.fisher_ci(0.3, 54, k=2) == st.fisher_ci(0.3, 52, k=0)
    assert all(math.isnan(v) for v in st.fisher_ci(1.0, 54) + st.fisher_ci(0.3, 5))


def _run_study(out, *args) -> subprocess.CompletedProcess:
    "`experiments/mlip_study.py --out OUT --quick ARGS` in a fresh interpreter."
    return subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "mlip_study.py"), "--out", str(out), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=1200,
    )


@pytest.mark.slow
def test_study_quick(tmp_path):
    out = tmp_path / "study"
    r = _run_study(out, "--methods", "mlip", "random")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    by = {(x["encoder"], x["kind"]): x for x in rows}
    for k in ("diagnostics", "segmentation", "pointing_game", "ot_heldout", "ot_training", "layers"):
        assert ("mlip", k) in by and ("random", k) in by
    for k in ("zero_shot", "diag_over_training", "phi", "term_attribution"):
        assert ("mlip", k) in by
    for e in ("mlip", "random"):
        d = by[(e, "diagnostics")]
        assert -1 <= d["encoder_patch_cos"] <= 1 and 1 <= d["encoder_erank"] <= d["n_tokens"]
        seg = by[(e, "segmentation")]["runs"]
        assert sorted(r["fraction"] for r in seg) == [0.01, 0.1, 1.0]
        assert all(
            0 <= r["dice_pooled"] <= 1 and r["dice_pooled_ci"][0] <= r["dice_pooled_ci"][1] for r in seg
        )
        o = by[(e, "ot_heldout")]
        assert (
            o["n_batches"] == 2
            and o["chance_top1"] == 1 / 8
            and o["matched"][1] <= o["matched"][0] <= o["matched"][2]
        )
        lay = by[(e, "layers")]["rows"]
        assert [r["layer"] for r in lay][0] == "patch_embed+pos" and lay[-1]["layer"] == "final_norm"
    assert {r["task"] for r in by[("mlip", "zero_shot")]["rows"]} == {"glaucoma", "dr_referral"}
    ph = by[("mlip", "phi")]["history"]
    assert [h["step"] for h in ph][-1] == 2 and "partial_r" in ph[-1]["partial_given_radius"]
    ta = by[("mlip", "term_attribution")]["rows"]
    assert len(ta) == 2 and all({"mim", "mcl", "ot"} <= set(r) for r in ta)
    assert "partial_r_ci" in ph[-1]["partial_given_radius"] and ("corpus", "lesion_map") in by
    # a variant run: its own corpus (angular lesion prior) and a config override, encoders named METHOD+TAG
    r = _run_study(
        out,
        *("--methods", "mlip", "--tag", "v", "--corpus", str(out / "corpus-v")),
        *("--corpus-prior", "lesion_angle_bias=0.8", "--overrides", "model.mlip.lambda_ot=4"),
        *("--kinds", "lesion_map", "phi", "term_attribution"),
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    by = {(x["encoder"], x["kind"]): x for x in rows}
    assert json.loads((out / "corpus-v" / "corpus.json").read_text())["prior"]["lesion_angle_bias"] == 0.8
    assert "lesion_angle_bias" not in json.loads((out / "corpus" / "corpus.json").read_text())["prior"]
    assert (
        ("mlip+v", "phi") in by and ("corpus+v", "lesion_map") in by and ("mlip+v", "segmentation") not in by
    )
    assert all(
        r["ot"]["weight"] == 4 and r["mcl"]["weight"] == 1 for r in by[("mlip+v", "term_attribution")]["rows"]
    )
    table = (out / "table.md").read_text()
    assert "Few-shot red-lesion segmentation" in table and "partial r given radius" in table
    prov = json.loads((out / "provenance.json").read_text())
    assert all("commit" in v and "command" in v for v in prov["invocations"].values())
