"""Representation diagnostics (issue 16, D26): the `diag/*` numbers against independent numpy references, on
constructed collapsed and healthy feature sets, and in the trainer's `metrics.jsonl` without changing training."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from maskedclip.diagnostics import (
    alignment,
    effective_rank,
    patch_cosine,
    representation_diagnostics,
    uniformity,
    within_image_variance,
)


def _healthy(n=6, L=49, d=64, seed=0):
    return torch.randn(n, L, d, generator=torch.Generator().manual_seed(seed))


def _collapsed(n=6, L=49, d=64, noise=0.01, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, d, generator=g) + noise * torch.randn(n, L, d, generator=g)


def _np_patch_cos(z):
    out = []
    for img in np.asarray(z, dtype=np.float64):
        u = img / np.linalg.norm(img, axis=1, keepdims=True)
        c = u @ u.T
        out.append(c[~np.eye(len(c), dtype=bool)].mean())
    return float(np.mean(out))


def _np_erank(z):
    out = []
    for img in np.asarray(z, dtype=np.float64):
        s = np.linalg.svd(img, compute_uv=False)
        p = s / s.sum()
        p = p[p > 0]
        out.append(np.exp(-(p * np.log(p)).sum()))
    return float(np.mean(out))


@pytest.mark.parametrize("make", [_healthy, _collapsed])
def test_token_statistics_match_numpy(make):
    z = make()
    assert math.isclose(patch_cosine(z), _np_patch_cos(z), rel_tol=1e-4, abs_tol=1e-5)
    assert math.isclose(effective_rank(z), _np_erank(z), rel_tol=1e-6)
    zn = np.asarray(z, dtype=np.float64)
    ref = np.mean([((x - x.mean(0)) ** 2).sum() / (x**2).sum() for x in zn])
    assert math.isclose(within_image_variance(z), ref, rel_tol=1e-4)


def test_collapsed_and_healthy_sets_are_told_apart():
    h, c = _healthy(), _collapsed()
    assert patch_cosine(c) > 0.99 and abs(patch_cosine(h)) < 0.05
    assert effective_rank(c) < 2.0 and effective_rank(h) > 30
    assert within_image_variance(c) < 1e-3 and within_image_variance(h) > 0.9
    # a rank-2 set: two directions per image, half the patches each
    g = torch.Generator().manual_seed(3)
    two = torch.randn(4, 2, 32, generator=g).repeat_interleave(25, dim=1)
    assert 1.5 < effective_rank(two) < 2.0 + 1e-6


def test_alignment_and_uniformity_match_numpy():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20, 16, generator=g), torch.randn(20, 16, generator=g)
    an, bn = (
        np.asarray(x, dtype=np.float64)
        / np.linalg.norm(np.asarray(x, dtype=np.float64), axis=1, keepdims=True)
        for x in (a, b)
    )
    assert math.isclose(alignment(a, b), float(((an - bn) ** 2).sum(1).mean()), rel_tol=1e-5)
    d2 = ((an[:, None] - an[None]) ** 2).sum(-1)[~np.eye(20, dtype=bool)]
    assert math.isclose(uniformity(a), float(np.log(np.exp(-2 * d2).mean())), rel_tol=1e-5)
    collapsed = torch.ones(10, 16) + 1e-5 * torch.randn(10, 16, generator=g)
    assert uniformity(collapsed) > -1e-4 and uniformity(torch.randn(500, 16, generator=g)) < -3
    with pytest.raises(ValueError, match="same shape"):
        alignment(a, b[:5])
    with pytest.raises(ValueError, match="patch tokens"):
        patch_cosine(torch.zeros(3, 1, 4))


def _tiny_model(method="maskedclip", **kw):
    from maskedclip.config import get_preset
    from maskedclip.model import MaskedCLIP

    torch.manual_seed(0)
    return MaskedCLIP(get_preset("tiny", method).replace(**kw), pretrained_text=False)


def _batch(model, n=4):
    from maskedclip.data import Batch

    texts = ["no diabetic retinopathy.", "a large optic cup.", "drusen at the macula.", "a normal fundus."][
        :n
    ]
    tok = model.tokenize(texts) if model.text is not None else None
    g = torch.Generator().manual_seed(5)
    return Batch(
        paired_images=torch.randn(n, 3, 64, 64, generator=g),
        labels=torch.arange(n) % 2,
        input_ids=None if tok is None else torch.as_tensor(tok["input_ids"]),
        attention_mask=None if tok is None else torch.as_tensor(tok["attention_mask"]),
    )


@pytest.mark.parametrize(
    "method,expect,absent",
    [
        ("maskedclip", {"encoder", "bridge", "teacher", "mfd_target", "align"}, set()),
        ("mae_clip", {"encoder", "align"}, {"bridge", "teacher"}),
        ("mae", {"encoder"}, {"bridge", "teacher", "align"}),
    ],
)
def test_model_diagnostics_cover_the_parts_a_method_has(method, expect, absent):
    m = _tiny_model(method)
    d = representation_diagnostics(m, _batch(m))
    stems = {k[5:].split("_patch_cos")[0].split("_erank")[0].split("_var")[0] for k in d}
    assert expect <= stems and not (absent & stems), d
    assert all(k.startswith("diag/") and math.isfinite(v) for k, v in d.items())
    assert m.training  # mode restored


def test_instance_norm_target_is_centred_and_the_teacher_unchanged():
    m = _tiny_model("maskedclip")
    m_in = _tiny_model("maskedclip", mfd_target="teacher_in")
    m_in.load_state_dict(m.state_dict())
    b = _batch(m)
    d, d_in = representation_diagnostics(m, b), representation_diagnostics(m_in, b)
    assert d["diag/teacher_patch_cos"] == d_in["diag/teacher_patch_cos"]
    assert abs(d_in["diag/mfd_target_var"] - 1.0) < 1e-4 and abs(d_in["diag/mfd_target_patch_cos"]) < 0.1


def test_trainer_logs_diag_rows_without_changing_training(tmp_path, one_thread):
    from maskedclip.train import experiment_config, read_metrics, train
    from maskedclip.viz import loss_keys, run_figures

    kw = dict(
        steps=5,
        warmup_steps=1,
        paired_batch_size=4,
        unpaired_batch_size=4,
        synthetic_n_paired=16,
        synthetic_n_unpaired=16,
        synthetic_n_task=8,
    )
    corpus = tmp_path / "corpus"
    rows = {}
    for every in (0, 2):
        cfg = experiment_config(
            "tiny",
            "maskedclip",
            output_dir=str(tmp_path / f"d{every}"),
            overrides={"train.diag_every": every, "data.synthetic_dir": str(corpus)},
            **kw,
        )
        train(cfg, progress=False)
        rows[every] = read_metrics(tmp_path / f"d{every}")
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[2]]  # bit-identical training
    assert not any(k.startswith("diag/") for r in rows[0] for k in r)
    steps = [r["step"] for r in rows[2] if "diag/encoder_patch_cos" in r]
    assert steps == [1, 2, 4, 5]  # step 1, every 2, the last
    assert {"diag/bridge_erank", "diag/teacher_patch_cos", "diag/mfd_target_var", "diag/align"} <= set(
        rows[2][-1]
    )
    assert not any(k.startswith("diag/") for k in loss_keys(rows[2]))
    line = (tmp_path / "d2" / "metrics.jsonl").read_text().splitlines()[-1]
    json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    figs = run_figures(tmp_path / "d2")
    assert "representation diagnostics" in figs and len(figs["representation diagnostics"].data) >= 8


def test_diagnostics_leave_the_frozen_text_cache_untouched(one_thread):
    "The frozen tower's LRU cache is training state: diagnostics must neither read nor fill nor reorder it (D26)."
    from maskedclip.config import get_preset
    from maskedclip.data import Batch
    from maskedclip.model import MaskedCLIP

    torch.manual_seed(0)
    m = MaskedCLIP(get_preset("demo", "maskedclip"))
    assert m.text.cfg.freeze and m.text.cfg.cache_size > 0

    def batch(texts, seed):
        tok = m.tokenize(texts)
        return Batch(
            paired_images=torch.randn(len(texts), 3, 64, 64, generator=torch.Generator().manual_seed(seed)),
            input_ids=torch.as_tensor(tok["input_ids"]),
            attention_mask=torch.as_tensor(tok["attention_mask"]),
            labels=torch.arange(len(texts)),
        )

    train_texts = ["no diabetic retinopathy.", "a large optic cup.", "many drusen at the macula."]
    m(batch(train_texts, 0))  # a training forward fills the cache
    before = [(k, v.clone()) for k, v in m.text._cache.items()]
    d = representation_diagnostics(
        m, batch(["cataract with a hazy view.", "a normal fundus.", train_texts[0]], 1)
    )
    assert "diag/align" in d
    after = list(m.text._cache.items())
    assert [k for k, _ in before] == [k for k, _ in after] and all(
        torch.equal(a, b) for (_, a), (_, b) in zip(before, after)
    )
