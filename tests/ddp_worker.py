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


if __name__ == "__main__":
    code = 0
    try:
        out, steps, bs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
        resume = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] != "-" else None
        save_every = int(sys.argv[5]) if len(sys.argv) > 5 else 0
        run(out, steps, bs, resume, save_every)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        cleanup_distributed()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)
