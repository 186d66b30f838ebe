"The papermill pre-training notebook and the grid runner, headless on CPU."

import json
from pathlib import Path

import pytest

papermill = pytest.importorskip("papermill")
ROOT = Path(__file__).parent.parent
NB = ROOT / "experiments" / "pretrain.ipynb"
TINY = dict(
    steps=3,
    synthetic_n_paired=32,
    synthetic_n_unpaired=32,
    synthetic_n_task=8,
    paired_batch_size=4,
    unpaired_batch_size=4,
    n_pictures=2,
    warmup_steps=1,
)


def _plotly_outputs(nb_path):
    nb = json.loads(Path(nb_path).read_text())
    return [
        o
        for c in nb["cells"]
        if c["cell_type"] == "code"
        for o in c.get("outputs", [])
        if "application/vnd.plotly.v1+json" in o.get("data", {})
    ]


@pytest.mark.two_cores  # two processes / a browser: see tests/conftest.py
@pytest.mark.slow
def test_pretrain_notebook_two_processes(tmp_path):
    out = tmp_path / "pretrain.ipynb"
    run = tmp_path / "run"
    papermill.execute_notebook(
        str(NB), str(out), parameters=dict(TINY, nproc=2, output_dir=str(run)), progress_bar=False
    )
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(
        k in rows[0] for k in ("mim", "lg_clip", "mfd", "lr", "tau")
    )
    log = (run / "train.log").read_text()
    assert "world_size=2" in log and "torch.distributed.run" in log
    figs = _plotly_outputs(out)
    # curves, reconstructions, attention (encoder, rollout, bridge), prompt heatmaps, embedding projection
    assert len(figs) >= 6
    report = (run / "report.html").read_text()
    assert (
        "training curves" in report and "reconstructions" in report and '<script src="http' not in report
    )  # plotly.js inlined
    assert (run / "final" / "model.safetensors").is_file() and (run / "encoder.safetensors").is_file()


def test_invalid_parameter_fails_before_launch(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(papermill.PapermillExecutionError) as e:
        papermill.execute_notebook(
            str(NB),
            str(tmp_path / "bad.ipynb"),
            parameters=dict(TINY, mask_ratio=1.5, output_dir=str(run)),
            progress_bar=False,
        )
    assert "parameter 'mask_ratio'" in str(e.value)
    assert not run.exists()  # nothing was launched or written
    with pytest.raises(papermill.PapermillExecutionError, match="nproc"):
        papermill.execute_notebook(
            str(NB),
            str(tmp_path / "bad2.ipynb"),
            parameters=dict(TINY, nproc=0, output_dir=str(run)),
            progress_bar=False,
        )
    assert not run.exists()


@pytest.mark.slow
def test_grid_runner_one_notebook_and_run_dir_per_point(tmp_path):
    from maskedclip.train import run_grid

    corpus = tmp_path / "corpus"
    dirs = run_grid(
        NB,
        tmp_path / "grid",
        {"method": ["mae", "mlip"]},  # MLIP runs through the same notebook
        base=dict(TINY, steps=1, synthetic_dir=str(corpus)),
    )
    assert [d.name for d in dirs] == ["method=mae", "method=mlip"]
    for d, parts in zip(dirs, ({"mim"}, {"mim", "mcl", "ot"})):
        assert (d / "pretrain.ipynb").is_file()
        row = json.loads((d / "run" / "metrics.jsonl").read_text().splitlines()[-1])
        assert parts <= set(row) and not ({"mim", "lg_clip", "mfd", "mcl", "ot"} - parts) & set(row)
    assert "semantic-integrity weights" in (dirs[1] / "run" / "report.html").read_text()
    assert (corpus / "corpus.json").is_file()  # built once, shared by both points


@pytest.mark.slow
def test_reproduce_notebook_end_to_end_small(tmp_path):
    "experiments/reproduce.ipynb on a toy budget: pre-trains at equal compute, evaluates against random init, writes tables."
    import pandas as pd

    out = tmp_path / "repro"
    out.mkdir()
    params = dict(
        preset="tiny",
        methods=["supervised", "mae", "maskedclip"],
        variants={"maskedclip_teacher_in": ["maskedclip", {"model.mfd_target": "teacher_in"}]},
        steps=2,
        warmup_steps=1,
        paired_batch_size=4,
        unpaired_batch_size=4,
        synthetic_n_paired=32,
        synthetic_n_unpaired=32,
        synthetic_n_task=24,
        synthetic_n_shifted=24,
        corpus_workers=1,
        tasks=["glaucoma"],
        fractions=[0.5, 1.0],
        seeds=[0, 1],
        fraction_seeds={"1.0": [0]},
        label_efficiency_fractions=[0.25],
        label_efficiency_methods=["random", "mae"],
        label_efficiency_seeds=[0],
        finetune_kw={"epochs": 2, "batch_size": 8, "max_steps": 4, "n_evals": 1},
        eval_workers=1,
        n_boot=20,
        launcher="inprocess",
        parallel_runs=1,
        out_dir=str(out),
    )
    papermill.execute_notebook(
        str(ROOT / "experiments" / "reproduce.ipynb"),
        str(out / "reproduce.ipynb"),
        parameters=params,
        progress_bar=False,
    )
    df = pd.read_csv(out / "results.csv")
    assert set(df["method"]) == {
        "random",
        "supervised",
        "mae",
        "maskedclip",
        "maskedclip_teacher_in",
    } and set(df["task"]) == {"glaucoma"}
    assert df["auroc"].between(0, 1).all() and set(df["protocol"]) == {"finetune", "linear_probe"}
    assert (
        set(df["test_set"]) == {"test", "test_shifted"}
        and (df.groupby(["protocol", "test_set"]).size() > 0).all()
    )
    main = df[df["fraction"].isin([0.5, 1.0])]
    # 5 encoders x 2 protocols x (2 seeds at 50 % + 1 at 100 %) x 2 test sets, plus the label-efficiency fine-tunes
    assert len(main) == 5 * 2 * 3 * 2 and len(df[df["fraction"] == 0.25]) == 2 * 1 * 2
    assert (out / "table1_finetune_10pct_side_by_side.md").exists() is False
    side = (out / "table1_finetune_50pct_side_by_side.md").read_text()
    assert "in-distribution" in side and "shifted" in side and "Supervised" in side
    timings = json.loads((out / "timings.json").read_text())
    assert (
        set(timings["pretrain_step_s"]) == {"supervised", "mae", "maskedclip", "maskedclip_teacher_in"}
        and timings["evaluate_s"] > 0
    )
    from maskedclip.train import read_metrics

    assert any(
        "diag/teacher_patch_cos" in r for r in read_metrics(out / "pretrain" / "maskedclip_teacher_in")
    )
    import importlib.util

    spec = importlib.util.spec_from_file_location("mfd_diagnosis", ROOT / "experiments" / "mfd_diagnosis.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([str(out), "--out", str(out / "diag")]) == 0
    diag = json.loads((out / "diag" / "mfd_diagnosis.json").read_text())
    assert (
        set(diag) == {"maskedclip", "maskedclip_teacher_in"}
        and diag["maskedclip_teacher_in"]["last"]["mfd_target_var"] > 0.99
    )
    spec = importlib.util.spec_from_file_location("claims", ROOT / "experiments" / "claims.py")
    claims = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(claims)
    assert claims.main([str(out / "results.csv"), "--out", str(out / "claims.md")]) == 0
    checked = claims.check(df)
    assert set(checked["verdict"]) <= {"holds (separated)", "holds (within CIs)", "does not hold"}
    assert "MaskedCLIP beats random init" in (out / "claims.md").read_text()
    assert _plotly_outputs(out / "reproduce.ipynb")  # the label-efficiency figure
    # equal compute: both runs stopped at the same step with the same batch
    from maskedclip.train import read_metrics

    steps = {m: read_metrics(out / "pretrain" / m)[-1]["step"] for m in ("mae", "maskedclip")}
    assert steps == {"mae": 2, "maskedclip": 2}


@pytest.mark.slow
def test_evaluate_notebook_tables_and_figure(tmp_path):
    "experiments/evaluate.ipynb on a toy corpus: two random encoders through the linear probe; Table 1, no one-step Table 2."
    import pandas as pd

    from maskedclip.synthetic import build_corpus

    corpus = build_corpus(tmp_path / "corpus", n_paired=8, n_unpaired=8, n_task_per_split=24, progress=False)
    out = tmp_path / "eval"
    out.mkdir()
    params = dict(
        checkpoints={"random": "random", "random other seed": "random:tiny"},
        corpus_root=str(corpus),
        tasks=["glaucoma"],
        fractions=[0.5, 1.0],
        seeds=[0, 1],
        n_boot=20,
        out_dir=str(out),
        device="cpu",
    )
    papermill.execute_notebook(
        str(ROOT / "experiments" / "evaluate.ipynb"),
        str(out / "evaluate.ipynb"),
        parameters=params,
        progress_bar=False,
    )
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 2 * 2 * 2 and set(df["method"]) == {"random", "random other seed"}
    assert ((df["ci_low"] <= df["auroc"]) & (df["auroc"] <= df["ci_high"])).all()
    assert (out / "table1_50pct.md").is_file() and (out / "table1_100pct.md").is_file()
    assert not list(out.glob("table2_*"))  # no ablation methods, so no Table 2
    assert _plotly_outputs(out / "evaluate.ipynb")  # the label-efficiency figure
