"""Per-rank memory of DDP against FSDP2 (issue 19): analytic at ViT-L and ViT-H shapes, measured at the tiny preset.

    OMP_NUM_THREADS=1 python benchmarks/bench_fsdp_memory.py [--out benchmarks/results] [--no-measure]

Analytic (`maskedclip.distributed.memory_per_rank`, parameters counted on the meta device, nothing allocated):
weights, gradients (DDP: + its reduction buckets), AdamW moments and, for FSDP, the unsharded units in flight, per rank,
activations excluded (the same under both strategies for one per-rank batch). Shapes: the `paper` preset (ViT-L/16 at
224 px, BioClinicalBERT-sized text tower, bridge, pixel and feature decoders, EMA teacher) and the same model with a
ViT-H/14 encoder (width 1280, depth 32, 16 heads); 4 and 8 ranks, bf16.

Measured (2 CPU processes over gloo, tiny preset, one training step through the trainer): the bytes each rank really
holds in weights and in AdamW state, against the same formula at the tiny shape — the check that the analytic numbers
count what the trainer allocates.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def shapes():
    from maskedclip.config import get_preset

    vit_l = get_preset("paper")
    vit_h = vit_l.replace(vision=vit_l.vision.replace(width=1280, depth=32, heads=16, patch_size=14))
    return {"ViT-L/16 (paper preset)": vit_l, "ViT-H/14 (paper preset, ViT-H encoder)": vit_h}


def analytic(worlds=(4, 8), precision="bf16") -> list[dict]:
    from maskedclip.distributed import memory_per_rank

    rows = []
    for name, cfg in shapes().items():
        for w in worlds:
            for s in ("ddp", "fsdp"):
                r = memory_per_rank(cfg, s, w, precision)
                rows.append(dict(shape=name, world_size=w, strategy=s, precision=precision, **r))
                print(f"[fsdp-memory] {name} W={w} {s}: {r['total']:.2f} GiB per rank", flush=True)
    return rows


def child(strategy: str, out: str):
    "Under torchrun: one step of the tiny model through the trainer; each rank reports the bytes it holds."

    sys.path.insert(0, str(ROOT / "tests"))
    import ddp_worker

    from maskedclip.config import DataConfig, ExperimentConfig, TrainConfig, get_preset
    from maskedclip.distributed import local_tensor
    from maskedclip.model import MaskedCLIP
    from maskedclip.train import InMemoryBatches, Trainer, cleanup_distributed, setup_distributed

    di = setup_distributed("cpu")
    cfg = ExperimentConfig(
        model=get_preset("tiny"),
        data=DataConfig(paired_batch_size=2, unpaired_batch_size=2, synthetic=True),
        train=TrainConfig(output_dir=f"{out}/{strategy}", steps=1, lr=1e-4, strategy=strategy, diag_every=0),
    )
    pi, texts, labels, ui = ddp_worker.global_data(8)
    tok = MaskedCLIP(cfg.model).tokenize
    loader = InMemoryBatches(
        pi, texts, labels, ui, 2, 2, tokenize=tok, rank=di.rank, world_size=di.world_size
    )
    tr = Trainer(cfg, loader=loader, dist_info=di, progress=False)
    tr.fit()
    nbytes = lambda ts: sum(local_tensor(t).numel() * t.element_size() for t in ts)  # noqa: E731
    weights = nbytes(p for p in tr.model.parameters())
    moments = nbytes(v for s in tr.opt.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq"))
    Path(out, f"{strategy}_rank{di.rank}.json").write_text(
        json.dumps(dict(weights=weights, optimizer=moments))
    )
    cleanup_distributed()


def measured(tmp: Path) -> list[dict]:
    from maskedclip.config import get_preset
    from maskedclip.distributed import memory_per_rank

    rows = []
    for s in ("ddp", "fsdp"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        r = subprocess.run([*cmd, "--child", s, "--out", str(tmp)], capture_output=True, text=True, env=env)
        if r.returncode:
            raise RuntimeError(f"{s} child failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
        a = memory_per_rank(get_preset("tiny"), s, 2, "fp32")
        for rank in (0, 1):
            m = json.loads((tmp / f"{s}_rank{rank}.json").read_text())
            rows.append(
                dict(
                    strategy=s,
                    rank=rank,
                    weights_mib=m["weights"] / 2**20,
                    optimizer_mib=m["optimizer"] / 2**20,
                    analytic_weights_mib=a["weights"] * 1024,
                    analytic_optimizer_mib=a["optimizer"] * 1024,
                )
            )
            print(f"[fsdp-memory] measured tiny {s} rank {rank}: {rows[-1]}", flush=True)
    return rows


def markdown(res: dict) -> str:
    lines = [
        "# Per-rank memory: DDP vs FSDP2 (issue 19)",
        "",
        f"- {res['date']}, torch {res['torch']}; command: `{res['command']}`",
        "- analytic: `maskedclip.distributed.memory_per_rank` (parameters counted on the meta device); GiB per rank; "
        "activations excluded (equal under both strategies for one per-rank batch); bf16 compute, fp32 master "
        "weights, gradients and AdamW moments",
        "",
        "| shape | ranks | strategy | params (M) | trainable (M) | EMA teacher (M) | weights | grads | AdamW | "
        "units in flight | **total** |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["analytic"]:
        lines.append(
            f"| {r['shape']} | {r['world_size']} | {r['strategy']} | {r['params_m']:.0f} | {r['trainable_m']:.0f} | "
            f"{r['teacher_m']:.0f} | {r['weights']:.2f} | {r['grads']:.2f} | {r['optimizer']:.2f} | "
            f"{r['inflight']:.2f} | **{r['total']:.2f}** |"
        )
    if res.get("measured"):
        lines += [
            "",
            "## Measured at the tiny preset (2 CPU processes, gloo, one step through the trainer)",
            "",
            "Bytes each rank holds after the step (local shards for FSDP), against the formula at the same shape (MiB).",
            "",
            "| strategy | rank | weights | formula | AdamW moments | formula |",
            "|---|---|---|---|---|---|",
        ]
        for r in res["measured"]:
            lines.append(
                f"| {r['strategy']} | {r['rank']} | {r['weights_mib']:.3f} | {r['analytic_weights_mib']:.3f} | "
                f"{r['optimizer_mib']:.3f} | {r['analytic_optimizer_mib']:.3f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--no-measure", action="store_true", help="analytic numbers only")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        code = 0
        try:
            child(a.child, a.out)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # gloo's threads can abort a normal interpreter shutdown
    import tempfile

    import torch

    res = dict(
        date=time.strftime("%Y-%m-%dT%H:%M:%S"),
        torch=torch.__version__,
        command="python benchmarks/bench_fsdp_memory.py" + (" --no-measure" if a.no_measure else ""),
        analytic=analytic(),
    )
    if not a.no_measure:
        with tempfile.TemporaryDirectory() as tmp:
            res["measured"] = measured(Path(tmp))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fsdp_memory.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "fsdp_memory.md").write_text(markdown(res))
    print(f"[fsdp-memory] wrote {out / 'fsdp_memory.json'} and {out / 'fsdp_memory.md'}")
