"""MLIP's patch-level claims at equal compute (issue 18): random init, MAE, CLIP, MaskedCLIP and MLIP encoders
pre-trained on the demo corpus and measured on what MLIP claims locally.

Protocol, fixed before any run (nothing below is changed after looking at results):

* Corpus: the demo's (`maskedclip.demo._demo_corpus` sizes: 1024 paired, 8192 unpaired, 1000 / 500 / 1000 images per
  task split, 64 px, seed 0).
* Pre-training: `demo` preset with each method's switches (`mae`, `clip`, `maskedclip`, `mlip`), the demo's recipe
  (`_demo_config`: 500 steps of 32 + 32 images, lr 1e-3, warm-up 50, crops 0.2-1, flips 0.5, seed 0, precision
  'auto'), except a checkpoint every 50 steps, all kept (for φ over training; checkpoints do not change training).
  MLIP here is `demo` + `with_method('mlip')`: integrity 'maco' (φ one weight per grid position, `mode='mask'`), OT on,
  the encoder's masked view for the contrastive terms, the demo's mask ratio. Random init: the `demo`/`mlip` model
  built with `torch.manual_seed(0)` (random ViT; its text tower is the same frozen MiniLM, its projections random).
* Feature diagnostics: the encoder's patch tokens (CLS dropped) of the multi_disease test images (full image, eval
  mode): mean within-image patch cosine, entropy effective rank (of 64 tokens, width 192), within-image variance share;
  the same for the joint-space patch embeddings of the text-aligned models (`viz.patch_embeddings`, projection 'auto').
  Over training: the trainer's `diag/*` rows (every 50 steps).
* Few-shot segmentation (primary outcome): red lesions (microaneurysm + haemorrhage), multi_disease train -> test
  (1000 -> 1000 at demo scale); `segmentation_curve` with a linear sub-patch head (`subpatch=8`), 300 AdamW steps, lr 1e-2, batch 16;
  fractions 1 / 10 / 100 % of the training masks, seeds 0 1 2; Dice pooled over the test split (`dice_pooled`) and the
  per-image mean over images with a lesion (`dice_lesion`), each with a 1000-resample bootstrap 95 % CI per seed.
  "MLIP >= random with non-overlapping CIs" means: at that fraction every seed's pooled-Dice CI of MLIP lies above
  every seed's CI of random init.
* Pointing game: red-lesion prompts (`segmentation.DEFAULT_LESION_PROMPTS`) on the multi_disease test images that have
  that lesion; models with a text tower only (MAE has none); Wilson 95 % interval; chance = mean lesion area.
* Zero-shot AUROC: `evaluate_all(protocol='zero_shot')` on the demo's zero-shot tasks (glaucoma, dr_referral), seed 0,
  500 bootstrap resamples; text-aligned models only.
* OT matched-vs-shuffled (models with `patch_proj`: MLIP and its random init): `segmentation.ot_alignment` on 8
  batches of 32 HELD-OUT pairs (renderer seed 0, sample indices 9e8 + k: eyes in no pool of the corpus) and, for
  contrast, 8 batches of 32 training pairs (the first 256 of `pretrain/paired.jsonl`); full image, 10 derangements per
  batch; mean over batches with a t 95 % interval; top-1 against chance 1/32.
* φ over training (MLIP): from every checkpoint (`phi_history`): std, range; Pearson correlation with the per-patch
  lesion frequency (all lesion types, multi_disease train split) over field-of-view patches (frequency > 0), and the
  position-controlled test: partial correlation of φ with lesion frequency given the patch's distance from the image
  centre (`segmentation.phi_partial_correlation`: both residualised on radius and radius², t-test with n - 4 dof).
* Which loss term drives collapse (MLIP, checkpoints at steps 50 and 500): on 32 fixed test images, the first-order
  change of the encoder's patch cosine C if the encoder took a step down one loss part only (mim, mcl, ot):
  `dC = -<grad C, grad L_part>` (SGD) and `-<grad C, sign(grad L_part)>` (Adam's early steps), per unit step; > 0 means
  the term pushes the patch tokens of one image together.

Scale of the committed run (`experiments/results/mlip-study/`), fixed for CPU time before any result was seen (2
cores shared by three jobs: the full demo corpus alone took ~40 min to render there): the demo corpus's pools with
fewer images (`--n-unpaired 2048 --n-task 500`: the same 1024 paired eyes, the first 2048 unpaired eyes, 500 train /
50 val / 500 test per task) and `--steps 300 --save-every 30` (300 steps of 32 + 32 for every method, warm-up 30).

Added after the committed run (issue 18, items 3-5), each protocol fixed before its run:

* MaskedCLIP re-run: its weights were lost before the zero-shot and per-layer rows were measured; it was pre-trained
  again with the same command and seed (`--methods maskedclip --precision fp32`). A re-run on another CPU need not
  be bit-identical to the lost one, so every MaskedCLIP row of the table comes from the re-run, and the lost run's
  measured rows stay in `results.json` as `maskedclip-run1` (a second run of the same recipe).
* `mlip+ot4` (one change aimed at the measured cause): the term attribution of the committed MLIP run says that at
  the final checkpoint `mim` (dC +0.0102) and `mcl` (+0.0183) push an image's patch tokens together and `ot`
  (-0.0100) pushes them apart, all at weight 1. Change: `model.mlip.lambda_ot` 1 -> 4 (the first integer above
  (0.0102 + 0.0183) / 0.0100 = 2.85, where the first-order sum of the three turns to "apart"); nothing else.
  Measured as every other encoder (all kinds above), compared with random init and unchanged MLIP on pooled Dice at
  1 / 10 / 100 % with the same separation rule, and on the encoder patch cosine. The `mlip` preset's default changes
  only if `mlip+ot4`'s pooled-Dice CIs lie above unchanged MLIP's at all three fractions.
  `--methods mlip --tag ot4 --overrides model.mlip.lambda_ot=4 --precision fp32`.
* Precision: the committed runs resolved `--precision auto` to fp32 (a CPU without bf16); on a CPU with bf16 'auto'
  means bf16, so every run added here passes `--precision fp32`.
* φ where lesion position is not a function of radius (`mlip+angular`, `random+angular`): the same pools and seeds
  rendered with `FindingPrior(lesion_angle_bias=0.8)` (lesion centres moved along their circle about the FOV centre
  to density ∝ 1 + 0.8·cos(θ − 90°), inferior; `02a_synthetic_findings`) into OUT/corpus-angular; MLIP pre-trained
  on it exactly as `mlip`; every measurement as above on that corpus (segmentation against `random+angular`).
  Primary: the partial correlation of the final φ with that corpus's lesion-frequency map (all lesion types,
  multi_disease train split) given radius (degree 2, FOV patches), t-test p and Fisher-z 95 % CI; also over
  training. Power check (`lesion_map`, per corpus): the frequency map's share of variance left after radius and its
  partial correlation with the direction cos(θ − 90°) given radius. "φ follows lesions beyond position" needs the
  final partial r > 0 with p < 0.05.
  `--corpus OUT/corpus-angular --corpus-prior lesion_angle_bias=0.8 --tag angular --methods mlip random
  --precision fp32`.

Outputs under `--out`: `results.jsonl` (one line per measurement as it is made), `results.json` (all of them),
`provenance.json` (commit, command, timings). The pre-training runs stay under `--out/runs/<method>`.

    nice -n 19 python experiments/mlip_study.py --out runs/mlip-study --results experiments/results/mlip-study
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by path (tests)
from _provenance import git as _git  # noqa: E402

METHODS = (
    "mlip",
    "random",
    "mae",
    "clip",
    "maskedclip",
)  # order of work: MLIP first, MaskedCLIP (slowest) last
RED = ("microaneurysm", "haemorrhage")
KINDS = (
    "lesion_map",
    "diagnostics",
    "segmentation",
    "pointing_game",
    "zero_shot",
    "ot_heldout",
    "diag_over_training",
    "phi",
    "layers",
    "term_attribution",
)


class Log:
    "Append measurements to `results.jsonl` as they are made, keep them for `results.json`."

    def __init__(self, out: Path):
        self.path, self.rows = out / "results.jsonl", []
        if self.path.is_file():
            self.rows = [json.loads(l) for l in self.path.read_text().splitlines() if l.strip()]

    def done(self, encoder: str, kind: str) -> bool:
        return any(r["encoder"] == encoder and r["kind"] == kind for r in self.rows)

    def add(self, encoder: str, kind: str, **data):
        row = dict(encoder=encoder, kind=kind, **data)
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row, default=_jsonable) + "\n")
        print(f"[{time.strftime('%H:%M:%S')}] {encoder} {kind}: {_short(data)}", flush=True)


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def _short(d: dict) -> str:
    s = json.dumps(d, default=_jsonable)
    return s if len(s) < 400 else s[:400] + " ..."


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    "Wilson score interval of a proportion k / n."
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (c - h, c + h)


def t_interval(x) -> tuple[float, float, float]:
    "(mean, low, high): t 95 % interval of the mean of `x`."
    from scipy.stats import t

    x = np.asarray(x, float)
    m = float(x.mean())
    if len(x) < 2:
        return m, float("nan"), float("nan")
    h = float(t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return m, m - h, m + h


# ----------------------------------------------------------------------------- pre-training


def base_method(name: str) -> str:
    "`mlip+ot4` -> `mlip`: an encoder's name is its method, then `+tag` for a run with `--overrides` / `--corpus-prior`."
    return name.split("+")[0]


def parse_settings(items) -> dict:
    "`['model.mlip.lambda_ot=4', 'x=abc']` -> `{'model.mlip.lambda_ot': 4, 'x': 'abc'}` (values read as JSON when they parse)."
    out = {}
    for it in items or ():
        k, sep, v = it.partition("=")
        if not sep or not k:
            raise SystemExit(f"expected key=value, got {it!r}")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def pretrain(method: str, corpus: Path, run: Path, a) -> float:
    """The demo's pre-training of `method` (see the docstring), plus `a.overrides` (dotted config keys); returns
    seconds (0 if it was already there)."""
    from maskedclip.train import experiment_config, train

    if (run / "final" / "model.safetensors").is_file():
        return 0.0
    cfg = experiment_config(
        "demo",
        method,
        steps=a.steps,
        lr=1e-3,
        warmup_steps=max(1, a.steps // 10),
        paired_batch_size=a.batch_size,
        unpaired_batch_size=a.batch_size,
        synthetic=True,
        synthetic_dir=str(corpus),
        output_dir=str(run),
        save_every=a.save_every,
        seed=0,
        overrides={
            "model.vision.image_size": 64,
            "train.resume": "latest",
            "train.keep_last": a.steps // a.save_every + 2,
            "train.precision": a.precision,
            "data.crop_scale_min": 0.2,
            "data.hflip": 0.5,
            **parse_settings(a.overrides),
        },
    )
    t0 = time.time()
    train(cfg, progress=False)
    return time.time() - t0


def load_model(name: str, runs: Path):
    from maskedclip.config import get_preset
    from maskedclip.model import MaskedCLIP

    if base_method(name) == "random":
        torch.manual_seed(0)
        return MaskedCLIP(get_preset("demo", "mlip")).eval()
    return MaskedCLIP.from_pretrained(runs / name / "final").eval()


# ----------------------------------------------------------------------------- measurements


def diagnostics(log: Log, name: str, model, test):
    from maskedclip.diagnostics import effective_rank, patch_cosine, within_image_variance
    from maskedclip.segmentation import patch_features
    from maskedclip.viz import patch_embeddings

    f = patch_features(model, test.images)
    d = dict(
        encoder_patch_cos=patch_cosine(f),
        encoder_erank=effective_rank(f),
        encoder_within_var=within_image_variance(f),
        n_images=len(f),
        width=f.shape[-1],
        n_tokens=f.shape[1],
    )
    if getattr(model, "image_proj", None) is not None:
        p = torch.cat(
            [patch_embeddings(model, test.images[i : i + 128], "auto") for i in range(0, len(f), 128)]
        )
        d.update(
            joint_patch_cos=patch_cosine(p),
            joint_erank=effective_rank(p),
            joint_within_var=within_image_variance(p),
        )
    log.add(name, "diagnostics", **d)


def segmentation(log: Log, name: str, model, train, test, a):
    from maskedclip.segmentation import segmentation_curve

    df = segmentation_curve(
        model,
        train,
        test,
        fractions=(0.01, 0.1, 1.0),
        seeds=tuple(a.seg_seeds),
        steps=a.seg_steps,
        subpatch=8,
        n_boot=a.n_boot,
    )
    log.add(name, "segmentation", runs=df.to_dict("records"))


def pointing(log: Log, name: str, model, test):
    from maskedclip.segmentation import pointing_game_score

    if getattr(model, "text", None) is None or getattr(model, "image_proj", None) is None:
        log.add(name, "pointing_game", skipped="no text tower")
        return
    r = pointing_game_score(model, test.images, {l: test.lesion_masks[l] for l in RED})
    r["hit_ci"] = wilson(r["hits"], r["n"])
    log.add(name, "pointing_game", **r)


def zero_shot(log: Log, name: str, runs: Path, corpus: Path, n_boot: int = 500):
    from maskedclip import evaluate as ev
    from maskedclip.demo import ZERO_SHOT_TASKS

    zs = ev.evaluate_all(
        {name: str(runs / name / "final")},
        tasks=ZERO_SHOT_TASKS,
        protocol="zero_shot",
        corpus_root=corpus,
        seeds=(0,),
        n_boot=n_boot,
        progress=False,
        log=None,
    )
    log.add(name, "zero_shot", rows=zs[["task", "auroc", "ci_low", "ci_high"]].to_dict("records"))


def _pairs_heldout(n: int, start: int = 9 * 10**8):
    from PIL import Image

    from maskedclip.data import eval_transform
    from maskedclip.synthetic import make_sample

    tf = eval_transform(64)
    ss = [make_sample(0, start + k, 64) for k in range(n)]
    return torch.stack([tf(Image.fromarray(s.image)) for s in ss]), [s.report for s in ss]


def _pairs_training(corpus: Path, n: int):
    from maskedclip.data import eval_transform, load_image

    tf = eval_transform(64)
    recs = [json.loads(l) for l in (corpus / "pretrain" / "paired.jsonl").read_text().splitlines()[:n]]
    return torch.stack([tf(load_image(corpus / r["image"])) for r in recs]), [r["text"] for r in recs]


def ot(log: Log, name: str, model, pairs: dict, batch: int = 32):
    from maskedclip.segmentation import ot_alignment

    if getattr(model, "patch_proj", None) is None:
        return
    for which, (x, texts) in pairs.items():
        per = []
        for b in range(0, len(texts), batch):
            r = ot_alignment(model, x[b : b + batch], texts[b : b + batch], n_shuffles=10, seed=b)
            r.pop("similarity")
            per.append(r)
        m, s, t1 = (np.array([r[k] for r in per]) for k in ("matched_loss", "shuffled_loss", "top1"))
        log.add(
            name,
            f"ot_{which}",
            matched=t_interval(m),
            shuffled=t_interval(s),
            shuffled_minus_matched=t_interval(s - m),
            top1=t_interval(t1),
            chance_top1=1 / batch,
            n_batches=len(per),
            batches=per,
        )


def fisher_ci(r: float, n: int, k: int = 2, z: float = 1.959964) -> tuple[float, float]:
    "95 % interval of a (partial) correlation `r` over `n` points with `k` controlled regressors: atanh(r) ± z/√(n−k−3)."
    if not (n - k - 3 > 0 and abs(r) < 1):
        return (float("nan"), float("nan"))
    h = z / math.sqrt(n - k - 3)
    return (math.tanh(math.atanh(r) - h), math.tanh(math.atanh(r) + h))


def direction_map(grid: tuple[int, int], theta0_deg: float = 90.0) -> np.ndarray:
    "cos(θ − θ0) of each patch centre about the image centre (image frame: y down, so θ0 = 90° is inferior)."
    gh, gw = grid
    y, x = np.meshgrid(np.arange(gh) + 0.5 - gh / 2, np.arange(gw) + 0.5 - gw / 2, indexing="ij")
    return np.cos(np.arctan2(y, x) - math.radians(theta0_deg))


def lesion_map(log: Log, key: str, train_all, grid: tuple[int, int]):
    """How much of the corpus's lesion-frequency map (all lesion types, multi_disease train split) a φ test given
    radius can use: the share of its variance left after radius, and its partial correlation with the direction
    cos(θ − 90°) (inferior) given radius (the angular variant's axis; ~0 on the default corpus)."""
    from maskedclip.segmentation import lesion_frequency_map, phi_partial_correlation

    freq = lesion_frequency_map(train_all, grid).numpy()
    fov = freq > 0
    d = phi_partial_correlation(direction_map(grid), freq, where=fov)
    d["partial_r_ci"] = fisher_ci(d["partial_r"], d["n_patches"])
    log.add(key, "lesion_map", direction_given_radius=d, rows_superior_to_inferior=freq.mean(1).tolist())


def phi_stats(log: Log, run: Path, train_all, name: str = "mlip"):
    from maskedclip.segmentation import (
        lesion_frequency_map,
        phi_history,
        phi_lesion_correlation,
        phi_partial_correlation,
    )

    hist = phi_history(run)
    grid = tuple(hist[0][1].shape)
    freq = lesion_frequency_map(train_all, grid).numpy()
    fov = freq > 0
    rows = []
    for step, p in hist:
        p = p.double().numpy()
        row = dict(step=step, std=float(p.std()), range=float(p.max() - p.min()), mean=float(p.mean()))
        if p.std() > 0:
            row["corr_lesion_freq_fov"] = phi_lesion_correlation(p, freq, where=fov)
            pc = phi_partial_correlation(p, freq, where=fov)
            row["partial_given_radius"] = dict(pc, partial_r_ci=fisher_ci(pc["partial_r"], pc["n_patches"]))
        rows.append(row)
    log.add(
        name,
        "phi",
        mode="mask (one weight per grid position, shared by all images)",
        history=rows,
        phi_final=hist[-1][1].tolist(),
        lesion_freq=freq.tolist(),
        n_fov_patches=int(fov.sum()),
    )


def term_attribution(log: Log, run: Path, test, step_dirs, name: str = "mlip"):
    "First-order effect of each MLIP loss part on the encoder's patch cosine (see the docstring)."
    from maskedclip.data import Batch
    from maskedclip.model import MaskedCLIP

    x = test.images[:32]
    recs = [
        json.loads(l) for l in (Path(a_corpus) / "pretrain" / "paired.jsonl").read_text().splitlines()[:32]
    ]
    out = []
    for ck in step_dirs:
        model = MaskedCLIP.from_pretrained(ck)
        model.train()
        enc_params = [p for p in model.encoder.parameters() if p.requires_grad]

        def cos_of():
            t = torch.nn.functional.normalize(model.encoder(x).tokens[:, 1:], dim=-1)
            L = t.shape[1]
            return (((t.sum(1) ** 2).sum(-1) - L) / (L * (L - 1))).mean()

        model.eval()
        c = cos_of()
        gc = torch.autograd.grad(c, enc_params)
        model.train()
        from maskedclip.data import eval_transform, load_image

        tf = eval_transform(64)
        imgs = torch.stack([tf(load_image(Path(a_corpus) / r["image"])) for r in recs])
        tok = model.tokenize([r["text"] for r in recs], with_sentences=True)
        batch = Batch(
            paired_images=imgs,
            input_ids=tok["input_ids"],
            attention_mask=tok["attention_mask"],
            sentence_ids=tok.get("sentence_ids"),
        )
        g = torch.Generator().manual_seed(0)
        parts = model(batch, generator=g).parts
        row = dict(checkpoint=ck.name, patch_cos=float(c))
        for k, v in parts.items():
            gk = torch.autograd.grad(v, enc_params, retain_graph=True, allow_unused=True)
            pairs = [(a, b) for a, b in zip(gc, gk) if b is not None]
            dot = sum(float((a * b).sum()) for a, b in pairs)
            sdot = sum(float((a * b.sign()).sum()) for a, b in pairs)
            na = math.sqrt(sum(float((a * a).sum()) for a, _ in pairs))
            nb = math.sqrt(sum(float((b * b).sum()) for _, b in pairs))
            row[k] = dict(
                loss=float(v),
                dC_sgd=-dot,
                dC_sign=-sdot,
                cos_angle=-dot / max(na * nb, 1e-30),
                grad_norm=nb,
                weight=dict(
                    mim=model.config.lambda_mim,
                    mcl=model.config.lambda_lg_clip,
                    ot=model.config.mlip.lambda_ot,
                ).get(k, 1.0),
            )
        out.append(row)
    log.add(name, "term_attribution", rows=out)


a_corpus = None  # set in main (term_attribution reads training pairs)


@torch.no_grad()
def _layer_tokens(enc, images: torch.Tensor, batch_size: int = 100) -> list[torch.Tensor]:
    "Patch tokens `(N, L, D)` after the patch embedding (+ positions), after each block, and after the final norm."
    was = enc.training
    enc.eval()
    outs = None
    for i in range(0, len(images), batch_size):
        x = enc.patch_embed(images[i : i + batch_size]) + enc.pos_embed[:, 1:, :]
        cls = (enc.cls_token + enc.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        got = [x]
        for blk in enc.blocks:
            x = blk(x)
            got.append(x)
        got.append(enc.norm(x))
        got = [g[:, 1:].float() for g in got]
        outs = got if outs is None else [torch.cat([o, g]) for o, g in zip(outs, got)]
    enc.train(was)
    return outs


def layer_segmentation(log: Log, name: str, model, train, test, steps: int = 300, n_boot: int = 1000):
    """Added after the protocol (post hoc, issue 18 item 1: where is the lesion information lost?): patch cosine,
    effective rank and 100 %-mask Dice (seed 0, same head) of the tokens after the patch embedding, each block and
    the final norm (the last = the features of the main table)."""
    from maskedclip.diagnostics import effective_rank, patch_cosine
    from maskedclip.segmentation import _fit_and_score, as_encoder, encoder_grid

    enc = as_encoder(model)
    grid, _ = encoder_grid(enc)
    ftr, fte = _layer_tokens(enc, train.images), _layer_tokens(enc, test.images)
    names = ["patch_embed+pos", *[f"block_{k + 1}" for k in range(len(enc.blocks))], "final_norm"]
    rows = []
    for nm, a, b in zip(names, ftr, fte):
        r = _fit_and_score(a, b, train, test, grid, 1.0, 0, steps=steps, subpatch=8, n_boot=n_boot)
        rows.append(
            dict(
                layer=nm,
                patch_cos=patch_cosine(b),
                erank=effective_rank(b),
                dice_pooled=r["dice_pooled"],
                dice_pooled_ci=r["dice_pooled_ci"],
                dice_lesion=r["dice_lesion"],
            )
        )
    log.add(name, "layers", rows=rows)


def training_diag(log: Log, name: str, run: Path):
    from maskedclip.train import read_metrics

    rows = [r for r in read_metrics(run / "metrics.jsonl") if any(k.startswith("diag/") for k in r)]
    log.add(
        name,
        "diag_over_training",
        rows=[{k: v for k, v in r.items() if k == "step" or k.startswith("diag/")} for r in rows],
    )


# ----------------------------------------------------------------------------- the tables


def _f(v, n=3):
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{n}f}"


def _ci(lo, hi, n=3):
    return f"[{_f(lo, n)}, {_f(hi, n)}]"


def seg_table(rows: list[dict], baseline: str = "random") -> list[dict]:
    "Per encoder and fraction: pooled / lesion Dice (mean over seeds, CI span over seeds) and separation from random."
    import pandas as pd

    seg = [dict(encoder=r["encoder"], **x) for r in rows if r["kind"] == "segmentation" for x in r["runs"]]
    df = pd.DataFrame(seg)
    out = []
    for (enc, frac), g in df.groupby(["encoder", "fraction"], sort=False):
        # a variant's baseline is the random init measured with it (same corpus), if any
        tag = enc.partition("+")[2]
        base = f"{baseline}+{tag}" if tag and (df.encoder == f"{baseline}+{tag}").any() else baseline
        b = df[(df.encoder == base) & (df.fraction == frac)]
        lo = min(c[0] for c in g.dice_pooled_ci)
        hi = max(c[1] for c in g.dice_pooled_ci)
        row = dict(
            encoder=enc,
            fraction=frac,
            dice_pooled=g.dice_pooled.mean(),
            pooled_ci_low=lo,
            pooled_ci_high=hi,
            dice_lesion=g.dice_lesion.mean(),
            n_seeds=len(g),
        )
        if len(b) and enc != base:
            bl, bh = min(c[0] for c in b.dice_pooled_ci), max(c[1] for c in b.dice_pooled_ci)
            row["above_random"] = bool(lo > bh)
            row["below_random"] = bool(hi < bl)
        out.append(row)
    return out


def write_tables(rows: list[dict], path: Path):
    "`table.md`: every measurement of the study as markdown tables."
    by = {(r["encoder"], r["kind"]): r for r in rows}
    encs = list(dict.fromkeys(r["encoder"] for r in rows))
    L = ["# MLIP study (issue 18): tables", ""]
    L += ["## Patch-token diagnostics (multi_disease test split, full image)", ""]
    L += [
        "| encoder | patch cos | e-rank | within-image var | joint patch cos | joint e-rank |",
        "|---|---|---|---|---|---|",
    ]
    for e in encs:
        d = by.get((e, "diagnostics"))
        if d:
            L.append(
                f"| {e} | {_f(d['encoder_patch_cos'])} | {_f(d['encoder_erank'], 1)} | {_f(d['encoder_within_var'])} "
                f"| {_f(d.get('joint_patch_cos'))} | {_f(d.get('joint_erank'), 1)} |"
            )
    L += [
        "",
        "## Few-shot red-lesion segmentation (Dice; mean over seeds, [lowest CI low, highest CI high] over seeds)",
        "",
    ]
    L += [
        "| encoder | fraction | pooled Dice | CI | lesion-image Dice | vs random (pooled CIs; random+TAG for a TAG run on its own corpus) |",
        "|---|---|---|---|---|---|",
    ]
    for r in seg_table(rows):
        vs = (
            "above"
            if r.get("above_random")
            else "below"
            if r.get("below_random")
            else ("overlap" if "above_random" in r else "")
        )
        L.append(
            f"| {r['encoder']} | {r['fraction']:g} | {_f(r['dice_pooled'])} | {_ci(r['pooled_ci_low'], r['pooled_ci_high'])} "
            f"| {_f(r['dice_lesion'])} | {vs} |"
        )
    L += [
        "",
        "## Pointing game (red-lesion prompts; Wilson 95 % CI) and zero-shot AUROC (95 % bootstrap CI)",
        "",
    ]
    L += [
        "| encoder | hit rate | CI | n | chance | zero-shot glaucoma | zero-shot dr_referral |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in encs:
        if not any((e, k) in by for k in ("pointing_game", "zero_shot")):
            continue
        pg, zs = by.get((e, "pointing_game"), {}), by.get((e, "zero_shot"), {})
        z = {x["task"]: x for x in zs.get("rows", [])}
        zc = [
            f"{_f(z[t]['auroc'])} {_ci(z[t]['ci_low'], z[t]['ci_high'])}" if t in z else "–"
            for t in ("glaucoma", "dr_referral")
        ]
        if "hit_rate" in pg:
            L.append(
                f"| {e} | {_f(pg['hit_rate'])} | {_ci(*pg['hit_ci'])} | {pg['n']} | {_f(pg['chance'])} | {zc[0]} | {zc[1]} |"
            )
        else:
            L.append(f"| {e} | – | – | – | – | {zc[0]} | {zc[1]} |")
    L += [
        "",
        "## OT patch–sentence matching: local InfoNCE loss, matched vs shuffled reports (mean, t 95 % CI over batches of 32)",
        "",
    ]
    L += [
        "| encoder | pairs | matched | shuffled | shuffled − matched | top-1 (chance 0.031) |",
        "|---|---|---|---|---|---|",
    ]
    for e in encs:
        for w in ("heldout", "training"):
            o = by.get((e, f"ot_{w}"))
            if o:
                m, s, d, t1 = o["matched"], o["shuffled"], o["shuffled_minus_matched"], o["top1"]
                L.append(
                    f"| {e} | {w} | {_f(m[0])} | {_f(s[0])} | {_f(d[0])} {_ci(d[1], d[2])} | {_f(t1[0])} {_ci(t1[1], t1[2])} |"
                )
    for e in encs:
        ph = by.get((e, "phi"))
        if not ph:
            continue
        L += [
            "",
            f"## φ over training ({e}, {ph['mode']}; correlations over {ph['n_fov_patches']} field-of-view patches)",
            "",
        ]
        L += [
            "| step | std | range | r(φ, lesion freq) | partial r given radius | 95 % CI (Fisher z) | p | r(φ, radius) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for h in ph["history"]:
            c, pc = h.get("corr_lesion_freq_fov", {}), h.get("partial_given_radius", {})
            L.append(
                f"| {h['step']} | {_f(h['std'], 4)} | {_f(h['range'], 4)} | {_f(c.get('pearson'))} | {_f(pc.get('partial_r'))} "
                f"| {_ci(*fisher_ci(pc.get('partial_r', float('nan')), pc.get('n_patches', pc.get('n', 0))))} | {_f(pc.get('p'))} | {_f(pc.get('r_phi_control', pc.get('r_phi_radius')))} |"
            )
        h = ph["history"][-1].get("partial_given_radius", {})
        L += [
            "",
            f"r(lesion freq, radius) = {_f(h.get('r_freq_control', h.get('r_freq_radius')))}; share of the frequency map's variance left after radius: {_f(h.get('freq_resid_share'))}",
        ]
    for e in encs:
        ta = by.get((e, "term_attribution"))
        if not ta:
            continue
        L += [
            "",
            f"## Which loss term moves the encoder's patch cosine C ({e}; first order, 32 test images; > 0 = pushes tokens together; dC of the unweighted term, weight = its λ in the loss)",
            "",
        ]
        L += [
            "| checkpoint | C | term | weight | loss | dC (SGD step) | cos(−∇L, ∇C) | dC (sign step) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in ta["rows"]:
            for k in ("mim", "mcl", "ot"):
                if k in r:
                    x = r[k]
                    L.append(
                        f"| {r['checkpoint']} | {_f(r['patch_cos'])} | {k} | {x.get('weight', 1.0):g} | {_f(x['loss'])} | {x['dC_sgd']:.2e} | {_f(x['cos_angle'])} | {x['dC_sign']:.2e} |"
                    )
    maps = [(e, by[(e, "lesion_map")]) for e in encs if (e, "lesion_map") in by]
    if maps:
        L += [
            "",
            "## The corpora's lesion-frequency maps (multi_disease train split, all lesion types): what a φ test given radius can use",
            "",
            "| corpus | share of variance left after radius | partial r with direction (inferior) given radius | 95 % CI | p |",
            "|---|---|---|---|---|",
        ]
        for e, m in maps:
            d = m["direction_given_radius"]
            L.append(
                f"| {e} | {_f(d['freq_resid_share'])} | {_f(d['partial_r'])} | {_ci(*d['partial_r_ci'])} | {_f(d['p'], 4)} |"
            )
    lay = [(e, by[(e, "layers")]) for e in encs if (e, "layers") in by]
    if lay:
        L += [
            "",
            "## Where the lesion information goes: tokens per layer (post hoc; 100 % masks, seed 0)",
            "",
        ]
        L += ["| encoder | layer | patch cos | e-rank | pooled Dice | CI |", "|---|---|---|---|---|---|"]
        for e, d in lay:
            for r in d["rows"]:
                L.append(
                    f"| {e} | {r['layer']} | {_f(r['patch_cos'])} | {_f(r['erank'], 1)} | {_f(r['dice_pooled'])} "
                    f"| {_ci(*r['dice_pooled_ci'])} |"
                )
    L += ["", "## Encoder patch cosine over training (trainer's diag/* rows)", ""]
    for e in encs:
        d = by.get((e, "diag_over_training"))
        if d:
            pts = ", ".join(f"{r['step']}: {_f(r.get('diag/encoder_patch_cos'))}" for r in d["rows"])
            L.append(f"- {e}: {pts}")
    path.write_text("\n".join(L) + "\n")


def _write_provenance(out: Path, prov: dict):
    """`provenance.json`: one entry per invocation of this script on `out` (several may share the work: each one
    skips the measurements already in `results.jsonl`), keyed by its start time and process id."""
    import os

    p = out / "provenance.json"
    old = json.loads(p.read_text()) if p.is_file() else {}
    inv = old.get("invocations", {})
    inv[f"{prov['started']} pid {os.getpid()}"] = prov
    p.write_text(json.dumps(dict(issue=18, invocations=inv), indent=1, default=_jsonable) + "\n")


# ----------------------------------------------------------------------------- main


def main(argv=None):
    global a_corpus
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="work folder (corpus, runs, results.jsonl)")
    ap.add_argument("--results", default=None, help="also copy results.json and provenance.json here")
    ap.add_argument(
        "--corpus", default=None, help="an existing demo corpus (default OUT/corpus, built if missing)"
    )
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument(
        "--tag",
        default=None,
        help="name the encoders METHOD+TAG (runs/METHOD+TAG): a variant run with --overrides and/or --corpus-prior",
    )
    ap.add_argument(
        "--overrides",
        nargs="*",
        default=[],
        help="dotted config keys for pre-training, e.g. model.mlip.lambda_ot=4",
    )
    ap.add_argument(
        "--corpus-prior",
        nargs="*",
        default=[],
        help="FindingPrior fields of a corpus built here, e.g. lesion_angle_bias=0.8 (default: the demo's prior)",
    )
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--seg-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-pairs", type=int, default=256, help="held-out (and training) pairs for OT")
    ap.add_argument("--n-unpaired", type=int, default=8192, help="unpaired images of a corpus built here")
    ap.add_argument(
        "--n-task", type=int, default=1000, help="train and test images per task of a corpus built here"
    )
    ap.add_argument(
        "--kinds",
        nargs="+",
        default=list(KINDS),
        choices=KINDS,
        help="measurements to make (default all); ot_heldout makes ot_training too",
    )
    ap.add_argument("--seg-steps", type=int, default=300, help="AdamW steps of each segmentation head")
    ap.add_argument(
        "--n-boot", type=int, default=1000, help="bootstrap resamples of a Dice CI (zero-shot: half of it)"
    )
    ap.add_argument("--ot-batch", type=int, default=32, help="pairs per OT matched-vs-shuffled batch")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test of every measurement: tiny corpus (16 paired, 16 unpaired, 24 per task split), 2 steps, "
        "10-step heads, 20 resamples, OT on 2 batches of 8",
    )
    ap.add_argument(
        "--table-only",
        action="store_true",
        help="only (re)write OUT/results.json and OUT/table.md from OUT/results.jsonl (and copy to --results)",
    )
    a = ap.parse_args(argv)
    if (a.overrides or a.corpus_prior) and not a.tag:
        ap.error("--overrides / --corpus-prior need a --tag (the variant's encoders are named METHOD+TAG)")
    if a.quick:
        a.steps, a.batch_size, a.save_every, a.seg_seeds = 2, 8, 1, [0]
        a.n_pairs, a.ot_batch, a.seg_steps, a.n_boot = 16, 8, 10, 20
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = Path(a.corpus) if a.corpus else out / "corpus"
    a_corpus = corpus
    runs = out / "runs"
    t_start, timings = time.time(), {}
    prov = dict(
        issue=18,
        commit=_git("rev-parse", "HEAD"),
        dirty=bool(_git("status", "--porcelain", "--untracked-files=no")),
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        started=time.strftime("%Y-%m-%d %H:%M:%S"),
        torch=torch.__version__,
        python=platform.python_version(),
        threads=torch.get_num_threads(),
        args=vars(a),
        timings=timings,
    )
    log = Log(out)
    if a.table_only:  # gather what every invocation measured (results.jsonl) into results.json and table.md
        (out / "results.json").write_text(json.dumps(log.rows, indent=1, default=_jsonable) + "\n")
        write_tables(log.rows, out / "table.md")
        if a.results:
            Path(a.results).mkdir(parents=True, exist_ok=True)
            for f in ("results.json", "provenance.json", "table.md"):
                if (out / f).is_file():
                    shutil.copy(out / f, Path(a.results) / f)
        return 0
    from maskedclip.demo import _demo_corpus
    from maskedclip.segmentation import load_segmentation_split

    t0 = time.time()
    if not (corpus / "corpus.json").is_file():
        from maskedclip.synthetic import build_corpus

        n_pa, n_un, n_task = (16, 16, 24) if a.quick else (1024, a.n_unpaired, a.n_task)
        if (n_un, n_task) == (8192, 1000) and not a.corpus_prior:
            _demo_corpus(corpus, 1024, n_un, n_task, 64, progress=False)
        else:  # the demo's pools with fewer images: the same eyes (index offsets are per pool), validation 50
            tasks = dict(train=n_task, val=8 if a.quick else 50, test=n_task)
            from maskedclip.synthetic import FindingPrior

            prior = FindingPrior(**parse_settings(a.corpus_prior))
            build_corpus(
                corpus, n_pa, n_un, tasks, size=64, seed=0, prior=prior, num_workers=2, progress=False
            )
        timings["corpus_s"] = time.time() - t0
    t0 = time.time()
    train_all = load_segmentation_split(corpus, "multi_disease", "train", lesions="all")
    test_all = load_segmentation_split(corpus, "multi_disease", "test", lesions="all")
    train, test = (
        type(d)(
            d.images,
            torch.stack([d.lesion_masks[l] for l in RED]).any(0),
            {l: d.lesion_masks[l] for l in RED},
            d.ids,
            RED,
        )
        for d in (train_all, test_all)
    )
    pairs = dict(heldout=_pairs_heldout(a.n_pairs), training=_pairs_training(corpus, a.n_pairs))
    timings["data_s"] = time.time() - t0
    print(f"data: train {train}, test {test}", flush=True)
    corpus_key = f"corpus+{a.tag}" if a.corpus_prior else "corpus"
    if "lesion_map" in a.kinds and not log.done(corpus_key, "lesion_map"):
        lesion_map(log, corpus_key, train_all, (8, 8))  # the demo ViT's grid: 64 px / patch 8
    for method in a.methods:
        name = f"{method}+{a.tag}" if a.tag else method
        if method != "random":
            dt = pretrain(method, corpus, runs / name, a)
            if dt:
                timings[f"pretrain_{name}_s"] = dt
        t0 = time.time()
        model = load_model(name, runs)
        for kind, fn in (
            ("diagnostics", lambda: diagnostics(log, name, model, test)),
            ("segmentation", lambda: segmentation(log, name, model, train, test, a)),
            ("pointing_game", lambda: pointing(log, name, model, test)),
            (
                "zero_shot",
                lambda: (
                    zero_shot(log, name, runs, corpus, a.n_boot // 2)
                    if method not in ("random", "mae")
                    else None
                ),
            ),
            ("ot_heldout", lambda: ot(log, name, model, pairs, a.ot_batch)),
            (
                "diag_over_training",
                lambda: training_diag(log, name, runs / name) if method != "random" else None,
            ),
            ("phi", lambda: phi_stats(log, runs / name, train_all, name) if method == "mlip" else None),
            ("layers", lambda: layer_segmentation(log, name, model, train, test, a.seg_steps, a.n_boot)),
        ):
            if kind in a.kinds and not log.done(name, kind):
                fn()
        if method == "mlip" and "term_attribution" in a.kinds and not log.done(name, "term_attribution"):
            from maskedclip.train import checkpoint_dirs

            cks = checkpoint_dirs(runs / name)
            term_attribution(log, runs / name, test, [cks[0], runs / name / "final"], name)
        timings[f"evaluate_{name}_s"] = time.time() - t0
        _write_provenance(out, prov)
    timings["total_s"] = time.time() - t_start
    prov["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    (out / "results.json").write_text(json.dumps(log.rows, indent=1, default=_jsonable) + "\n")
    _write_provenance(out, prov)
    write_tables(log.rows, out / "table.md")
    if a.results:
        res = Path(a.results)
        res.mkdir(parents=True, exist_ok=True)
        for f in ("results.json", "provenance.json", "table.md"):
            shutil.copy(out / f, res / f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
