"""Tests of maskedclip.synthetic: determinism, sizes, grading rules, prevalences, mask alignment, reports,
calibration against skimage.data.retina(), learnability, the corpus layout and the CLI."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage as ndi
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from maskedclip.synthetic import (
    DISEASE_PRIORITY,
    DR_GRADES,
    LESION_TYPES,
    QUADRANTS,
    RETINA_REFERENCE,
    TASKS,
    FindingPrior,
    Findings,
    Lesion,
    Nuisance,
    build_corpus,
    image_statistics,
    main,
    make_sample,
    png_bytes,
    render_fundus,
    retina_reference,
    sample_findings,
    write_report,
)


# ----------------------------------------------------------------------------------------------- determinism, sizes
def test_same_seed_same_bytes_and_different_seeds_differ():
    a, b = make_sample(3, 11, 64), make_sample(3, 11, 64)
    assert png_bytes(a.image) == png_bytes(b.image)
    assert a.report == b.report and a.masks.keys() == b.masks.keys()
    assert all(np.array_equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert png_bytes(make_sample(4, 11, 64).image) != png_bytes(a.image)
    assert png_bytes(make_sample(3, 12, 64).image) != png_bytes(a.image)


@pytest.mark.parametrize("size", [64, 512])
def test_renders_at_64_and_512(size):
    s = make_sample(0, 5, size)
    assert s.image.shape == (size, size, 3) and s.image.dtype == np.uint8
    assert set(s.masks) == set(LESION_TYPES) | {"optic_disc", "optic_cup"}
    assert all(m.shape == (size, size) and m.dtype == bool for m in s.masks.values())
    assert s.image[0, 0].max() == 0 and s.image[size // 2, size // 2].max() > 50  # black corner, bright FOV
    assert s.masks["optic_disc"].sum() > s.masks["optic_cup"].sum() > 0


def test_same_eye_at_every_size():
    "Geometry is in relative units: a 512 px render averaged down to 64 px is the 64 px render."
    f = sample_findings(np.random.default_rng(21))
    a64, m64 = render_fundus(f, 64, np.random.default_rng(2))
    a512, m512 = render_fundus(f, 512, np.random.default_rng(2))
    down = a512.reshape(64, 8, 64, 8, 3).astype(float).mean((1, 3))
    assert np.corrcoef(down.ravel(), a64.astype(float).ravel())[0, 1] > 0.97
    disc64, disc512 = m64["optic_disc"].mean(), m512["optic_disc"].mean()
    assert abs(disc64 - disc512) / disc512 < 0.2


# ----------------------------------------------------------------------------------------------- rules and prior
def _reference_grade(f: Findings) -> int:
    "Independent re-implementation of the documented ICDR rules from raw lesion coordinates."
    kinds = [l.kind for l in f.lesions]
    if "neovascularisation" in kinds or "preretinal_haemorrhage" in kinds:
        return 4
    h = np.array([[l.x, l.y] for l in f.lesions if l.kind == "haemorrhage"]).reshape(-1, 2)
    counts = [
        np.sum((h[:, 0] < 0) & (h[:, 1] < 0)),
        np.sum((h[:, 0] >= 0) & (h[:, 1] < 0)),
        np.sum((h[:, 0] < 0) & (h[:, 1] >= 0)),
        np.sum((h[:, 0] >= 0) & (h[:, 1] >= 0)),
    ]
    if min(counts) >= 21 or len(set(f.venous_beading)) >= 2:
        return 3
    if {"haemorrhage", "hard_exudate", "cotton_wool_spot"} & set(kinds) or f.venous_beading:
        return 2
    return int("microaneurysm" in kinds)


def _reference_amd(f: Findings) -> bool:
    um_per_unit = 1800.0 / f.disc_diameter
    d = np.array([2 * np.sqrt(l.rx * l.ry) * um_per_unit for l in f.lesions if l.kind == "drusen"])
    return bool((d >= 125).any() or (d >= 63).sum() >= 10)


def test_labels_follow_rules_on_sampled_eyes():
    rng = np.random.default_rng(5)
    for _ in range(400):
        f = sample_findings(rng)
        assert f.dr_grade == _reference_grade(f)
        assert (
            f.glaucoma == (f.cdr >= 0.65)
            and f.amd == _reference_amd(f)
            and f.cataract == (f.cataract_haze >= 0.3)
        )
        assert f.labels["dr_referral"] == (f.dr_grade >= 2)
        assert f.labels["normal"] == (f.dr_grade == 0 and not (f.glaucoma or f.amd or f.cataract))
        cats = f.categories
        assert f.primary == (next((c for c in DISEASE_PRIORITY if c in cats), "normal"))
        assert f.task_label("dr_grade") == DR_GRADES[f.dr_grade]


def test_boundaries_of_the_rules():
    hq = lambda q, n: (
        [
            Lesion(
                "haemorrhage",
                (-0.3 if "temporal" in q else 0.3),
                (-0.3 if "supero" in q else 0.3),
                0.01,
                0.01,
            )
        ]
        * n
    )
    twenty = [l for q in QUADRANTS for l in hq(q, 20)]
    assert Findings(lesions=twenty).dr_grade == 2  # "more than 20" in each quadrant
    assert Findings(lesions=twenty + [l for q in QUADRANTS for l in hq(q, 1)]).dr_grade == 3
    assert Findings(cdr=0.649).glaucoma is False and Findings(cdr=0.65).glaucoma is True
    assert Findings(cataract_haze=0.29).cataract is False


@pytest.mark.parametrize(
    "prior",
    [
        FindingPrior(),
        FindingPrior(dr_grade_probs=(0.2, 0.2, 0.2, 0.2, 0.2), p_glaucoma=0.5, p_amd=0.3, p_cataract=0.25),
    ],
    ids=["default", "custom"],
)
def test_prevalences_match_the_prior(prior):
    n, rng = 2000, np.random.default_rng(11)
    F = [sample_findings(rng, prior) for _ in range(n)]
    obs = {
        **{f"dr_grade={g}": np.mean([f.dr_grade == g for f in F]) for g in range(5)},
        **{
            k: np.mean([f.labels[k] for f in F])
            for k in ("dr", "dr_referral", "glaucoma", "amd", "cataract", "normal")
        },
    }
    for k, p in prior.expected().items():
        assert abs(obs[k] - p) < 4 * np.sqrt(p * (1 - p) / n), (k, obs[k], p)
    assert 0.4 < np.mean([f.eye == "OD" for f in F]) < 0.6


# ----------------------------------------------------------------------------------------------- masks
RED = ("microaneurysm", "haemorrhage", "preretinal_haemorrhage")
BRIGHT = ("hard_exudate", "cotton_wool_spot", "drusen")


def test_masks_line_up_with_the_drawn_lesions():
    """Under each lesion mask the pixels differ from a ring of background around it in the lesion's direction:
    red lesions darker (green) and redder (R/G), exudates and drusen brighter and yellower (G/B), cotton-wool
    spots brighter in green and blue (whitish). Checked before the JPEG round trip (the last step, after the masks
    are fixed: `test_jpeg_changes_pixels_not_masks`), which blurs the colour of 1-2 px exudates at 128 px."""
    ok, seen, rng, shifted = (
        {k: 0 for k in LESION_TYPES},
        {k: 0 for k in LESION_TYPES},
        np.random.default_rng(9),
        [],
    )
    for i in range(40):
        f = sample_findings(
            rng,
            FindingPrior(dr_grade_probs=(0.1, 0.15, 0.25, 0.2, 0.3), p_amd=0.4, p_preretinal=0.8, p_cws=0.5),
        )
        img, masks = render_fundus(f, 128, np.random.default_rng(i), Nuisance(jpeg_quality=(100, 100)))
        x = img.astype(float) + 1.0
        lesion_any = np.any([masks[k] for k in LESION_TYPES], 0)
        for k in RED + BRIGHT:
            present = any(l.kind == k for l in f.lesions)
            assert masks[k].any() == present, (k, present)
            if not present:
                continue
            ring = (
                ndi.binary_dilation(masks[k], iterations=4)
                & ~ndi.binary_dilation(lesion_any, iterations=1)
                & masks["optic_disc"].__invert__()
            )
            if ring.sum() < 20:
                continue
            inn, out = np.median(x[masks[k]], 0), np.median(x[ring], 0)
            seen[k] += 1
            if k == "microaneurysm":  # negative control: the same test on a mask moved by 7 px mostly fails
                sm = np.roll(masks[k], (7, 7), (0, 1)) & masks["optic_disc"].__invert__() & (x.sum(2) > 60)
                sr = ndi.binary_dilation(sm, iterations=4) & ~ndi.binary_dilation(
                    sm | lesion_any, iterations=1
                )
                if sm.sum() and sr.sum() >= 20:
                    a_, b_ = np.median(x[sm], 0), np.median(x[sr], 0)
                    shifted.append(a_[1] < 0.95 * b_[1] and a_[0] / a_[1] > b_[0] / b_[1])
            if k in RED:
                ok[k] += (
                    inn[1] < (0.95 if k == "microaneurysm" else 1.0) * out[1]
                    and inn[0] / inn[1] > out[0] / out[1]
                )
            elif k == "cotton_wool_spot":
                ok[k] += inn[1] > out[1] and inn[2] > out[2]  # whitish
            else:
                ok[k] += inn[1] > out[1] and inn[1] / inn[2] > out[1] / out[2]  # yellow
    assert len(shifted) >= 10 and np.mean(shifted) < 0.3, shifted
    for k in RED + BRIGHT:
        assert seen[k] >= 3, (k, seen)
        assert ok[k] >= 0.9 * seen[k], (k, ok[k], seen[k])


def test_jpeg_changes_pixels_not_masks():
    "Same eye and camera draw with and without JPEG: identical masks, the image differs by compression noise only."
    f = sample_findings(np.random.default_rng(5), FindingPrior(dr_grade_probs=(0, 0, 0.5, 0.5, 0)))
    a, ma = render_fundus(f, 128, np.random.default_rng(1), Nuisance(jpeg_quality=(60, 60)))
    b, mb = render_fundus(f, 128, np.random.default_rng(1), Nuisance(jpeg_quality=(100, 100)))
    assert ma.keys() == mb.keys() and all(np.array_equal(ma[k], mb[k]) for k in ma)
    d = a.astype(float) - b.astype(float)
    assert 0 < np.abs(d).mean() and 10 * np.log10(255**2 / (d**2).mean()) > 28  # PSNR of the round trip


def test_flipped_pairs_name_the_other_eye(tmp_path):
    "A horizontal flip in the paired loader mirrors the image and swaps the eye in the report (data.mirror_laterality)."
    from maskedclip.data import ImageTextDataset, eval_transform, mirror_laterality

    root = build_corpus(tmp_path / "c", 6, 0, 0, size=64, seed=2, progress=False)
    recs = _read(root / "pretrain/paired.jsonl")
    plain = ImageTextDataset(
        recs, root, eval_transform(64, border_crop=False), hflip=0.0
    )  # border crop pads odd sizes asymmetrically
    flip = ImageTextDataset(recs, root, eval_transform(64, border_crop=False), hflip=1.0)
    for i, r in enumerate(recs):
        p, q = plain[i, 3], flip[i, 3]
        assert p["text"] == r["text"] and q["text"] == mirror_laterality(r["text"])
        side = "right" if r["eye"] == "OD" else "left"
        other = "left" if side == "right" else "right"
        if side in r["text"].lower():
            assert other in q["text"].lower() and side not in q["text"].lower()
        assert torch.allclose(q["image"], p["image"].flip(-1), atol=1e-5)
    assert (
        mirror_laterality("Right eye (OD), superotemporal; leftover, rightly.")
        == "Left eye (OS), superotemporal; leftover, rightly."
    )
    assert mirror_laterality("bright cottonwool, LEFT") == "bright cottonwool, RIGHT"


def test_neovascularisation_mask_sits_at_the_disc_for_nvd():
    f = Findings(lesions=[Lesion("neovascularisation", 0.66, -0.04, 0.12, 0.12, 0.0, "NVD")])
    img, m = render_fundus(f, 128, np.random.default_rng(0), nuisance=None)
    assert f.dr_grade == 4 and m["neovascularisation"].sum() > 5
    assert (m["neovascularisation"] & ndi.binary_dilation(m["optic_disc"], iterations=6)).sum() >= 0.9 * m[
        "neovascularisation"
    ].sum()


# ----------------------------------------------------------------------------------------------- reports
NEG = re.compile(r"^(No |There (is|are) no )")
KEYS = {
    "microaneurysm": r"microaneurysm",
    "cotton_wool_spot": r"cotton.wool",
    "hard_exudate": r"hard exudate",
    "neovascularisation": r"neovasculari[sz]ation|new vessels",
}


def test_reports_say_what_is_there_and_negate_what_is_not():
    rng = np.random.default_rng(17)
    for i in range(300):
        f = sample_findings(rng)
        text = write_report(f, np.random.default_rng(i))
        assert text == write_report(f, np.random.default_rng(i))
        assert f"{round(f.cdr, 1):.1f}" in text and len(re.findall(r"\.(\s|$)", text)) >= 2
        sents = re.split(r"(?<=\.)\s+", text)
        for kind, pat in KEYS.items():
            hits = [
                s
                for s in sents
                if re.search(pat, s, re.I) and not s.startswith(("Impression", "Conclusion", "Summary"))
            ]
            if f.count(kind):
                assert any(not NEG.match(s) for s in hits), (kind, text)
            else:
                assert all(NEG.match(s) for s in hits), (kind, text)
        haem = [
            s
            for s in sents
            if re.search(r"intraretinal h|retinal h|\bh(a)?emorrhages? (are|is) seen|dot|blot", s, re.I)
        ]
        if not f.count("haemorrhage"):
            assert all(NEG.match(s) for s in haem), text
        if f.cataract:
            assert re.search(r"cataract|lens opacity", text)


# ----------------------------------------------------------------------------------------------- calibration
def test_reference_constants_are_the_real_photo_statistics():
    ref = retina_reference(256)
    for k in ("mean", "std"):
        assert np.allclose(ref[k], RETINA_REFERENCE[k], atol=2e-4)
    for k in ("luminance", "texture"):
        assert abs(ref[k] - RETINA_REFERENCE[k]) < 2e-4


def test_default_renders_match_the_real_photo_statistics():
    st = [image_statistics(make_sample(0, i, 256).image) for i in range(32)]
    mean, std = np.mean([s["mean"] for s in st], 0), np.mean([s["std"] for s in st], 0)
    tex = np.mean([s["texture"] for s in st])
    assert np.all(np.abs(mean - RETINA_REFERENCE["mean"]) < 0.03), mean
    assert np.all(np.abs(std - RETINA_REFERENCE["std"]) < 0.025), std
    assert 0.7 < tex / RETINA_REFERENCE["texture"] < 1.4, tex
    assert mean[0] > 2 * mean[1] > 2 * 1.1 * mean[2] * 0.9  # orange-red: R >> G > B


# ----------------------------------------------------------------------------------------------- learnability
def _features(im: np.ndarray) -> np.ndarray:
    "Global colour histograms, normalised by the FOV median, and a local-contrast histogram (position free)."
    x = im.astype(np.float32) / 255
    fov = ndi.binary_erosion(x.mean(2) > 0.06, iterations=2)
    xn = x / (np.median(x[fov], 0) + 1e-3)
    g = xn[..., 1]
    loc = g - ndi.median_filter(g, 5)
    f = [
        np.histogram(g[fov], bins=np.linspace(0, 3, 16))[0],
        np.histogram(loc[fov], bins=[-9, -0.4, -0.3, -0.2, -0.12, 0.12, 0.2, 0.3, 0.5, 9])[0],
        np.histogram(xn[..., 2][fov], bins=np.linspace(0, 3, 10))[0],
    ]
    return np.concatenate(f) / fov.sum()


def test_glaucoma_and_dr_referral_are_learnable_but_not_from_brightness():
    S = [make_sample(1, i, 64) for i in range(600)]
    X = np.array([_features(s.image) for s in S])
    bright = np.array([[s.image.mean()] for s in S])
    tr, te = slice(0, 400), slice(400, 600)
    for task in ("glaucoma", "dr_referral"):
        y = np.array([s.findings.labels[task] for s in S])
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(X[tr], y[tr])
        auc = roc_auc_score(y[te], clf.predict_proba(X[te])[:, 1])
        b = LogisticRegression().fit(bright[tr], y[tr])
        auc_b = roc_auc_score(y[te], b.predict_proba(bright[te])[:, 1])
        assert auc > 0.7, (task, auc)
        assert auc_b < 0.65, (task, auc_b)


# ----------------------------------------------------------------------------------------------- corpus and CLI
def _read(p: Path) -> list[dict]:
    return [json.loads(l) for l in p.read_text().splitlines()]


def test_build_corpus_layout_counts_and_paths(tmp_path):
    splits = dict(train=5, val=3, test=4)
    root = build_corpus(
        tmp_path / "c", n_paired=12, n_unpaired=8, n_task_per_split=splits, size=64, seed=3, progress=False
    )
    meta = json.loads((root / "corpus.json").read_text())
    assert (
        meta["counts"]["paired"] == 12
        and meta["counts"]["unpaired"] == 8
        and meta["image_size"] == 64
        and meta["seed"] == 3
    )
    assert meta["label_spaces"] == TASKS
    paired, unpaired = _read(root / "pretrain/paired.jsonl"), _read(root / "pretrain/unpaired.jsonl")
    assert len(paired) == 12 and len(unpaired) == 8
    recs = paired + unpaired
    for task in TASKS:
        for split, n in splits.items():
            rs = _read(root / "tasks" / task / f"{split}.jsonl")
            assert len(rs) == n and meta["counts"]["tasks"][task][split] == n
            for r in rs:
                assert r["label"] in TASKS[task] and r["split"] == split and r["text"] is None
                if task == "dr_referral":
                    assert r["label"] == TASKS[task][int(r["dr_grade"] >= 2)]
                if task == "glaucoma":
                    assert r["label"] == TASKS[task][int(r["cdr"] >= 0.65)]
                if task == "dr_grade":
                    assert r["label"] == DR_GRADES[r["dr_grade"]]
                if task == "multi_disease":
                    assert r["label"] in r["labels"]
            recs += rs
    ids, idx = [r["id"] for r in recs], [r["index"] for r in recs]
    assert len(set(ids)) == len(ids) == 20 + 4 * 12 and len(set(idx)) == len(idx)
    for r in recs:
        assert (
            not Path(r["image"]).is_absolute()
            and (root / r["image"]).is_file()
            and r["source"] == "synthetic"
        )
        for kind, p in r["masks"].items():
            assert kind in LESION_TYPES and (root / p).is_file()
            m = Image.open(root / p)
            assert m.mode == "L" and set(np.unique(np.asarray(m))) <= {0, 255}
    for r in paired:
        assert (
            r["text"]
            and r["label"] in TASKS["multi_disease"]
            and r["label"] in r["labels"]
            and r["split"] == "train"
        )
    for r in unpaired:
        assert r["text"] is None and r["label"] is None and "dr_grade" not in r and "cdr" not in r
    # the files are the renders of the recorded sample index
    r = paired[4]
    s = make_sample(3, r["index"], 64)
    assert (root / r["image"]).read_bytes() == png_bytes(s.image) and r["text"] == s.report
    assert set(r["masks"]) == set(s.lesion_masks)
    with pytest.raises(FileExistsError, match="overwrite"):
        build_corpus(root, 1, 1, 1, progress=False)
    build_corpus(root, 2, 1, dict(test=1), progress=False, overwrite=True)
    assert (
        len(list((root / "images").glob("*.png"))) == 2 + 1 + 4
        and len(_read(root / "tasks/glaucoma/train.jsonl")) == 0
    )


def test_build_corpus_is_identical_with_workers(tmp_path):
    kw = dict(n_paired=6, n_unpaired=4, n_task_per_split=2, size=64, seed=1, progress=False)
    a, b = (
        build_corpus(tmp_path / "a", num_workers=1, **kw),
        build_corpus(tmp_path / "b", num_workers=2, **kw),
    )
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / p).read_bytes() == (b / p).read_bytes() for p in files)


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="size"):
        render_fundus(Findings(), 8)
    with pytest.raises(ValueError, match="seed"):
        make_sample(-1, 0)
    with pytest.raises(ValueError, match="splits"):
        build_corpus(tmp_path / "x", 1, 1, dict(dev=3), progress=False)
    with pytest.raises(ValueError, match="p_glaucoma"):
        FindingPrior(p_glaucoma=-0.1)
    with pytest.raises(ValueError, match="rotation"):
        Nuisance(rotation=(5, -5))


# ------------------------------------------------------------------------------- extended signs of disease (D40)
def test_extended_signs_keep_every_label_and_the_anatomy_masks():
    """Same seed, same eye: labels, CDR, lesion kinds and per-quadrant haemorrhage counts agree with the default;
    the disc and cup masks are identical; only glaucomatous eyes get RNFL defects; the default has none."""
    from maskedclip.synthetic.findings import haemorrhages_per_quadrant

    px = FindingPrior(extended_signs=True)
    for i in range(300):
        a, b = sample_findings(np.random.default_rng(i)), sample_findings(np.random.default_rng(i), px)
        assert a.labels == b.labels and a.cdr == b.cdr
        assert sorted(l.kind for l in a.lesions) == sorted(l.kind for l in b.lesions)
        assert haemorrhages_per_quadrant(a.lesions) == haemorrhages_per_quadrant(b.lesions)
        assert bool(b.rnfl_defects) == b.glaucoma and not (a.rnfl_defects or a.ppa or a.venous_dilation)
    for i in range(6):
        sa, sb = make_sample(0, i, 64), make_sample(0, i, 64, px)
        assert sa.findings.labels == sb.findings.labels
        assert all(np.array_equal(sa.masks[k], sb.masks[k]) for k in ("optic_disc", "optic_cup"))
        assert {k for k, m in sa.masks.items() if m.any()} == {k for k, m in sb.masks.items() if m.any()}


def test_extended_signs_cluster_haemorrhages_and_darken_the_rnfl_wedge():
    "Haemorrhages sit closer to their nearest neighbour; a wedge defect darkens green inside it and nothing far away."
    from dataclasses import replace

    px, d = FindingPrior(extended_signs=True), []
    for i in range(400):
        fs = sample_findings(np.random.default_rng(i)), sample_findings(np.random.default_rng(i), px)
        if 5 <= fs[0].count("haemorrhage") <= 40:
            p = [np.array([(l.x, l.y) for l in f.lesions if l.kind == "haemorrhage"]) for f in fs]
            dist = [np.hypot(*(q[:, None] - q[None]).transpose(2, 0, 1)) + 9 * np.eye(len(q)) for q in p]
            d.append([x.min(1).mean() for x in dist])
    d = np.array(d)
    assert len(d) > 50 and d[:, 1].mean() < 0.6 * d[:, 0].mean()
    f0 = Findings(cdr=0.8)
    f1 = replace(f0, rnfl_defects=((120.0, 16.0, 0.6, 0.3),))
    a, ma = render_fundus(f0, 128, np.random.default_rng(3), None)
    b, mb = render_fundus(f1, 128, np.random.default_rng(3), None)
    assert all(np.array_equal(ma[k], mb[k]) for k in ma)
    r = (b[..., 1].astype(float) + 1) / (a[..., 1].astype(float) + 1)
    assert (r < 0.85).sum() > 150 and np.median(r[a[..., 1] > 0]) > 0.97  # a darker wedge, the rest unchanged
    rows, cols = np.nonzero(r < 0.85)
    assert rows.mean() > 64  # inferior (y grows down; no rotation in the canonical camera)


def test_extended_signs_bad_inputs():
    with pytest.raises(ValueError, match="extended_signs"):
        FindingPrior(extended_signs="yes")
    with pytest.raises(ValueError, match="rnfl_defects"):
        Findings(rnfl_defects=((120.0, -5.0, 0.5, 0.3),))
    with pytest.raises(ValueError, match="ppa"):
        Findings(ppa=-0.1)


def test_cli_builds_and_summarises(tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        main(
            [
                "--out",
                str(out),
                "--n-paired",
                "4",
                "--n-unpaired",
                "3",
                "--n-task",
                "2,1,1",
                "--size",
                "64",
                "--seed",
                "2",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "paired 4" in text and "unpaired 3" in text and "glaucoma" in text
    assert (
        len(_read(out / "tasks/dr_grade/train.jsonl")) == 2 and len(_read(out / "pretrain/paired.jsonl")) == 4
    )
    with pytest.raises(SystemExit):
        main(
            ["--out", str(out), "--n-paired", "1", "--n-unpaired", "1", "--n-task", "1", "--no-progress"]
        )  # exists
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "y"), "--n-task", "1,2"])
