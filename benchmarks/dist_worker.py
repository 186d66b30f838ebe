"""Process-scaling worker for `benchmarks/run.py`, launched as
`python -m torch.distributed.run --standalone --nproc_per_node=N benchmarks/dist_worker.py --json OUT ...`.

Every rank builds the same model (same seed), wraps it in DDP when N > 1 (gloo on CPU, nccl on CUDA; the EMA
teacher is excluded from DDP as the Trainer does) and times the same training step as `benchlib.TrainStep` on its
own per-process batch (weak scaling: the per-process batch is fixed). Each sample is the slowest rank's step time
(all-reduce MAX); rank 0 writes the result as JSON.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B
import torch
import torch.distributed as dist


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--method", default="maskedclip")
    ap.add_argument("--clip-view", default="full")
    ap.add_argument("--bp", type=int, default=8)
    ap.add_argument("--bu", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    world, rank, local = (
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = B.resolve_device(a.device)
    if dev.type == "cuda":
        dev = torch.device(f"cuda:{local}")
        torch.cuda.set_device(dev)
    if world > 1:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    cfg = B.model_config(a.size, a.method, a.clip_view)
    ts = B.TrainStep(cfg, a.bp, a.bu, dev, a.precision, seed=0, rank=rank, world_size=world)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        if ts.model.teacher is not None:
            DDP._set_params_and_buffers_to_ignore_for_model(
                ts.model, [f"teacher.{n}" for n, _ in ts.model.teacher.named_parameters()]
            )
        ts.net = DDP(ts.model, device_ids=[dev.index] if dev.type == "cuda" else None)
    timer = B.Timer(dev)
    for _ in range(a.warmup):
        ts.step()
    samples = []
    for _ in range(a.repeats):
        if world > 1:
            dist.barrier()
        t = torch.tensor([timer(ts.step)], dtype=torch.float64, device=dev)
        if world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        samples.append(float(t))
    if rank == 0:
        res = dict(
            nproc=world,
            threads_per_process=torch.get_num_threads(),
            backend=dist.get_backend() if world > 1 else None,
            size=a.size,
            method=a.method,
            bp=a.bp,
            bu=a.bu,
            images_per_process=a.bp + a.bu,
            precision=a.precision,
            loss_finite=ts.loss_finite(),
            **B.summary(samples),
        )
        res["global_images_per_s"] = world * res["images_per_process"] / res["median_s"]
        Path(a.json).write_text(json.dumps(res))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
