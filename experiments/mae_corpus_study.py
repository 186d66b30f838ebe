"""MAE-only at the demo scale and budget on one corpus recipe: MIM loss on unseen renders (and on a 5 % zoom of
them), linear probe at 10 % labels against random init with per-seed bootstrap CIs (issue 23).

The protocol is fixed before any run: demo preset, `--method mae`, 500 steps of 32 + 32 images at 64 px,
lr 1e-3, warm-up 50 steps, seed 0; corpus seed 0 with the demo's sizes; evaluation on the four demo tasks,
10 % of the 1000 training labels, seeds 0 1 2, 500 bootstrap resamples of the 1000 test images per seed.
Unseen renders: 512 eyes from renderer seed 7 (the corpus uses seed 0), through the evaluation transform;
masks drawn from a fixed generator (seed 0), mask ratio 0.75, normalised-pixel loss (the training loss).

    python experiments/mae_corpus_study.py --out runs/study/after --crop-scale-min 0.2 --hflip 0.5

`--corpus-prior key=value ...` builds the corpus (and draws the unseen renders) from `FindingPrior(**settings)`,
e.g. `extended_signs=true` (D40); `--workers` renders a corpus built here, and runs the evaluation's jobs, on that
many processes (the same bytes and rows). `--n-test` and `--pretrain-seed` (D41) change the test split's size and
the pre-training seed; every results file then also holds D41's verdicts: the mean AUROC over the evaluation seeds
with a 1000-resample bootstrap of the test images (`seed_mean_margins`, primary) and with the seeds resampled as
well (two-level), beside the per-seed rule above. The test labels and scores of every run go to
`OUT/scores_<protocol>.npz`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by path (tests)
from _provenance import git as _git  # noqa: E402


def unseen_renders(n: int, size: int, seed: int = 7, zoom: float = 1.0, prior=None) -> torch.Tensor:
    """`n` fresh renders (renderer seed `seed`, population `prior`, default `FindingPrior()`) through the evaluation
    transform; `zoom` > 1 magnifies the centre first."""
    from PIL import Image

    from maskedclip.data import eval_transform
    from maskedclip.synthetic import make_sample

    tf = eval_transform(size)
    out = []
    for k in range(n):
        im = Image.fromarray(make_sample(seed, k, size, prior).image)
        if zoom != 1.0:
            s = size / zoom
            o = (size - s) / 2
            im = im.resize((size, size), Image.BICUBIC, box=(o, o, o + s, o + s))
        out.append(tf(im))
    return torch.stack(out)


@torch.no_grad()
def mim_loss_on(model, x: torch.Tensor, seed: int = 0, batch_size: int = 128) -> float:
    "Mean MIM loss (the model's own loss: mask ratio, normalised pixels) of `model` on images `x`, masks from `seed`."
    from maskedclip.data import Batch

    model.eval()
    g = torch.Generator().manual_seed(seed)
    tot = 0.0
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        tot += float(model(Batch(unpaired_images=xb), generator=g).parts["mim"]) * len(xb)
    return tot / len(x)


def _seed_mean_verdicts(df, scores_path: Path) -> dict:
    """D41's verdicts of MAE against random init: the seed-mean AUROC with a bootstrap of the test images (primary)
    and with the seeds resampled too (two-level); the runs' test labels and scores saved to `scores_path`."""
    import numpy as np

    from maskedclip.demo import seed_mean_margins

    arrays = {}
    for (m, task, frac, seed, split), (y, s) in df.attrs["scores"].items():
        key = f"{m.replace(' ', '_')}|{task}|{frac}|{seed}|{split}"
        arrays[key + "|labels"], arrays[key + "|scores"] = y, s
    np.savez_compressed(scores_path, **arrays)
    out = {}
    for name, two in (("test_bootstrap", False), ("two_level", True)):
        v = seed_mean_margins(df, method="mae", n_boot=1000, resample_draws=two).round(4)
        print(f"seed-mean verdict ({name}):", v.to_string(), sep="\n", flush=True)
        out[name] = v.to_dict("records")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (corpus, run, results.json)")
    ap.add_argument(
        "--corpus",
        default=None,
        help="corpus folder (built with the demo sizes if missing; default OUT/corpus)",
    )
    ap.add_argument(
        "--crop-scale-min", type=float, default=1.0, help="RandomResizedCrop lower scale for pre-training"
    )
    ap.add_argument("--hflip", type=float, default=0.0, help="horizontal flip probability for pre-training")
    ap.add_argument("--steps", type=int, default=500, help="pre-training steps")
    ap.add_argument("--n-unpaired", type=int, default=1024, help="unpaired images of a corpus built here")
    ap.add_argument("--n-unseen", type=int, default=512, help="unseen renders for the MIM loss")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="evaluation seeds")
    ap.add_argument("--n-test", type=int, default=1000, help="test images per task of a corpus built here")
    ap.add_argument("--pretrain-seed", type=int, default=0, help="seed of the pre-training run")
    ap.add_argument(
        "--source-commit",
        default=None,
        help="commit of the maskedclip code on the path (default: this checkout's HEAD)",
    )
    ap.add_argument(
        "--finetune", action="store_true", help="also fine-tune (RETFound recipe, 10 epochs) at 10 %% labels"
    )
    ap.add_argument(
        "--finetune-only",
        action="store_true",
        help="add the fine-tune comparison to an existing OUT/results.json (pre-training and the rest are not redone)",
    )
    ap.add_argument(
        "--corpus-prior",
        nargs="*",
        default=[],
        help="FindingPrior fields of a corpus built here and of the unseen renders, e.g. extended_signs=true (D40)",
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes rendering a corpus built here and running the evaluation",
    )
    ap.add_argument(
        "--overrides",
        nargs="*",
        default=[],
        help="dotted config keys for pre-training on top of the protocol, e.g. model.norm_pix_loss=false",
    )
    a = ap.parse_args(argv)
    from mlip_study import parse_settings

    from maskedclip import evaluate as ev
    from maskedclip.demo import DEMO_TASKS, probe_margins
    from maskedclip.model import MaskedCLIP
    from maskedclip.synthetic import FindingPrior, build_corpus

    prior = FindingPrior(**parse_settings(a.corpus_prior))
    from maskedclip.train import experiment_config, train

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = Path(a.corpus) if a.corpus else out / "corpus"
    if a.finetune_only:
        res = json.loads((out / "results.json").read_text())
        t0 = time.time()
        ft = ev.evaluate_all(
            {"random init": "random", "mae": str(out / "pretrain" / "final")},
            tasks=DEMO_TASKS,
            fractions=(0.1,),
            seeds=a.seeds,
            protocol="finetune",
            corpus_root=corpus,
            n_boot=500,
            progress=False,
            log=None,
            keep_scores=True,
            workers=a.workers,
        )
        res["finetune_margins"] = probe_margins(ft, method="mae").round(4).to_dict("records")
        res["finetune_seed_mean"] = _seed_mean_verdicts(ft, out / "scores_finetune.npz")
        res["finetune_runs"] = (
            ft[["method", "task", "fraction", "seed", "auroc", "ci_low", "ci_high"]]
            .round(4)
            .to_dict("records")
        )
        res["finetune_command"] = " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])
        res["timings"]["finetune_s"] = round(time.time() - t0, 1)
        print(probe_margins(ft, method="mae").round(3).to_string(), flush=True)
        (out / "results.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
        return
    t = {}
    t0 = time.time()
    if not (corpus / "corpus.json").is_file():
        build_corpus(
            corpus,
            n_paired=1024,
            n_unpaired=a.n_unpaired,
            n_task_per_split=dict(train=1000, val=500, test=a.n_test),
            size=64,
            seed=0,
            prior=prior,
            num_workers=a.workers,
            progress=False,
        )
    t["corpus_s"] = time.time() - t0
    run = out / "pretrain"
    cfg = experiment_config(
        "demo",
        "mae",
        steps=a.steps,
        lr=1e-3,
        warmup_steps=max(1, a.steps // 10),
        paired_batch_size=32,
        unpaired_batch_size=32,
        synthetic=True,
        synthetic_dir=str(corpus),
        output_dir=str(run),
        save_every=max(1, a.steps // 4),
        seed=a.pretrain_seed,
        overrides={
            "model.vision.image_size": 64,
            "train.resume": "latest",
            "train.keep_last": 2,
            "data.hflip": a.hflip,
            "data.crop_scale_min": a.crop_scale_min,
            **parse_settings(a.overrides),
        },
    )
    t0 = time.time()
    if not (run / "final" / "model.safetensors").is_file():
        train(cfg, progress=False)
    t["pretrain_s"] = time.time() - t0
    t0 = time.time()
    model = MaskedCLIP.from_pretrained(run / "final")
    torch.manual_seed(0)
    rand = MaskedCLIP(model.config)
    x = unseen_renders(a.n_unseen, 64, prior=prior)
    xz = unseen_renders(a.n_unseen, 64, zoom=1 / 0.95, prior=prior)
    from maskedclip.data import ImageDataset, eval_transform, load_manifest

    seen = ImageDataset(
        load_manifest(corpus / "pretrain" / "unpaired.jsonl", root=corpus, check_images=False, verbose=False),
        transform=eval_transform(64),
    )
    xseen = torch.stack([seen[i]["image"] for i in range(min(a.n_unseen, len(seen)))])  # pre-training images
    mim = dict(
        unseen=mim_loss_on(model, x),
        unseen_zoom5=mim_loss_on(model, xz),
        pretraining_images=mim_loss_on(model, xseen),
        random_init_unseen=mim_loss_on(rand, x),
    )
    t["mim_s"] = time.time() - t0
    print("MIM loss:", json.dumps({k: round(v, 4) for k, v in mim.items()}), flush=True)
    t0 = time.time()
    probe = ev.evaluate_all(
        {"random init": "random", "mae": str(run / "final")},
        tasks=DEMO_TASKS,
        fractions=(0.1,),
        seeds=a.seeds,
        protocol="linear_probe",
        corpus_root=corpus,
        n_boot=500,
        progress=False,
        log=None,
        keep_scores=True,
        workers=a.workers,
    )
    t["probe_s"] = time.time() - t0
    res = dict(
        command=" ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        commit=a.source_commit or _git("rev-parse", "HEAD"),
        dirty=False if a.source_commit else bool(_git("status", "--porcelain", "--untracked-files=no")),
        recipe=dict(
            preset="demo",
            method="mae",
            steps=a.steps,
            pretrain_seed=a.pretrain_seed,
            eval_seeds=list(a.seeds),
            n_test=a.n_test,
            batch="32+32",
            image_size=64,
            lr=1e-3,
            crop_scale=(a.crop_scale_min, 1.0),
            hflip=a.hflip,
            n_unpaired=a.n_unpaired,
            corpus=str(corpus),
            corpus_prior=parse_settings(a.corpus_prior),
            overrides=parse_settings(a.overrides),
        ),
        mim_loss=mim,
        linear_probe_margins=probe_margins(probe, method="mae").round(4).to_dict("records"),
        linear_probe_seed_mean=_seed_mean_verdicts(probe, out / "scores_linear_probe.npz"),
        linear_probe_runs=probe[["method", "task", "fraction", "seed", "auroc", "ci_low", "ci_high"]]
        .round(4)
        .to_dict("records"),
    )
    print(probe_margins(probe, method="mae").round(3).to_string(), flush=True)
    if a.finetune:
        t0 = time.time()
        ft = ev.evaluate_all(
            {"random init": "random", "mae": str(run / "final")},
            tasks=DEMO_TASKS,
            fractions=(0.1,),
            seeds=a.seeds,
            protocol="finetune",
            corpus_root=corpus,
            n_boot=500,
            progress=False,
            log=None,
            keep_scores=True,
            workers=a.workers,
        )
        t["finetune_s"] = time.time() - t0
        res["finetune_margins"] = probe_margins(ft, method="mae").round(4).to_dict("records")
        res["finetune_seed_mean"] = _seed_mean_verdicts(ft, out / "scores_finetune.npz")
        print(probe_margins(ft, method="mae").round(3).to_string(), flush=True)
    res["timings"] = {k: round(v, 1) for k, v in t.items()}
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    print("written", out / "results.json")


if __name__ == "__main__":
    main()
