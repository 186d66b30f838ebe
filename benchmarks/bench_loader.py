"""Loader throughput: images/s (and images/s per worker) of `maskedclip.data.make_loader` on synthetic fundus JPEGs.

A script, not a test. It writes a small synthetic corpus (fundus-like discs on a black frame, JPEG) to a temporary
folder, then times full passes of the two-stream loader for each `--workers` value, with and without JPEG draft
decoding (`decode_size`), for each `--sources` entry: `files` (the manifests), `shards` (`maskedclip-prepare`
outputs, memory-mapped) and `stream` (the same read as streams). One JSON line per configuration on stdout (and
appended to `--out` if given).

    python benchmarks/bench_loader.py --images 96 --width 2048 --height 1536 --size 224 --workers 0 1 2
    python benchmarks/bench_loader.py --sources files shards stream --workers 0 --decode-size 0
"""

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image

from maskedclip.data import make_loader, prepare_dataset, write_manifest


def fundus_like(w: int, h: int, seed: int) -> Image.Image:
    "A bright textured disc on a black frame, clipped top and bottom like many fundus cameras."
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[:h, :w]
    r = 0.55 * min(w, h * 1.3)
    disc = ((xx - w / 2) ** 2 + (yy - h / 2) ** 2) <= r**2
    base = np.array([170, 80, 35], np.float32) * (0.8 + 0.4 * rng.random())
    tex = rng.normal(0, 12, (h // 8 + 1, w // 8 + 1, 1)).repeat(8, 0).repeat(8, 1)[:h, :w]
    img = np.clip(base + tex, 0, 255) * disc[..., None]
    return Image.fromarray(img.astype(np.uint8))


def make_corpus(root: Path, n: int, w: int, h: int) -> tuple[Path, Path]:
    (root / "images").mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n):
        fundus_like(w, h, i).save(root / "images" / f"{i}.jpg", quality=90)
        recs.append(
            dict(id=str(i), image=f"images/{i}.jpg", text=f"A fundus photograph of case {i}", label="no DR")
        )
    half = n // 2
    return write_manifest(recs[:half], root / "paired.jsonl"), write_manifest(
        recs[half:], root / "unpaired.jsonl"
    )


def tokenize(texts):
    ids = [[hash(t) % 30000 + 1 for t in s.split()] for s in texts]
    T = max(map(len, ids))
    return dict(
        input_ids=[x + [0] * (T - len(x)) for x in ids],
        attention_mask=[[1] * len(x) + [0] * (T - len(x)) for x in ids],
    )


def bench(
    paired, unpaired, workers: int, size: int, batch: int, epochs: int, decode_size, source: str = "files"
) -> dict:
    L = make_loader(
        paired,
        unpaired,
        tokenize=tokenize,
        image_size=size,
        batch_size_paired=batch,
        batch_size_unpaired=batch,
        num_workers=workers,
        decode_size=decode_size,
        check_images=False,
        verbose=False,
        streaming=source == "stream",
    )
    with L:
        it = iter(L)
        next(it)
        list(it)  # warm-up epoch (worker start, caches)
        n, t0 = 0, time.perf_counter()
        for _ in range(epochs):
            for b in L:
                n += b.n_paired + b.n_unpaired
        dt = time.perf_counter() - t0
    return dict(
        bench="loader",
        source=source,
        workers=workers,
        size=size,
        batch_paired=batch,
        batch_unpaired=batch,
        decode_size=decode_size,
        images=n,
        seconds=round(dt, 3),
        images_per_s=round(n / dt, 1),
        images_per_s_per_worker=round(n / dt / max(1, workers), 1),
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=64, help="synthetic images (half paired, half unpaired)")
    ap.add_argument("--width", type=int, default=1536)
    ap.add_argument("--height", type=int, default=1152)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--decode-size", type=int, nargs="+", default=[0, 448], help="JPEG draft size (0 = full decode)"
    )
    ap.add_argument(
        "--sources",
        nargs="+",
        default=["files"],
        choices=["files", "shards", "stream"],
        help="read the manifests' files, the prepared shards memory-mapped, or the shards as streams",
    )
    ap.add_argument("--root", type=Path, default=None, help="corpus folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=None, help="append the JSON lines to this file")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = a.root or Path(tmp)
        t = time.perf_counter()
        paired, unpaired = make_corpus(root, a.images, a.width, a.height)
        meta = dict(
            bench="loader-setup",
            images=a.images,
            width=a.width,
            height=a.height,
            write_s=round(time.perf_counter() - t, 2),
            cpus=os.cpu_count(),
            torch=torch.__version__,
            machine=platform.machine(),
        )
        print(json.dumps(meta), flush=True)
        rows = [meta]
        inputs = {"files": (paired, unpaired)}
        if {"shards", "stream"} & set(a.sources):
            t = time.perf_counter()
            prepared = []
            for m in (paired, unpaired):
                prepare_dataset(m, root / f"prepared-{m.stem}", shard_size=16, verbose=False)
                prepared.append(root / f"prepared-{m.stem}")
            inputs["shards"] = inputs["stream"] = tuple(prepared)
            meta["prepare_s"] = round(time.perf_counter() - t, 2)
            print(json.dumps(dict(bench="loader-prepare", seconds=meta["prepare_s"])), flush=True)
        for src in a.sources:
            for ds in a.decode_size:
                for w in a.workers:
                    r = bench(*inputs[src], w, a.size, a.batch, a.epochs, ds or None, source=src)
                    print(json.dumps(r), flush=True)
                    rows.append(r)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        with open(a.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
