"maskedclip.evaluate: metrics vs scikit-learn, bootstrap coverage, label fractions, encoder loading, probes, fine-tuning, zero-shot, tables, CLI."

import hashlib
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.preprocessing import label_binarize

from maskedclip.config import VisionConfig, get_preset
from maskedclip.evaluate import (
    ViTClassifier,
    _macro_rows,
    _rank_ap,
    _rank_auc,
    auprc,
    auroc,
    bootstrap_ci,
    bootstrap_indices,
    evaluate_all,
    extract_features,
    finetune,
    fit_linear_probe,
    has_ablation,
    label_efficiency_figure,
    label_fraction,
    linear_probe,
    load_encoder,
    main,
    param_groups_lrd,
    save_results,
    seed_mean_ci,
    table1,
    table2,
    zero_shot,
)
from maskedclip.prompts import class_prompts
from maskedclip.vision import ViTEncoder, timm_vit

TINY_VC = VisionConfig(image_size=32, patch_size=8, width=64, depth=3, heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")  # shared fixture in conftest.py


# ---------------------------------------------------------------- metrics
def _pairwise_auc(pos, s):
    "Independent float64 reference: the fraction of (positive, negative) pairs ordered correctly, ties 1/2."
    p, n = s[pos], s[~pos]
    d = p[:, None] - n[None, :]
    return ((d > 0).sum() + 0.5 * (d == 0).sum()) / d.size


@pytest.mark.parametrize("k", [2, 5])
def test_metrics_agree_with_sklearn(k):
    rng = np.random.default_rng(k)
    y = rng.integers(0, k, 300)
    logits = rng.normal(size=(300, k)) + 1.5 * np.eye(k)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    onehot = label_binarize(y, classes=list(range(k))) if k > 2 else np.stack([1 - y, y], 1)
    # sklearn's own multi-class OvR path (integer labels) is an independent route to the same number
    ref_roc = roc_auc_score(y, p, multi_class="ovr", average="macro") if k > 2 else roc_auc_score(y, p[:, 1])
    assert auroc(y, p) == pytest.approx(ref_roc, abs=1e-12)
    assert auprc(y, p) == pytest.approx(average_precision_score(onehot, p, average="macro"), abs=1e-12)
    assert auroc(y, p) == pytest.approx(
        np.mean([_pairwise_auc(y == c, p[:, c]) for c in range(k)]), abs=1e-12
    )
    # the vectorised rank formulas used by the bootstrap, on resampled rows with many ties
    idx = rng.integers(0, 300, size=(20, 300))
    pr = np.round(p, 2)
    fast_roc = _macro_rows(y[idx], pr[idx], _rank_auc, range(k))
    fast_ap = _macro_rows(y[idx], pr[idx], _rank_ap, range(k))
    ref_ap = [
        average_precision_score(
            label_binarize(y[i], classes=list(range(k))) if k > 2 else np.stack([1 - y[i], y[i]], 1),
            pr[i],
            average="macro",
        )
        for i in idx
    ]
    assert np.allclose(
        fast_roc, [roc_auc_score(np.eye(k)[y[i]], pr[i], average="macro") for i in idx], atol=1e-12
    )
    assert np.allclose(fast_ap, ref_ap, atol=1e-12)


def test_hand_computed_case_and_errors():
    y, s = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert auroc(y, s) == 0.75  # 3 of the 4 positive-negative pairs in order
    assert auprc(y, s) == pytest.approx((1 + 2 / 3) / 2)
    assert auroc([0, 1, 1, 0], [0.5, 0.5, 0.5, 0.5]) == 0.5
    # a class absent from y is left out of the macro average
    p = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])
    assert auroc([0, 1, 0, 1], p) == 1.0
    with pytest.raises(ValueError, match="single class"):
        auroc([1, 1, 1], [0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="ids must lie"):
        auroc([0, 3], np.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="integer class ids"):
        auroc(["a", "b"], [0.1, 0.9])


# ---------------------------------------------------------------- bootstrap
def test_bootstrap_ci_covers_the_true_auc_at_the_nominal_rate():
    "Binormal scores: negatives N(0,1), positives N(d,1) have AUC = Phi(d / sqrt 2); the 95% CI should cover it ~95% of the time."
    d, n, reps = 1.0, 60, 200
    true = norm.cdf(d / math.sqrt(2))
    rng = np.random.default_rng(0)
    covered, widths, estimates = 0, [], []
    for r in range(reps):
        y = np.repeat([0, 1], n)
        s = rng.normal(d * y, 1.0)
        ci = bootstrap_ci(y, s, "auroc", n_boot=500, seed=r)
        assert ci.low <= ci.estimate <= ci.high and ci.n_skipped == 0
        covered += ci.low <= true <= ci.high
        widths.append(ci.high - ci.low)
        estimates.append(ci.estimate)
    assert 0.88 <= covered / reps <= 0.99, covered / reps
    # and the interval has the right width: ~2 x 1.96 x the sampling sd of the AUC across datasets
    ratio = np.mean(widths) / (2 * 1.96 * np.std(estimates, ddof=1))
    assert 0.8 <= ratio <= 1.25, ratio
    assert abs(np.mean(estimates) - true) < 0.01


def test_bootstrap_skips_and_counts_resamples_missing_a_class():
    y = np.array([0] * 18 + [1] * 2)
    s = np.random.default_rng(0).random(20)
    ci = bootstrap_ci(y, s, "auroc", n_boot=400, seed=1, stratified=False)
    # P(a resample of 20 draws misses both positives) = 0.9^20 ≈ 0.12
    assert 0.06 * 400 < ci.n_skipped < 0.2 * 400
    assert bootstrap_ci(y, s, "auroc", n_boot=400, seed=1).n_skipped == 0
    # a callable metric takes the slow path and gives the same interval as the vectorised one
    a = bootstrap_ci(y, s, "auprc", n_boot=100, seed=2)
    b = bootstrap_ci(y, s, auprc, n_boot=100, seed=2)
    assert (a.low, a.high) == pytest.approx((b.low, b.high), abs=1e-12)


@pytest.mark.parametrize("stratified", [True, False])
def test_bootstrap_by_item_counts_equals_scikit_learn_on_each_resample(stratified):
    "The bootstrap reads every resample off item counts (issue 21); scikit-learn on each resample is the reference."
    rng = np.random.default_rng(7)
    y = rng.integers(0, 5, 400)
    s = np.round(rng.random((400, 5)) + 0.8 * np.eye(5)[y], 1)  # rounding makes many ties
    for metric, fn in (("auroc", auroc), ("auprc", auprc)):
        a = bootstrap_ci(y, s, metric, n_boot=60, seed=3, stratified=stratified)
        b = bootstrap_ci(
            y, s, fn, n_boot=60, seed=3, stratified=stratified
        )  # a callable: scikit-learn per resample
        assert (a.estimate, a.low, a.high) == pytest.approx((b.estimate, b.low, b.high), abs=1e-12)
        assert a.n_skipped == b.n_skipped
    draws = [s, np.round(rng.random((400, 5)), 1)]
    ci = seed_mean_ci(y, draws, "auroc", n_boot=40, seed=5)
    idx = bootstrap_indices(y, 40, 5)
    means = [np.mean([auroc(y[r], d[r]) for d in draws]) for r in idx]
    assert (ci.low, ci.high) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])), abs=1e-12)


# ---------------------------------------------------------------- label fractions
def test_label_fraction_is_stratified_seeded_nested():
    labels = (
        ["no DR"] * 700
        + ["mild DR"] * 200
        + ["moderate DR"] * 80
        + ["severe DR"] * 15
        + ["proliferative DR"] * 5
    )
    rng = np.random.default_rng(0)
    labels = list(rng.permutation(labels))
    full = Counter(labels)
    for frac in (0.01, 0.1, 0.5, 1.0):
        idx = label_fraction(labels, frac, seed=3)
        got = Counter(labels[i] for i in idx)
        assert set(got) == set(full) and min(got.values()) >= 1
        for c, n in full.items():
            assert got[c] == min(n, max(1, math.floor(frac * n + 0.5))), (frac, c, got[c])
        assert len(set(idx)) == len(idx)
    assert (
        set(label_fraction(labels, 0.01, 3))
        <= set(label_fraction(labels, 0.1, 3))
        <= set(label_fraction(labels, 0.5, 3))
    )
    assert np.array_equal(label_fraction(labels, 0.1, 3), label_fraction(labels, 0.1, 3))
    assert not np.array_equal(label_fraction(labels, 0.1, 3), label_fraction(labels, 0.1, 4))
    assert np.array_equal(
        label_fraction([{"label": l} for l in labels], 0.1, 3), label_fraction(labels, 0.1, 3)
    )
    with pytest.raises(ValueError, match="fraction"):
        label_fraction(labels, 0.0, 0)
    with pytest.raises(ValueError, match="record 1 has no label"):
        label_fraction([{"label": "a"}, {"label": None}], 0.5, 0)


# ---------------------------------------------------------------- encoders
def _mae_style_state_dict(vc):
    sd = timm_vit(vc).state_dict()
    for k in [k for k in sd if k.startswith("norm.")]:
        del sd[k]  # RETFound-finetune style: no final norm
    sd.update(
        {
            "decoder_embed.weight": torch.randn(16, vc.width),
            "decoder_pos_embed": torch.zeros(1, 17, 16),
            "mask_token": torch.zeros(1, 1, 16),
            "head.weight": torch.randn(5, vc.width),
            "head.bias": torch.zeros(5),
            "fc_norm.weight": torch.ones(vc.width),
        }
    )
    return sd


def test_load_encoder_reports_missing_and_unexpected_by_category(tmp_path):
    sd = _mae_style_state_dict(TINY_VC)
    torch.save({"model": sd, "optimizer": {}, "epoch": 7}, tmp_path / "retfound.pth")
    le = load_encoder(tmp_path / "retfound.pth")
    assert le.kind == "timm_state_dict"
    assert (
        le.vision.width == 64
        and le.vision.depth == 3
        and le.vision.patch_size == 8
        and le.vision.image_size == 32
    )
    assert le.missing_by_category == {"final_norm": ["norm.bias", "norm.weight"]}
    assert le.unexpected_by_category == {
        "mae_decoder": ["decoder_embed.weight", "decoder_pos_embed", "mask_token"],
        "head": ["fc_norm.weight", "head.bias", "head.weight"],
    }
    assert torch.equal(le.encoder.blocks[2].mlp.fc1.weight, sd["blocks.2.mlp.fc1.weight"])
    assert "missing {'final_norm': 2}" in le.summary()
    # an explicit architecture with another image size resamples the position embedding
    le64 = load_encoder(tmp_path / "retfound.pth", vision_config=TINY_VC.replace(image_size=64))
    assert le64.report.resampled and le64.encoder.pos_embed.shape == (1, 65, 64)
    # a shape mismatch is an error naming the tensor
    with pytest.raises(ValueError, match="shape mismatch"):
        load_encoder(tmp_path / "retfound.pth", vision_config=TINY_VC.replace(width=128, heads=2))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_encoder(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="vision_config"):
        load_encoder("random")


def test_load_encoder_from_maskedclip_checkpoint_run_dir_and_export(tmp_path):
    from maskedclip.model import MaskedCLIP

    torch.manual_seed(0)
    m = MaskedCLIP(get_preset("tiny", "mae_clip_bridge"))
    ck = tmp_path / "run" / "checkpoints" / "step_00000004"
    m.save_pretrained(ck)
    (ck / "COMPLETE").write_text("ok\n")
    imgs = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ref = m.image_features(imgs)
    le = load_encoder(tmp_path / "run")  # run dir without final/ -> latest complete checkpoint
    assert (
        le.kind == "maskedclip_checkpoint"
        and le.method == "mae_clip_bridge"
        and le.model_dir == ck
        and le.has_text
    )
    assert le.missing_by_category == {}
    assert set(le.unexpected_by_category) == {"pixel_decoder", "bridge", "text_tower", "clip_head"}
    assert np.allclose(extract_features(le, imgs), ref.numpy(), atol=1e-5)
    # model.safetensors directly, and the exported timm-compatible encoder
    assert np.allclose(extract_features(load_encoder(ck / "model.safetensors"), imgs), ref.numpy(), atol=1e-5)
    m.export_encoder(tmp_path / "enc.safetensors")
    le2 = load_encoder(tmp_path / "enc.safetensors")
    assert le2.kind == "encoder_safetensors" and le2.report.unexpected == {} and le2.report.missing == []
    assert np.allclose(extract_features(le2, imgs), ref.numpy(), atol=1e-5)
    # drop path for fine-tuning rebuilds the encoder with the same weights
    le3 = load_encoder(le2, drop_path=0.2)
    assert le3.vision.drop_path == 0.2 and torch.equal(
        le3.encoder.blocks[0].attn.qkv.weight, le2.encoder.blocks[0].attn.qkv.weight
    )
    with pytest.raises(FileNotFoundError, match="not an encoder source"):
        load_encoder(tmp_path)


# ---------------------------------------------------------------- linear probe
def _band_images(n, size=32, k=2, seed=0, strength=1.5):
    "Class c = a bright horizontal band in the c-th of k stripes, on noise."
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    x = torch.randn(n, 3, size, size, generator=g) * 0.5
    for c in range(k):
        x[y == c, :, c * size // k : (c + 1) * size // k] += strength
    return x, y.numpy()


def test_linear_probe_on_separable_problems():
    rng = np.random.default_rng(0)

    def feats(n):
        y = rng.integers(0, 3, n)
        return rng.normal(size=(n, 24)) + 3.0 * np.eye(24)[y], y  # class c shifted by 3 sd along axis c

    r = fit_linear_probe(feats(90), feats(60), feats(150), n_boot=200)
    assert r.auroc > 0.95 and r.auprc > 0.9 and r.details["C"] in r.details["val_auroc"]
    # the same through a frozen random encoder on images whose class is spatial
    torch.manual_seed(0)
    enc = load_encoder("random", TINY_VC, seed=0)
    r2 = linear_probe(
        enc,
        _band_images(60, strength=3.0),
        _band_images(30, seed=1, strength=3.0),
        _band_images(60, seed=2, strength=3.0),
        n_boot=200,
    )
    assert r2.auroc > 0.95, r2
    assert r2.n_train == 60 and r2.n_test == 60 and r2.scores.shape == (60, 2)


# ---------------------------------------------------------------- fine-tuning
def test_layer_decay_groups_match_the_formula():
    decay, depth = 0.65, TINY_VC.depth
    clf = ViTClassifier(ViTEncoder(TINY_VC), 4)
    groups = param_groups_lrd(clf, weight_decay=0.05, layer_decay=decay)
    seen = {}
    for g in groups:
        for n in g["names"]:
            seen[n] = (g["lr_scale"], g["weight_decay"])
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert set(seen) == trainable and sum(len(g["names"]) for g in groups) == len(trainable)
    L = depth + 1
    for n, p in clf.named_parameters():
        short = n.removeprefix("encoder.")
        if short.startswith(("cls_token", "pos_embed", "patch_embed")):
            lid = 0
        elif short.startswith("blocks."):
            lid = int(short.split(".")[1]) + 1
        else:
            lid = L
        wd = 0.0 if (p.ndim == 1 or short in ("pos_embed", "cls_token")) else 0.05
        assert seen[n] == (pytest.approx(decay ** (L - lid)), wd), n
    assert seen["head.weight"][0] == 1.0 and seen["encoder.patch_embed.proj.weight"][0] == pytest.approx(
        decay**4
    )
    assert isinstance(clf.encoder.norm, torch.nn.Identity) and clf.encoder.pos_embed.requires_grad
    assert 0 < clf.head.weight.abs().max() < 1e-4 and torch.all(clf.head.bias == 0)


def test_finetune_learns_and_selects_on_validation():
    splits = {
        "train": _band_images(48, k=3),
        "val": _band_images(24, k=3, seed=1),
        "test": _band_images(30, k=3, seed=2),
    }
    r = finetune(
        "random", splits, epochs=4, batch_size=16, blr=5e-2, vision_config=TINY_VC, n_boot=100, progress=False
    )
    hist = r.details["history"]
    assert len(hist) == 4 and r.details["best_epoch"] == 1 + int(np.argmax([h["val_auroc"] for h in hist]))
    assert r.auroc > 0.8, r
    assert r.details["lr"] == pytest.approx(5e-2 * 16 / 256)
    # same seed, same result
    r2 = finetune(
        "random", splits, epochs=4, batch_size=16, blr=5e-2, vision_config=TINY_VC, n_boot=100, progress=False
    )
    assert np.allclose(r.scores, r2.scores)


# ---------------------------------------------------------------- zero-shot
class _ArrangedTowers:
    "Text tower: a fixed random unit vector per prompt string. Image tower: the input rows are the embeddings."

    logit_scale = torch.tensor(math.log(50.0))

    def encode_text(self, texts):
        out = []
        for t in texts:
            g = torch.Generator().manual_seed(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16))
            out.append(torch.randn(16, generator=g))
        return F.normalize(torch.stack(out), dim=-1)

    def encode_image(self, x):
        return F.normalize(x.flatten(1), dim=-1)  # "images" (N, 16, 1, 1) are the embeddings


def test_zero_shot_with_arranged_towers_has_the_known_answer():
    towers = _ArrangedTowers()
    classes = ["normal", "diabetic retinopathy", "glaucoma"]
    prompts = class_prompts(classes, domain_knowledge=True)
    proto = torch.stack([towers.encode_text(prompts[c]).mean(0) for c in classes])
    y = np.arange(30) % 3
    g = torch.Generator().manual_seed(0)
    images = proto[y] + 0.05 * torch.randn(
        30, 16, generator=g
    )  # each "image" sits at its class's prompt ensemble
    images = images[:, :, None, None]
    r = zero_shot(towers, images, y, classes, n_boot=100)
    assert r.details["prompts"] == prompts and r.details["prompt_set"] == "flair_domain_knowledge"
    assert r.auroc == 1.0 and (r.scores.argmax(1) == y).all()
    ref = torch.softmax(
        50.0 * F.normalize(images.flatten(1), dim=-1) @ proto.T, -1
    ).numpy()  # no re-normalisation of the ensemble (FLAIR)
    assert np.allclose(r.scores, ref, atol=1e-6)
    # names only: one prompt per class
    r2 = zero_shot(towers, images, y, classes, domain_knowledge=False, n_boot=50)
    assert (
        r2.details["prompts"] == {c: [f"A fundus photograph of {c}"] for c in classes}
        and r2.details["prompt_set"] == "class_names"
    )
    # swapping the class order permutes the score columns accordingly
    r3 = zero_shot(towers, images, (y + 1) % 3, classes[1:] + classes[:1], n_boot=50)
    assert np.allclose(r3.scores, np.roll(r.scores, -1, axis=1), atol=1e-6)


# ---------------------------------------------------------------- the whole pipeline
def _toy_corpus(root: Path, tasks: dict, n=(12, 8, 12), size=32, seed=0):
    from PIL import Image

    from maskedclip.data import write_manifest

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for task, classes in tasks.items():
        for split, m in zip(("train", "val", "test"), n):
            recs = []
            for i in range(m):
                c = i % len(classes)
                a = rng.normal(90, 20, size=(size, size, 3))
                a[c * size // len(classes) : (c + 1) * size // len(classes)] += 100
                name = f"images/{task}-{split}-{i}.png"
                Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(root / name)
                recs.append(
                    dict(
                        id=f"{task}-{split}-{i}",
                        image=name,
                        text=None,
                        label=classes[c],
                        source="toy",
                        split=split,
                    )
                )
            write_manifest(recs, root / "tasks" / task / f"{split}.jsonl")
    (root / "corpus.json").write_text(json.dumps(dict(label_spaces=tasks)))
    return root


def test_evaluate_all_tables_figure_and_cli(tmp_path):
    corpus = _toy_corpus(
        tmp_path / "corpus",
        {"glaucoma": ["no glaucoma", "glaucoma"], "dr_grade": ["no DR", "mild DR", "moderate DR"]},
    )
    sd = _mae_style_state_dict(TINY_VC)
    torch.save(sd, tmp_path / "mae.pth")
    df = evaluate_all(
        {"random": "random", "mae": tmp_path / "mae.pth"},
        tasks=["glaucoma", "dr_grade"],
        fractions=[0.25, 1.0],
        seeds=[0, 1],
        corpus_root=corpus,
        n_boot=100,
        progress=False,
        log=None,
    )
    assert len(df) == 2 * 2 * 2 * 2
    # 25% of 6 per class rounds to 2 (glaucoma), of 4 per class to 1 (dr_grade)
    assert df.groupby(["task", "fraction"])["n_train"].unique().map(list).to_dict() == {
        ("dr_grade", 0.25): [3],
        ("dr_grade", 1.0): [12],
        ("glaucoma", 0.25): [4],
        ("glaucoma", 1.0): [12],
    }
    assert ((df["ci_low"] <= df["auroc"]) & (df["auroc"] <= df["ci_high"])).all()
    assert "final_norm" in df.attrs["load_reports"]["mae"]
    # Table 1: one cell per (method, task, metric); mean ± std over the two seeds; the best in bold
    t = table1(df)
    sub = df[(df["fraction"] == 1.0) & (df["task"] == "dr_grade")]
    means = sub.groupby("method")["auroc"].mean()
    best = "MAE" if means["mae"] >= means["random"] else "Random init"
    assert t.frame.loc[best, ("dr_grade", "AUROC")].startswith("**")
    m, s = means["mae"], sub[sub["method"] == "mae"]["auroc"].std(ddof=1)
    assert t.frame.loc["MAE", ("dr_grade", "AUROC")].strip("*") == f"{m:.3f} ± {s:.3f}"
    assert "<b>" in t.html and t.markdown.startswith("| method |")
    fig = label_efficiency_figure(df)
    assert {tr.name for tr in fig.data} == {"Random init", "MAE"} and len(fig.data) == 4
    paths = save_results(df, tmp_path / "out")
    assert (
        pd.read_csv(paths["csv"]).shape[0] == 16
        and json.loads(paths["json"].read_text())["meta"]["protocol"] == "linear_probe"
    )
    assert (tmp_path / "out" / "table1_25pct.md").is_file() and (
        tmp_path / "out" / "label_efficiency.json"
    ).is_file()
    # the CLI end to end, and a clear error
    assert (
        main(
            [
                "--checkpoint",
                "random",
                "--checkpoint",
                f"mae={tmp_path / 'mae.pth'}",
                "--corpus",
                str(corpus),
                "--tasks",
                "glaucoma",
                "--fractions",
                "50%",
                "100%",
                "--seeds",
                "0",
                "--out",
                str(tmp_path / "cli"),
                "--n-boot",
                "50",
                "--no-progress",
            ]
        )
        == 0
    )
    out = pd.read_csv(tmp_path / "cli" / "results.csv")
    assert out[["method", "fraction"]].values.tolist() == [
        ["random", 0.5],
        ["random", 1.0],
        ["mae", 0.5],
        ["mae", 1.0],
    ]
    # the CLI streams by default (only features in memory); holding the images (--no-stream) gives the same numbers
    assert (
        main(
            [
                "--checkpoint",
                "random",
                "--checkpoint",
                f"mae={tmp_path / 'mae.pth'}",
                "--corpus",
                str(corpus),
                "--tasks",
                "glaucoma",
                "--fractions",
                "50%",
                "100%",
                "--seeds",
                "0",
                "--out",
                str(tmp_path / "cli_stream"),
                "--n-boot",
                "50",
                "--no-progress",
                "--no-stream",
            ]
        )
        == 0
    )
    streamed = pd.read_csv(tmp_path / "cli_stream" / "results.csv")
    assert np.allclose(streamed["auroc"], out["auroc"]) and np.allclose(streamed["ci_low"], out["ci_low"])
    assert (
        main(
            [
                "--checkpoint",
                "a=random",
                "--corpus",
                str(tmp_path / "missing"),
                "--out",
                str(tmp_path / "x"),
                "--no-progress",
            ]
        )
        == 2
    )


def test_table2_orders_the_ablation_and_averages_tasks(tmp_path):
    rows = []
    vals = {"mae_clip": (0.70, 0.72), "mae_clip_bridge": (0.75, 0.77), "maskedclip": (0.80, 0.84)}
    for m, (a, b) in vals.items():
        for task, off in (("glaucoma", 0.0), ("dr_grade", 0.02)):
            for seed, v in ((0, a), (1, b)):
                rows.append(
                    dict(
                        method=m,
                        task=task,
                        fraction=1.0,
                        seed=seed,
                        protocol="linear_probe",
                        auroc=v + off,
                        auprc=v,
                        ci_low=0,
                        ci_high=1,
                    )
                )
    rows.append(
        dict(
            method="random",
            task="glaucoma",
            fraction=1.0,
            seed=0,
            protocol="linear_probe",
            auroc=0.5,
            auprc=0.5,
            ci_low=0,
            ci_high=1,
        )
    )
    t = table2(pd.DataFrame(rows))
    assert list(t.values.index) == [
        "MAE + CLIP (shared encoder)",
        "+ bridge transformer",
        "+ masked feature distillation (MaskedCLIP)",
    ]
    assert t.values.loc["+ bridge transformer", ("mean", "AUROC")] == pytest.approx((0.75 + 0.77) / 2 + 0.01)
    assert (
        t.frame.loc["+ masked feature distillation (MaskedCLIP)", ("glaucoma", "AUROC")]
        == f"**{0.82:.3f} ± {np.std([0.8, 0.84], ddof=1):.3f}**"
    )
    assert not t.frame.loc["MAE + CLIP (shared encoder)", ("glaucoma", "AUROC")].startswith("**")
    # save_results writes the ablation table only when at least two of its steps are there
    df = pd.DataFrame(rows)
    assert has_ablation(df) and has_ablation(df[df["method"].isin(["mae_clip", "maskedclip"])])
    assert not has_ablation(df[df["method"].isin(["random", "maskedclip"])]) and not has_ablation(df.iloc[:0])
    assert "table2_100pct" in save_results(df, tmp_path / "all", figure=False)
    one = save_results(df[df["method"].isin(["random", "maskedclip"])], tmp_path / "one", figure=False)
    assert (
        "table1_100pct" in one
        and "table2_100pct" not in one
        and not (tmp_path / "one" / "table2_100pct.md").exists()
    )


# ---------------------------------------------------------------- streaming, autocast, timm augmentation (issue 22)
def _float_reference(corpus, task, split, size=32):
    "The images as the evaluation used to hold them: eval_transform (float32, normalised) of every record."
    from maskedclip.data import ImageDataset, eval_transform, load_manifest

    md = load_manifest(
        corpus / "tasks" / task / f"{split}.jsonl", root=corpus, check_images=False, verbose=False
    )
    ds = ImageDataset(md, transform=eval_transform(size))
    return torch.stack([ds[i]["image"] for i in range(len(ds))])


def test_load_task_keeps_uint8_or_streams_and_matches_the_float_pipeline(tmp_path):
    from maskedclip.evaluate import TaskImages, _model_input, load_task

    corpus = _toy_corpus(tmp_path / "c", {"glaucoma": ["no glaucoma", "glaucoma"]}, n=(10, 6, 9))
    ref = _float_reference(corpus, "glaucoma", "test")
    td, lz = load_task(corpus, "glaucoma", 32), load_task(corpus, "glaucoma", 32, lazy=True)
    x, xl = td.splits["test"][0], lz.splits["test"][0]
    assert (
        x.dtype == torch.uint8 and x.shape == (9, 3, 32, 32) and x.nbytes * 4 == ref.nbytes
    )  # a quarter of float32
    assert isinstance(xl, TaskImages) and len(xl) == 9 and torch.equal(xl.materialize(), x)
    assert torch.equal(_model_input(x, "cpu"), ref)  # bit-identical to eval_transform's float images
    np.testing.assert_array_equal(td.splits["test"][1], lz.splits["test"][1])
    sub = xl[np.array([4, 1])]
    assert isinstance(sub, TaskImages) and torch.equal(sub.materialize(), x[[4, 1]])
    # features: the same from the float images, the uint8 tensor and the lazily decoded split
    enc = ViTEncoder(TINY_VC).eval()
    f_ref = extract_features(enc, ref, batch_size=4)
    for data in (x, xl):
        np.testing.assert_array_equal(extract_features(enc, data, batch_size=4), f_ref)


def test_lazy_split_is_read_one_batch_at_a_time(tmp_path):
    from maskedclip.evaluate import load_task

    corpus = _toy_corpus(tmp_path / "c", {"glaucoma": ["no glaucoma", "glaucoma"]}, n=(4, 4, 10))
    xl = load_task(corpus, "glaucoma", 32, lazy=True).splits["test"][0]
    seen, live = [], []

    class Probe(torch.nn.Module):  # records, per forward, how many images had been decoded so far
        def __init__(self):
            super().__init__()
            self.enc = ViTEncoder(TINY_VC)

        def forward(self, b):
            live.append((len(seen), len(b)))
            return self.enc(b)

    orig = type(xl.dataset).__getitem__

    class Counting(type(xl.dataset)):
        def __getitem__(self, i):
            seen.append(i)
            return orig(self, i)

    xl.dataset.__class__ = Counting
    extract_features(Probe(), xl, batch_size=4)
    assert live == [(4, 4), (8, 4), (10, 2)]  # decoded per batch, never ahead of the model


def test_evaluate_all_stream_and_finetune_give_the_same_numbers_as_float_images(tmp_path):
    corpus = _toy_corpus(tmp_path / "c", {"glaucoma": ["no glaucoma", "glaucoma"]}, n=(12, 8, 12))
    kw = dict(
        tasks=["glaucoma"],
        fractions=[1.0],
        seeds=[0],
        corpus_root=corpus,
        vision_config=TINY_VC,
        n_boot=50,
        progress=False,
        log=None,
    )
    a = evaluate_all({"random": "random"}, **kw)
    b = evaluate_all({"random": "random"}, stream=True, **kw)
    pd.testing.assert_frame_equal(a.drop(columns="seconds"), b.drop(columns="seconds"))
    ftk = dict(kw, protocol="finetune", finetune_kw=dict(epochs=1, batch_size=4))
    pd.testing.assert_frame_equal(
        evaluate_all({"random": "random"}, **ftk).drop(columns="seconds"),
        evaluate_all({"random": "random"}, stream=True, **ftk).drop(columns="seconds"),
    )
    # fine-tuning on the uint8 task images = fine-tuning on the float images the evaluation used to hold
    from maskedclip.evaluate import load_task

    td = load_task(corpus, "glaucoma", 32)
    fl = {s: (_float_reference(corpus, "glaucoma", s), td.splits[s][1]) for s in ("train", "val", "test")}
    ft = dict(epochs=2, batch_size=4, vision_config=TINY_VC, n_boot=50, progress=False)
    r_u8, r_fl = finetune("random", td.splits, **ft), finetune("random", fl, **ft)
    np.testing.assert_array_equal(r_u8.scores, r_fl.scores)
    assert r_u8.details["precision"] == "fp32" and r_u8.details["augmentation"] == "augment_batch"


def test_finetune_autocast_bf16_on_cpu():
    from maskedclip.evaluate import _amp_dtype, _cpu_bf16

    splits = {
        "train": _band_images(48, k=3),
        "val": _band_images(24, k=3, seed=1),
        "test": _band_images(30, k=3, seed=2),
    }
    kw = dict(epochs=3, batch_size=16, blr=5e-2, vision_config=TINY_VC, n_boot=50, progress=False)
    with pytest.raises(ValueError, match="'fp16' needs a CUDA device"):
        finetune("random", splits, precision="fp16", **kw)
    with pytest.raises(ValueError, match="precision: 'half'"):
        finetune("random", splits, precision="half", **kw)
    if not _cpu_bf16():
        with pytest.warns(UserWarning, match="no native bf16"):
            assert _amp_dtype("bf16", torch.device("cpu")) is None
        pytest.skip("this CPU has no native bf16")
    fp32, bf16 = finetune("random", splits, **kw), finetune("random", splits, precision="bf16", **kw)
    assert bf16.details["precision"] == "bfloat16" and fp32.details["precision"] == "fp32"
    assert not np.array_equal(bf16.scores, fp32.scores)  # autocast did change the arithmetic ...
    assert bf16.auroc > 0.8 and abs(bf16.auroc - fp32.auroc) < 0.1, (
        bf16.auroc,
        fp32.auroc,
    )  # ... not the result


def test_finetune_timm_augmentations():
    from maskedclip.evaluate import RETFOUND_AUG, _FinetuneAug

    # random erasing with p=1 replaces a rectangle of a constant image by per-pixel normal noise; RandAugment changes pixels
    aug = _FinetuneAug(True, 32, "rand-m9-mstd0.5-inc1", 1.0, 0.0, 0.0, 0.1, 3, seed=0)
    const = torch.full((4, 3, 32, 32), 128, dtype=torch.uint8)
    with aug.rng():
        out = aug.images(const)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    assert all(float(o.std()) > 0.1 for o in out)
    # mixup/cutmix: soft targets of timm's Mixup on even batches, untouched odd batches
    aug = _FinetuneAug(True, 32, None, 0.0, 0.8, 1.0, 0.1, 3, seed=0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    xm, target, lossf = aug.mix(x.clone(), y, None)
    assert target.shape == (4, 3) and torch.allclose(target.sum(1), torch.ones(4)) and lossf is aug.soft
    assert aug.mix(x[:3], y[:3], "crit")[2] == "crit"
    from PIL import Image

    from maskedclip.evaluate import _posterize_safe

    img = Image.fromarray(np.full((4, 4, 3), 200, np.uint8))
    assert np.asarray(_posterize_safe(img, 0)).max() == 0 and np.asarray(_posterize_safe(img, 1)).max() == 128
    # the whole RETFound recipe: learns, is reproducible, and leaves Python's and NumPy's RNG as they were
    import random

    u8 = lambda x: ((x.clamp(-2, 2) + 2) / 4 * 255).round().to(torch.uint8)
    splits = {
        s: (u8(x), y)
        for s, (x, y) in (
            ("train", _band_images(48, k=3)),
            ("val", _band_images(24, k=3, seed=1)),
            ("test", _band_images(30, k=3, seed=2)),
        )
    }
    kw = dict(
        epochs=3, batch_size=16, blr=5e-2, vision_config=TINY_VC, n_boot=50, progress=False, **RETFOUND_AUG
    )
    random.seed(123)
    np.random.seed(123)
    r1 = finetune("random", splits, **kw)
    assert (
        random.random() == random.Random(123).random()
        and np.random.random() == np.random.RandomState(123).random_sample()
    )
    r2 = finetune("random", splits, **kw)
    np.testing.assert_array_equal(r1.scores, r2.scores)
    assert (
        r1.details["augmentation"].startswith("timm randaugment=rand-m9")
        and "cutmix=1.0" in r1.details["augmentation"]
    )
    base = finetune("random", splits, **{k: v for k, v in kw.items() if k not in RETFOUND_AUG})
    assert not np.array_equal(base.scores, r1.scores)


def test_load_task_reads_prepared_splits_like_the_manifests(tmp_path):
    "A task whose splits were prepared (maskedclip-prepare, issue 19) loads the same images, labels and ids."
    import shutil

    from maskedclip.data.prepare import prepare_dataset
    from maskedclip.evaluate import load_task

    corpus = _toy_corpus(tmp_path / "c", {"glaucoma": ["no glaucoma", "glaucoma"]}, n=(10, 6, 9))
    ref = load_task(corpus, "glaucoma", 32)
    prepped = tmp_path / "p"
    shutil.copytree(corpus, prepped)
    tdir = prepped / "tasks" / "glaucoma"
    for s in ("train", "val", "test"):
        prepare_dataset(tdir / f"{s}.jsonl", tdir / s, root=prepped, shard_size=4)
        (tdir / f"{s}.jsonl").unlink()  # only the prepared dataset is left to read
    got = load_task(prepped, "glaucoma", 32, classes=ref.classes)
    assert got.classes == ref.classes and got.ids == ref.ids
    for s in ("train", "val", "test"):
        assert torch.equal(got.splits[s][0], ref.splits[s][0])
        np.testing.assert_array_equal(got.splits[s][1], ref.splits[s][1])
    with pytest.raises(ValueError, match="not in the task's classes"):
        load_task(prepped, "glaucoma", 32, classes=["glaucoma"])
