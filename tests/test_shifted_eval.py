"""The shifted test set and the evaluation machinery of issue 16: every model scored on in-distribution and shifted
test sets, parallel workers that do not change a number, the fine-tuning budget, side-by-side tables."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from maskedclip.synthetic import (
    SHIFTED_SPLIT,
    ShiftedAcquisition,
    build_corpus,
    image_statistics,
    make_sample,
    make_shifted_sample,
)


def test_shifted_sample_keeps_the_findings_and_changes_the_camera():
    for i in range(3):
        a, b = make_sample(0, 200_000_000 + i, 64), make_shifted_sample(0, 200_000_000 + i, 64)
        assert a.findings.labels == b.findings.labels and a.report == b.report
        assert a.image.shape == b.image.shape == (64, 64, 3) and not np.array_equal(a.image, b.image)
        sa, sb = image_statistics(a.image), image_statistics(b.image)
        assert sb["texture"] < sa["texture"]  # lower resolution + more blur: less fine detail
        big = [l for l in b.findings.lesions if l.kind != "drusen"]
        small = [l for l in a.findings.lesions if l.kind != "drusen"]
        assert all(abs(lb.rx - 1.4 * la.rx) < 1e-9 for la, lb in zip(small, big))
    with pytest.raises(ValueError, match="resolution"):
        ShiftedAcquisition(resolution=0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("shift") / "corpus"
    return build_corpus(
        root, n_paired=4, n_unpaired=4, n_task_per_split=40, n_shifted_test=40, progress=False, num_workers=1
    )


def test_corpus_adds_a_shifted_split_and_leaves_the_rest_unchanged(corpus, tmp_path):
    plain = build_corpus(tmp_path / "plain", n_paired=4, n_unpaired=4, n_task_per_split=40, progress=False)
    for task in ("glaucoma", "dr_grade"):
        for split in ("train", "val", "test"):
            assert (corpus / "tasks" / task / f"{split}.jsonl").read_text() == (
                plain / "tasks" / task / f"{split}.jsonl"
            ).read_text()
        recs = [
            json.loads(l)
            for l in (corpus / "tasks" / task / f"{SHIFTED_SPLIT}.jsonl").read_text().splitlines()
        ]
        assert len(recs) == 40 and all(r["split"] == "test" and SHIFTED_SPLIT in r["id"] for r in recs)
        assert not (plain / "tasks" / task / f"{SHIFTED_SPLIT}.jsonl").exists()
    first = json.loads((corpus / "tasks" / "glaucoma" / "test.jsonl").read_text().splitlines()[0])
    assert (corpus / first["image"]).read_bytes() == (plain / first["image"]).read_bytes()
    meta = json.loads((corpus / "corpus.json").read_text())
    assert (
        meta["counts"]["tasks"]["glaucoma"][SHIFTED_SPLIT] == 40
        and meta["shifted_acquisition"]["resolution"] == 0.75
    )
    assert (
        meta["shifted_acquisition"]
        and json.loads((plain / "corpus.json").read_text())["shifted_acquisition"] is None
    )


def test_evaluate_all_scores_every_test_set_and_workers_change_nothing(corpus, one_thread):
    from maskedclip.config import get_preset
    from maskedclip.evaluate import evaluate_all

    vc = get_preset("tiny").vision
    kw = dict(
        vision_config=vc,
        n_boot=30,
        progress=False,
        log=None,
        test_splits=("test", SHIFTED_SPLIT),
        fraction_seeds={1.0: [0]},
    )
    ft = dict(epochs=6, batch_size=8, max_steps=8, n_evals=2)
    one = evaluate_all(
        {"random": "random", "other": "random:tiny"},
        ["glaucoma"],
        [0.5, 1.0],
        [0, 1],
        "finetune",
        corpus,
        finetune_kw=ft,
        **kw,
    )
    two = evaluate_all(
        {"random": "random", "other": "random:tiny"},
        ["glaucoma"],
        [0.5, 1.0],
        [0, 1],
        "finetune",
        corpus,
        finetune_kw=ft,
        workers=2,
        **kw,
    )
    assert one.drop(columns="seconds").equals(two.drop(columns="seconds"))
    # 2 sources x (2 seeds at 50 % + 1 seed at 100 %) x 2 test sets
    assert len(one) == 2 * 3 * 2 and set(one["test_set"]) == {"test", SHIFTED_SPLIT}
    assert sorted(one[one["fraction"] == 1.0]["seed"].unique()) == [0]
    pair = one[(one["method"] == "random") & (one["fraction"] == 0.5) & (one["seed"] == 0)]
    assert (
        list(pair["test_set"]) == ["test", SHIFTED_SPLIT] and pair["selected"].nunique() == 1
    )  # one model, two test sets
    assert (one["n_test"] == 40).all()
    lp = evaluate_all({"random": "random"}, ["glaucoma"], [1.0], [0], "linear_probe", corpus, **kw)
    assert list(lp["test_set"]) == ["test", SHIFTED_SPLIT] and lp["selected"].nunique() == 1
    with pytest.raises(ValueError, match="test_splits"):
        evaluate_all(
            {"random": "random"},
            ["glaucoma"],
            [1.0],
            [0],
            "linear_probe",
            corpus,
            vision_config=vc,
            test_splits=("val",),
        )


def test_finetune_budget_caps_steps_and_validation_reads():
    from maskedclip.evaluate import finetune

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(40, 3, 64, 64, generator=g) * 255).to(torch.uint8)
    y = np.arange(40) % 2
    split = (x, y)
    r = finetune(
        "random:tiny",
        {"train": split, "val": split, "test": split},
        epochs=50,
        batch_size=8,
        warmup_epochs=10,
        max_steps=20,
        n_evals=2,
        n_boot=10,
        progress=False,
        more_tests={"again": split},
    )
    d = r.details
    assert (
        d["epochs"] == 4 and d["steps"] == 20 and d["warmup_steps"] == 4
    )  # 5 steps per epoch; warm-up keeps 1/5
    assert [h["epoch"] for h in d["history"]] == [1, 4] and d["n_evals"] == 2
    again = d["more_tests"]["again"]
    assert (
        np.allclose(again.scores, r.scores) and again.auroc == r.auroc
    )  # the same weights on the same images
    full = finetune(
        "random:tiny",
        {"train": split, "val": split, "test": split},
        epochs=2,
        batch_size=8,
        n_boot=10,
        progress=False,
    )
    assert [h["epoch"] for h in full.details["history"]] == [1, 2] and full.details["steps"] == 10


def test_side_by_side_tables_put_the_shifted_column_beside_each_task():
    import pandas as pd

    from maskedclip.evaluate import side_by_side, table1, table2

    rows = []
    for m, base in (("mae_clip", 0.6), ("mae_clip_bridge", 0.65), ("maskedclip", 0.7)):
        for task in ("glaucoma", "dr_grade"):
            for seed in (0, 1):
                for ts, drop in (("test", 0.0), ("test_shifted", 0.1)):
                    rows.append(
                        dict(
                            method=m,
                            task=task,
                            fraction=0.1,
                            seed=seed,
                            protocol="finetune",
                            test_set=ts,
                            auroc=base - drop + 0.01 * seed,
                            auprc=0.5,
                        )
                    )
    df = pd.DataFrame(rows)
    t = side_by_side(table1, df, 0.1, "finetune", metrics=("auroc",))
    assert list(t.values.columns) == [
        ("glaucoma", "in-distribution", "AUROC"),
        ("glaucoma", "shifted", "AUROC"),
        ("dr_grade", "in-distribution", "AUROC"),
        ("dr_grade", "shifted", "AUROC"),
    ]
    assert abs(t.values.loc["MaskedCLIP", ("glaucoma", "shifted", "AUROC")] - 0.605) < 1e-9
    assert "test sets: in-distribution, shifted" in t.caption and "**0.705 ± 0.007**" in t.markdown
    t2 = side_by_side(table2, df, fraction=0.1, protocol="finetune", metrics=("auroc",))
    assert ("mean", "shifted", "AUROC") in t2.values.columns
    assert abs(table1(df, 0.1, "finetune", test_set="test_shifted").values.iloc[0, 0] - 0.505) < 1e-9


def test_eval_cli_scores_the_shifted_split(corpus, tmp_path, one_thread):
    import pandas as pd

    from maskedclip.evaluate import main

    rc = main(
        [
            "--checkpoint",
            "random=random:tiny",
            "--corpus",
            str(corpus),
            "--tasks",
            "glaucoma",
            "--fractions",
            "100%",
            "--seeds",
            "0",
            "--protocol",
            "finetune",
            "--epochs",
            "3",
            "--max-steps",
            "4",
            "--n-evals",
            "1",
            "--batch-size",
            "16",
            "--test-splits",
            "test",
            SHIFTED_SPLIT,
            "--n-boot",
            "20",
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert rc == 0
    df = pd.read_csv(tmp_path / "out" / "results.csv")
    assert (
        list(df["test_set"]) == ["test", SHIFTED_SPLIT]
        and (tmp_path / "out" / f"table1_100pct_{SHIFTED_SPLIT}.md").is_file()
    )
    assert (
        json.loads(df["selected"][0])["best_epoch"] == 1
    )  # 3 steps per epoch (40 images / 16), so a 4-step cap leaves 1 epoch
