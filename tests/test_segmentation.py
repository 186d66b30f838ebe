"""Tests for maskedclip.segmentation: Dice against sklearn and hand-computed cases, the head on features that
encode the mask, seeded/stratified label fractions, the corpus loader against the PNGs on disk, the pointing game
against a loop over maskedclip.viz, and φ read from checkpoints."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import f1_score

from maskedclip.segmentation import (
    SegmentationData,
    SegmentationHead,
    _fit_and_score,
    dice_score,
    dice_summary,
    fewshot_segmentation,
    lesion_frequency_map,
    load_segmentation_split,
    patch_features,
    phi_history,
    phi_lesion_correlation,
    pointing_game_score,
    pooled_dice,
    resolve_lesions,
    segmentation_curve,
    select_fraction,
    soft_dice_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # shared fixture in conftest.py


def _blobs(n, size=64, seed=0, p_empty=0.3, max_blobs=3):
    "Random masks `(n, size, size)` bool: 0..max_blobs discs of radius 1-6 px; about `p_empty` of them empty."
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((n, size, size), bool)
    for i in range(n):
        if g.random() < p_empty:
            continue
        for _ in range(g.integers(1, max_blobs + 1)):
            cy, cx, r = g.uniform(4, size - 4), g.uniform(4, size - 4), g.uniform(1, 6)
            out[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return torch.from_numpy(out)


def _data(masks):
    n, H, W = masks.shape
    return SegmentationData(torch.zeros(n, 3, H, W), masks, {"x": masks}, [f"i{k}" for k in range(n)], ("x",))


# ------------------------------------------------------------------------------------------------ Dice


def test_dice_matches_sklearn_f1_and_empty_conventions():
    pred, target = _blobs(40, seed=1), _blobs(40, seed=2)
    pred[3] = False
    target[3] = False  # both empty
    pred[4] = False  # missed lesion (or empty/empty if target[4] empty)
    target[5] = False
    pred[5, 10:12, 10:12] = True  # false positives on a lesion-free image
    d = dice_score(pred, target)
    ref = [f1_score(t.ravel().numpy(), p.ravel().numpy(), zero_division=1.0) for p, t in zip(pred, target)]
    assert np.allclose(d.numpy(), ref, atol=1e-12)
    assert d[3] == 1.0 and d[5] == 0.0 and dice_score(pred[3], target[3], empty_score=0.0) == 0.0
    ref_pooled = f1_score(target.ravel().numpy(), pred.ravel().numpy(), zero_division=1.0)
    assert abs(pooled_dice(pred, target) - ref_pooled) < 1e-12


def test_dice_hand_computed():
    t = torch.zeros(6, 6, dtype=torch.bool)
    t[0:3, 0:3] = True  # 9 pixels
    p = torch.zeros(6, 6, dtype=torch.bool)
    p[1:4, 1:5] = True  # 12 pixels, overlap rows 1-2 x cols 1-2 = 4
    assert abs(float(dice_score(p, t)) - 8 / 21) < 1e-15
    e = torch.zeros(6, 6, dtype=torch.bool)
    assert (
        float(dice_score(e, t)) == 0.0 and float(dice_score(p, e)) == 0.0 and float(dice_score(e, e)) == 1.0
    )
    # integer 0/1 masks and numpy arrays are accepted; probabilities and other integers are not
    assert float(dice_score(p.numpy().astype(np.uint8), t.long())) == float(dice_score(p, t))
    with pytest.raises(ValueError, match="threshold"):
        dice_score(p.float(), t)
    with pytest.raises(ValueError, match="0 and 1"):
        dice_score(p.long() * 2, t)
    with pytest.raises(ValueError, match="same shape"):
        dice_score(p, t[:5])


def test_dice_summary_parts_and_bootstrap():
    pred, target = _blobs(30, seed=3), _blobs(30, seed=4)
    s = dice_summary(pred, target, n_boot=500, seed=0)
    d = dice_score(pred, target).numpy()
    has = target.flatten(1).any(1).numpy()
    assert abs(s["dice"] - d.mean()) < 1e-12 and abs(s["dice_lesion"] - d[has].mean()) < 1e-12
    assert s["n_lesion"] == has.sum() and s["n_empty"] == (~has).sum()
    assert abs(s["empty_correct"] - (~pred.flatten(1).any(1).numpy()[~has]).mean()) < 1e-12
    assert s["dice_ci"][0] <= s["dice"] <= s["dice_ci"][1]
    assert s["dice_pooled_ci"][0] <= s["dice_pooled"] <= s["dice_pooled_ci"][1]
    assert dice_summary(pred, target, n_boot=500, seed=0) == s  # seeded
    assert "dice_ci" not in dice_summary(pred, target, n_boot=0)


def test_soft_dice_loss_reference():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(3, 5, 7, generator=g, dtype=torch.float64), torch.rand(3, 5, 7, generator=g) > 0.7
    p = 1 / (1 + np.exp(-z.numpy()))
    ref = 1 - (2 * (p * y.numpy()).sum() + 1) / (p.sum() + y.numpy().sum() + 1)
    assert abs(float(soft_dice_loss(z, y)) - ref) < 1e-6


# ------------------------------------------------------------------------------------------------ head


def test_head_pixel_shuffle_layout_with_mlp():
    torch.manual_seed(0)
    gh, gw, s, D = 3, 2, 4, 10
    h = SegmentationHead(D, (gh, gw), (gh * s, gw * s), hidden=8, subpatch=s)
    tok = torch.randn(2, gh * gw, D)
    out = h(tok)
    z = h.net((tok - h.feat_mean) / h.feat_std)  # (2, L, s*s)
    for b in range(2):
        for r in range(gh):
            for c in range(gw):
                block = z[b, r * gw + c].reshape(s, s)
                assert torch.allclose(out[b, r * s : (r + 1) * s, c * s : (c + 1) * s], block)


def test_head_bilinear_matches_interpolate_reference():
    h = SegmentationHead(5, (4, 4), (32, 32))
    tok = torch.randn(2, 16, 5)
    z = h.net(tok).reshape(2, 1, 4, 4)
    ref = F.interpolate(z, size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(h(tok), ref, atol=1e-6)


def _coded(masks, code, noise, seed, p=8):
    "Tokens that are a fixed random linear code of their patch's p×p mask bits, plus noise."
    n, H, W = masks.shape
    gh, gw = H // p, W // p
    bits = masks.float().reshape(n, gh, p, gw, p).permute(0, 1, 3, 2, 4).reshape(n, gh * gw, p * p)
    return bits @ code + noise * torch.randn(
        n, gh * gw, code.shape[1], generator=torch.Generator().manual_seed(seed)
    )


def test_head_learns_features_that_encode_the_mask(one_thread):
    train, test = _data(_blobs(48, seed=10)), _data(_blobs(48, seed=11))
    code = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    ftr, fte = _coded(train.masks, code, 0.05, 1), _coded(test.masks, code, 0.05, 2)
    r = _fit_and_score(ftr, fte, train, test, (8, 8), 1.0, 0, steps=300, subpatch=8, n_boot=0)
    assert r["dice_pooled"] > 0.9 and r["dice_lesion"] > 0.9 and r["empty_correct"] > 0.9
    # negative control: features without the mask cannot be decoded
    noise = torch.randn(48, 64, 96, generator=torch.Generator().manual_seed(3))
    r0 = _fit_and_score(noise, fte, train, test, (8, 8), 1.0, 0, steps=300, subpatch=8, n_boot=0)
    assert r0["dice_pooled"] < 0.3


def test_per_patch_head_on_patch_aligned_masks(one_thread):
    "subpatch=1 + bilinear: masks made of whole patches, tokens carry the patch's label -> Dice near 1."
    g = torch.Generator().manual_seed(0)

    def make(n, seed):
        lab = torch.rand(n, 8, 8, generator=torch.Generator().manual_seed(seed)) < 0.15
        masks = lab.repeat_interleave(8, 1).repeat_interleave(8, 2)
        return lab, masks

    (ltr, mtr), (lte, mte) = make(32, 1), make(32, 2)
    direction = torch.randn(48, generator=g)
    feats = lambda lab, s: (
        lab.reshape(len(lab), 64, 1).float() * direction
        + 0.1 * torch.randn(len(lab), 64, 48, generator=torch.Generator().manual_seed(s))
    )
    r = _fit_and_score(
        feats(ltr, 5), feats(lte, 6), _data(mtr), _data(mte), (8, 8), 1.0, 0, steps=200, subpatch=1, n_boot=0
    )
    # the ceiling of bilinear upsampling: ±1 per patch, upsampled, > 0 (isolated patches lose their corners)
    oracle = (
        F.interpolate(lte[:, None].float() * 2 - 1, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
        > 0
    )
    best = dice_summary(oracle, mte, n_boot=0)["dice_pooled"]
    assert best > 0.8 and r["dice_pooled"] > best - 0.05


# ------------------------------------------------------------------------------------------------ fractions


def test_select_fraction_seeded_stratified_nested():
    has = np.zeros(200, bool)
    has[np.random.default_rng(0).choice(200, 60, replace=False)] = True
    i10 = select_fraction(has, 0.1, seed=0)
    assert has[i10].sum() == 6 and (~has[i10]).sum() == 14  # round(0.1·60), round(0.1·140)
    i1 = select_fraction(has, 0.01, seed=0)
    assert has[i1].sum() == 1 and (~has[i1]).sum() == 1  # at least one of each group
    assert np.array_equal(select_fraction(has, 0.1, seed=0), i10)  # seeded
    assert not np.array_equal(select_fraction(has, 0.1, seed=1), i10)
    assert set(i1) <= set(i10) <= set(select_fraction(has, 0.5, seed=0))  # nested for one seed
    assert np.array_equal(select_fraction(has, 1.0, seed=3), np.arange(200))
    assert np.array_equal(np.sort(i10), i10)
    with pytest.raises(ValueError):
        select_fraction(has, 0.0)


# ------------------------------------------------------------------------------------------------ corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from maskedclip.synthetic import build_corpus

    return build_corpus(
        tmp_path_factory.mktemp("seg") / "corpus",
        n_paired=8,
        n_unpaired=0,
        n_task_per_split={"train": 24, "val": 0, "test": 24},
        size=64,
        seed=0,
        progress=False,
    )


def test_load_segmentation_split_matches_pngs(corpus):
    from maskedclip.data import eval_transform, load_image

    d = load_segmentation_split(corpus, "dr_grade", "test", lesions=("hard_exudate", "haemorrhage"))
    recs = [json.loads(l) for l in (corpus / "tasks/dr_grade/test.jsonl").read_text().splitlines()]
    assert d.ids == [r["id"] for r in recs] and d.lesions == ("hard_exudate", "haemorrhage")
    tf = eval_transform(64, border_crop=False)
    for i, r in enumerate(recs):
        for l in d.lesions:
            ref = (
                np.array(Image.open(corpus / r["masks"][l])) > 0
                if l in r["masks"]
                else np.zeros((64, 64), bool)
            )
            assert np.array_equal(d.lesion_masks[l][i].numpy(), ref), (r["id"], l)
        assert torch.equal(d.images[i], tf(load_image(corpus / r["image"])))
    assert torch.equal(d.masks, d.lesion_masks["hard_exudate"] | d.lesion_masks["haemorrhage"])
    # a smaller image size: masks follow with nearest resizing
    d32 = load_segmentation_split(
        corpus, "dr_grade", "test", lesions=("hard_exudate", "haemorrhage"), image_size=32
    )
    assert d32.images.shape == (24, 3, 32, 32)
    near = F.interpolate(d.masks[:, None].float(), size=(32, 32), mode="nearest")[:, 0] > 0.5
    assert (d32.masks == near).float().mean() > 0.99
    both = load_segmentation_split(corpus, ["dr_grade", "glaucoma"], "test", lesions="red")
    assert len(both) == 48 and both.ids[24].startswith("glaucoma-test")
    assert resolve_lesions("all")[0] == "microaneurysm"
    with pytest.raises(ValueError, match="not a lesion type"):
        load_segmentation_split(corpus, "dr_grade", "test", lesions="exudate")
    with pytest.raises(FileNotFoundError):
        load_segmentation_split(corpus, "dr_grade", "val_missing")


def test_fewshot_segmentation_end_to_end_is_seeded(corpus, one_thread):
    from maskedclip.evaluate import load_encoder

    enc = load_encoder("random:tiny", seed=0)
    tr = load_segmentation_split(corpus, "multi_disease", "train", lesions="red")
    te = load_segmentation_split(corpus, "multi_disease", "test", lesions="red")
    a = fewshot_segmentation(enc, tr, te, fraction=0.1, seed=0, steps=40, subpatch=8, n_boot=100)
    b = fewshot_segmentation(enc, tr, te, fraction=0.1, seed=0, steps=40, subpatch=8, n_boot=100)
    assert a == b
    assert a["train_idx"] == select_fraction(tr, 0.1, seed=0).tolist() and a["n_train"] == len(a["train_idx"])
    assert 0 <= a["dice"] <= 1 and 0 <= a["dice_pooled"] <= 1
    assert (
        abs(
            a["dice"]
            - (
                np.nan_to_num(a["dice_lesion"]) * a["n_lesion"]
                + np.nan_to_num(a["empty_correct"]) * a["n_empty"]
            )
            / a["n_images"]
        )
        < 1e-9
    )
    assert a["n_images"] == len(te)
    # features are the encoder's patch tokens
    f = patch_features(enc, te.images[:3])
    with torch.no_grad():
        ref = enc.encoder.eval()(te.images[:3]).tokens[:, 1:]
    assert torch.allclose(f, ref, atol=1e-5)
    df = segmentation_curve(enc, tr, te, fractions=(0.1, 1.0), seeds=(0,), steps=40, subpatch=8, n_boot=0)
    assert list(df.n_train) == [a["n_train"], len(tr)] and abs(df.dice.iloc[0] - a["dice"]) < 1e-12
    with pytest.raises(ValueError, match="encoder expects"):
        patch_features(enc, torch.zeros(1, 3, 32, 32))


# ------------------------------------------------------------------------------------------------ pointing game


def test_pointing_game_counts_hits_and_skips(monkeypatch):
    import maskedclip.viz as viz

    masks = {"a": torch.zeros(3, 16, 16, dtype=torch.bool), "b": torch.zeros(3, 16, 16, dtype=torch.bool)}
    masks["a"][0, 0:4, 0:4] = True  # image 0: the pointer (top-left) hits a
    masks["a"][1, 8:16, 8:16] = True  # image 1: a is away from the pointer -> miss
    masks["b"][1, 0:2, 0:2] = True  # image 1: b is hit; images 0 and 2 have no b, image 2 no a
    calls = []

    def fake(model, image, texts, projection="image"):
        calls.append(list(texts))
        hm = torch.zeros(len(texts), 4, 4)
        hm[:, 0, 0] = 1.0
        return hm

    monkeypatch.setattr(viz, "prompt_heatmaps", fake)
    r = pointing_game_score(None, torch.zeros(3, 3, 16, 16), masks, prompts={"a": "A", "b": "B"})
    assert (r["hits"], r["n"], r["n_skipped_empty"]) == (2, 3, 3)
    assert (
        r["per_lesion"]["a"]["hits"] == 1
        and r["per_lesion"]["a"]["n"] == 2
        and r["per_lesion"]["b"]["hit_rate"] == 1.0
    )
    assert calls == [["A"], ["A", "B"]]  # image 2 has nothing to score
    assert abs(r["chance"] - (16 / 256 + 64 / 256 + 4 / 256) / 3) < 1e-12
    with pytest.raises(ValueError, match="no text"):
        pointing_game_score(None, torch.zeros(3, 3, 16, 16), masks, prompts={"a": "A"})


def test_pointing_game_matches_viz_loop(corpus, one_thread):
    from maskedclip.config import get_preset
    from maskedclip.model import MaskedCLIP
    from maskedclip.viz import pointing_game, prompt_heatmap

    torch.manual_seed(0)
    model = MaskedCLIP(get_preset("tiny", "mlip")).eval()
    te = load_segmentation_split(corpus, "multi_disease", "test", lesions="red")
    prompts = {"microaneurysm": "microaneurysms", "haemorrhage": "dot and blot haemorrhages"}
    r = pointing_game_score(model, te, prompts=prompts, projection="patch")
    hits = n = 0
    for l, text in prompts.items():
        for i in range(len(te)):
            m = te.lesion_masks[l][i]
            if not m.any():
                continue
            hits += pointing_game(prompt_heatmap(model, te.images[i], text, projection="patch"), m)
            n += 1
    assert (r["hits"], r["n"]) == (hits, n) and r["n_skipped_empty"] == 2 * len(te) - n


# ------------------------------------------------------------------------------------------------ φ


def test_phi_history_reads_checkpoints(tmp_path):
    from maskedclip.config import get_preset
    from maskedclip.model import MaskedCLIP

    torch.manual_seed(0)
    model = MaskedCLIP(get_preset("tiny", "mlip"))
    maps = {}
    for step in (3, 7):
        with torch.no_grad():
            model.integrity.proj.weight.normal_(generator=torch.Generator().manual_seed(step))
        d = tmp_path / "checkpoints" / f"step_{step:08d}"
        model.save_pretrained(d)
        (d / "COMPLETE").write_text("ok\n")
        maps[step] = model.integrity.phi_map().clone()
    (tmp_path / "checkpoints" / "step_00000009").mkdir()  # incomplete: ignored
    h = phi_history(tmp_path)
    assert [s for s, _ in h] == [0, 3, 7]
    assert torch.equal(h[0][1], torch.zeros(8, 8))
    assert torch.equal(h[1][1], maps[3]) and torch.equal(h[2][1], maps[7])
    assert torch.equal(
        h[2][1], MaskedCLIP.from_pretrained(tmp_path / "checkpoints" / "step_00000007").integrity.phi_map()
    )
    other = tmp_path / "mae"
    m2 = MaskedCLIP(get_preset("tiny", "mae"))
    d = other / "checkpoints" / "step_00000001"
    m2.save_pretrained(d)
    (d / "COMPLETE").write_text("ok\n")
    with pytest.raises(ValueError, match="no semantic-integrity"):
        phi_history(other)
    with pytest.raises(FileNotFoundError):
        phi_history(tmp_path / "nothing")


def test_lesion_frequency_and_correlation():
    m = _blobs(20, size=32, seed=5)
    f = lesion_frequency_map(m, (4, 4))
    ref = np.zeros((4, 4))
    for x in m.numpy():
        for r in range(4):
            for c in range(4):
                ref[r, c] += x[r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8].any()
    assert np.allclose(f.numpy(), ref / 20)
    phi = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    c = phi_lesion_correlation(phi, f)
    assert abs(c["pearson"] - np.corrcoef(phi.numpy().ravel(), ref.ravel())[0, 1]) < 1e-9
    where = torch.zeros(4, 4, dtype=torch.bool)
    where[1:3] = True
    cw = phi_lesion_correlation(phi, f, where)
    assert (
        cw["n_patches"] == 8
        and abs(cw["pearson"] - np.corrcoef(phi[1:3].ravel(), f[1:3].ravel())[0, 1]) < 1e-9
    )
