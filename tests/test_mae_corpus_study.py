"""experiments/mae_corpus_study.py (issue 23): D41's seed-mean verdicts and the scores file, against an independent
reference (scikit-learn's AUROC on the same bootstrap resamples)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]


def _study():
    sys.path.insert(0, str(ROOT / "experiments"))
    spec = importlib.util.spec_from_file_location(
        "mae_corpus_study", ROOT / "experiments" / "mae_corpus_study.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _frame(gains, seeds=(10, 11, 12, 13, 14), n=(600, 400), seed=0):
    "A probe frame like evaluate_all(keep_scores=True)'s: binary task, one score matrix per method and seed."
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n)
    rows, scores = [], {}
    for name, gain in gains.items():
        for s in seeds:
            p = rng.normal(gain * y, 1.0)
            scores[(name, "glaucoma", 0.1, s, "test")] = (y, np.stack([-p, p], 1))
            rows.append(dict(method=name, task="glaucoma", fraction=0.1, seed=s, test_set="test", auroc=0.0))
    df = pd.DataFrame(rows)
    df.attrs["scores"] = scores
    return df


def test_seed_mean_verdicts_match_reference_and_save_scores(tmp_path):
    study = _study()
    from maskedclip.evaluate import bootstrap_indices

    df = _frame({"random init": 0.1, "mae": 0.5})
    res = study._seed_mean_verdicts(df, tmp_path / "scores.npz")
    prim, two = res["test_bootstrap"][0], res["two_level"][0]
    assert prim["separated"] and prim["n_draws"] == 5
    # reference: the same stratified resamples, scikit-learn's AUROC per draw, mean over draws, percentiles
    sc = df.attrs["scores"]
    y = sc[("mae", "glaucoma", 0.1, 10, "test")][0]
    idx = bootstrap_indices(y, 1000, 0)
    for name, lo, hi in (
        ("mae", "method_ci_low", "method_ci_high"),
        ("random init", "baseline_ci_low", "baseline_ci_high"),
    ):
        per = np.array(
            [
                [roc_auc_score(y[r], sc[(name, "glaucoma", 0.1, s, "test")][1][r, 1]) for r in idx]
                for s in range(10, 15)
            ]
        )
        ql, qh = np.quantile(per.mean(0), [0.025, 0.975])
        assert abs(prim[lo] - ql) < 1e-4 and abs(prim[hi] - qh) < 1e-4
    assert (
        two["method_ci_high"] - two["method_ci_low"] >= prim["method_ci_high"] - prim["method_ci_low"] - 1e-4
    )
    z = np.load(tmp_path / "scores.npz")
    assert len(z.files) == 2 * 10 and np.array_equal(z["mae|glaucoma|0.1|12|test|labels"], y)
    assert np.array_equal(
        z["random_init|glaucoma|0.1|14|test|scores"], sc[("random init", "glaucoma", 0.1, 14, "test")][1]
    )


def test_seed_mean_verdict_not_separated_without_a_gain(tmp_path):
    study = _study()
    res = study._seed_mean_verdicts(_frame({"random init": 0.3, "mae": 0.3}, seed=1), tmp_path / "s.npz")
    assert not res["test_bootstrap"][0]["separated"] and not res["two_level"][0]["separated"]


def test_study_flags(capsys):
    import pytest

    study = _study()
    with pytest.raises(SystemExit):
        study.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--n-test", "--pretrain-seed", "--corpus-prior", "--overrides", "--workers", "--seeds"):
        assert flag in out
    assert "D41" in study.__doc__
