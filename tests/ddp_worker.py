"""Launched by tests/test_train.py under torchrun (or plainly for one process).

Trains the tiny model for a few steps on a fixed in-memory global batch sharded over the ranks and writes
rank 0's final weights and first-step losses. Fault injection for the crash-while-saving test: with
CRASH_AT_SAVE=k the process SIGKILLs itself in the middle of writing its k-th checkpoint.
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch

from maskedclip.config import DataConfig, ExperimentConfig, TrainConfig, get_preset
from maskedclip.model import MaskedCLIP
from maskedclip.train import InMemoryBatches, Trainer, cleanup_distributed, setup_distributed


def global_data(n=16):
    g = torch.Generator().manual_seed(123)
    texts = [
        [
            "no diabetic retinopathy",
            "moderate DR with exudates",
            "glaucoma with a large cup",
            "healthy fundus, no findings",
        ][i % 4]
        + f" case {i}"
        for i in range(n)
    ]
    return (
        torch.randn(n, 3, 64, 64, generator=g),
        texts,
        torch.tensor([i % 3 for i in range(n)]),
        torch.randn(n, 3, 64, 64, generator=g),
    )


# lr 1e-4: a few parameters (e.g. attention key biases, to which softmax is invariant) get gradients that are pure
# float round-off; Adam rescales those to O(lr) steps in arbitrary directions, so 1- vs 2-process runs can differ by
# up to ~lr·eps-ratio there. At 1e-4 that stays well under the 1e-5 tolerance while every other weight moves by ~1e-4.
def run(out, steps, per_rank_bs, resume=None, save_every=0, method="maskedclip"):
    di = setup_distributed("cpu")
    cfg = ExperimentConfig(
        model=get_preset("tiny", method),
        data=DataConfig(paired_batch_size=per_rank_bs, unpaired_batch_size=per_rank_bs, synthetic=True),
        train=TrainConfig(
            output_dir=str(out),
            steps=steps,
            lr=1e-4,
            warmup_steps=1,
            seed=7,
            resume=resume,
            save_every=save_every,
            precision="fp32",  # exact DDP equality: bf16 (the default where native) rounds by thread count
        ),
    )
    pi, texts, labels, ui = global_data()
    tok = MaskedCLIP(cfg.model).tokenize if cfg.model.use_clip else None
    loader = InMemoryBatches(
        pi,
        texts,
        labels,
        ui,
        per_rank_bs,
        per_rank_bs,
        tokenize=tok,
        rank=di.rank,
        world_size=di.world_size,
        seed=3,
    )
    tr = Trainer(cfg, loader=loader, dist_info=di, progress=False)
    crash_at = int(os.environ.get("CRASH_AT_SAVE", "0"))
    if crash_at:
        orig, calls = tr.model.save_pretrained, {"n": 0}

        def crashing_save(d):
            calls["n"] += 1
            path = orig(d)
            if calls["n"] == crash_at:
                (Path(d) / "model.safetensors").write_bytes(b"partial")  # a torn write
                os.kill(os.getpid(), signal.SIGKILL)
            return path

        tr.model.save_pretrained = crashing_save
    rows = tr.fit()
    if di.is_main:
        torch.save({k: v.clone() for k, v in tr.model.state_dict().items()}, Path(out) / "final_state.pt")
        (Path(out) / "rows.json").write_text(json.dumps(rows))
    return di


def write_manifests(data: Path, n_paired=24, n_unpaired=24, size=32):
    "A tiny two-stream dataset of coloured-noise PNGs with relative paths (copy the folder to move it)."
    import numpy as np
    from PIL import Image

    (data / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    texts = ["no diabetic retinopathy", "moderate DR with exudates", "glaucoma with a large cup"]
    with open(data / "paired.jsonl", "w") as p, open(data / "unpaired.jsonl", "w") as u:
        for i in range(n_paired + n_unpaired):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
                data / "img" / f"{i}.png"
            )
            if i < n_paired:
                row = dict(
                    id=f"p{i}", image=f"img/{i}.png", text=f"{texts[i % 3]} case {i}", label=f"l{i % 3}"
                )
                p.write(json.dumps(row) + "\n")
            else:
                u.write(json.dumps(dict(id=f"u{i}", image=f"img/{i}.png")) + "\n")


def manifest_config(
    out, data, steps, per_rank_bs, resume=None, save_every=0, strategy="ddp", precision="fp32", grad_accum=1
):
    "The tiny preset at 32 px on `write_manifests` data (paths as given: relative ones resolve in the working directory)."
    model = get_preset("tiny")
    model = model.replace(vision=model.vision.replace(image_size=32))
    return ExperimentConfig(
        model=model,
        data=DataConfig(
            paired=f"{data}/paired.jsonl",
            unpaired=f"{data}/unpaired.jsonl",
            root=str(data),
            paired_batch_size=per_rank_bs,
            unpaired_batch_size=per_rank_bs,
            label_space=["l0", "l1", "l2"],
        ),
        train=TrainConfig(
            output_dir=str(out),
            steps=steps,
            lr=1e-4,
            warmup_steps=1,
            seed=7,
            resume=resume,
            save_every=save_every,
            strategy=strategy,
            precision=precision,
            grad_accum=grad_accum,
            grad_clip=10.0,  # large: logs grad_norm (the sharded norm is compared too) without clipping
            diag_every=0,
            device="cpu",
        ),
    )


def run_manifest(
    out,
    data,
    steps,
    per_rank_bs,
    resume=None,
    until=None,
    save_every=0,
    strategy="ddp",
    dcp=None,
    precision="fp32",
    grad_accum=1,
):
    """Train on manifests through the engine's own loader; every rank records the sample keys `(stream, index, seed)`
    each micro-step reads (in `seen_rank<r>.json` next to `out`), rank 0 writes its rows and final weights."""
    di = setup_distributed("cpu")
    cfg = manifest_config(out, data, steps, per_rank_bs, resume, save_every, strategy, precision, grad_accum)
    tr = Trainer(cfg, dist_info=di, progress=False)
    seen, keys_of = [], tr.loader.batch_keys

    def recording(epoch, step):  # the loader asks for each step's keys when the trainer takes the batch
        keys = keys_of(epoch, step)
        seen.append(dict(micro=tr.micro, keys=[list(k) for k in keys]))
        return keys

    tr.loader.batch_keys = recording
    rows = tr.fit(until=until)
    tag = f"{Path(out).name}_{'resumed' if resume else 'run'}"
    (Path(out).parent / f"seen_{tag}_rank{di.rank}.json").write_text(json.dumps(seen))
    if dcp:
        from maskedclip.distributed import save_sharded

        save_sharded(tr.model, tr.opt, dcp)
    if di.is_main:
        (Path(out).parent / f"rows_{tag}.json").write_text(json.dumps(rows))
    return tr


def _exit_after(main):
    "Run `main()`, print any error, tear down the process group, flush, and `os._exit` (gloo can abort at shutdown)."
    code = 0
    try:
        main()
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        cleanup_distributed()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "manifest":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("mode")
    ap.add_argument("out")
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--bs", type=int, required=True)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--until", type=int, default=None)
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--strategy", default="ddp")
    ap.add_argument("--dcp", default=None)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--grad-accum", type=int, default=1)
    a = ap.parse_args()
    _exit_after(
        lambda: run_manifest(
            a.out,
            a.data,
            a.steps,
            a.bs,
            a.resume,
            a.until,
            a.save_every,
            a.strategy,
            a.dcp,
            a.precision,
            a.grad_accum,
        )
    )

if __name__ == "__main__":

    def _main():
        out, steps, bs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
        resume = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] != "-" else None
        save_every = int(sys.argv[5]) if len(sys.argv) > 5 else 0
        run(out, steps, bs, resume, save_every)

    _exit_after(_main)
