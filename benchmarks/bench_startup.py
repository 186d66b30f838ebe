"""Start-up that does not grow with ranks x images (issue 19): time to the first batch at 10k / 100k / 1M records.

A script, not a test. For each size it writes a manifest of N records whose image paths are N distinct hard links to
a pool of tiny PNGs (16x16; distinct paths and directory entries, one inode per pool image, so a 1M corpus costs
seconds and no disk), then measures in a fresh process per configuration:

  manifest/<check>      `make_loader(None, manifest, check_images=...)` + the first batch (one rank)
  manifest/<check>/w2   the same for rank 0 of 2 with `check_shard=(0, 2)`: this rank checks half of the images
  prepare               `maskedclip-prepare` once (validates every image: 'verify'), not per run
  shards                the prepared dataset memory-mapped (`load_from_disk`) + the first batch
  stream                the prepared dataset as a stream (`StreamingLoader`, rank 0 of 2) + the first batch

and loader throughput (images/s after the first batch) from files, memory-mapped shards and the stream. Every
timing is wall time on a warm page cache (the files were just written); "first batch" is the data side of the first
training step: building the model and its first step do not depend on N. JSON lines on stdout; with `--out`,
`startup.json` (every row) and `startup.md` (the tables).

    nice -n 10 python benchmarks/bench_startup.py --sizes 10000 100000 1000000 --out benchmarks/results
"""

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from PIL import Image

POOL = 256  # distinct tiny PNGs behind the hard links
BATCH = 64


def make_corpus(root: Path, n: int) -> Path:
    "N records under `root`: `images/<k>/<i>.png` hard links to `POOL` tiny PNGs, and `unpaired.jsonl`."
    t0 = time.perf_counter()
    pool = root / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for j in range(POOL):
        b = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(b, "PNG")
        (pool / f"{j}.png").write_bytes(b.getvalue())
    with open(root / "unpaired.jsonl", "w") as f:
        for i in range(n):
            d = root / "images" / f"{i // 1000:04d}"
            if i % 1000 == 0:
                d.mkdir(parents=True, exist_ok=True)
            os.link(pool / f"{i % POOL}.png", d / f"{i}.png")
            f.write(
                json.dumps(dict(id=f"r{i}", image=f"images/{i // 1000:04d}/{i}.png", source="bench")) + "\n"
            )
            if i and i % 100_000 == 0:
                print(f"  [corpus] {i:,} / {n:,} records", file=sys.stderr, flush=True)
    print(
        f"  [corpus] {n:,} records written in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True
    )
    return root / "unpaired.jsonl"


def child(cfg: dict) -> dict:
    "One measurement, in its own process: time to the loader and to its first batch (+ throughput if asked)."
    import torch

    torch.set_num_threads(1)
    from maskedclip.data import make_loader, prepare_dataset

    out = dict(cfg)
    t0 = time.perf_counter()
    if cfg["kind"] == "prepare":
        info = prepare_dataset(
            cfg["manifest"],
            cfg["prepared"],
            check_images="verify",
            shard_size=cfg["shard_size"],
            verbose=False,
        )
        out.update(seconds=round(time.perf_counter() - t0, 3), kept=info["kept"], shards=len(info["shards"]))
        return out
    if cfg["kind"] == "trainer":  # the real thing: Trainer construction (model, loader) to the end of step 1
        from maskedclip.config import DataConfig, ExperimentConfig, TrainConfig, get_preset
        from maskedclip.train import Trainer

        src = cfg["prepared"] if cfg["source"] == "prepared" else cfg["manifest"]
        data = dict(
            unpaired=src,
            paired_batch_size=0,
            unpaired_batch_size=BATCH,
            check_images=cfg.get("check", "header"),
        )
        ec = ExperimentConfig(
            model=get_preset("tiny", "mae"),
            data=DataConfig(**data),
            train=TrainConfig(output_dir=cfg["out"], steps=2, save_every=0, diag_every=0),
        )
        tr = Trainer(ec, progress=False)
        t1 = time.perf_counter()
        tr.fit(until=1)
        out.update(build_s=round(t1 - t0, 3), first_step_s=round(time.perf_counter() - t0, 3))
        return out
    kw = dict(image_size=16, batch_size_unpaired=BATCH, verbose=False)
    if cfg["kind"] == "manifest":
        kw["check_images"] = {"all": True, "header": "header", "none": False}[cfg["check"]]
        if (
            cfg.get("world", 1) > 1
        ):  # rank 0 of `world`: checks its share; the others' errors arrive by the gather
            kw.update(
                check_shard=(0, cfg["world"]), all_gather=lambda errs: [errs] + [[]] * (cfg["world"] - 1)
            )
        src = cfg["manifest"]
    elif cfg["kind"] == "shards":
        src = cfg["prepared"]
    else:
        src = cfg["prepared"]
        kw.update(streaming=True, rank=0, world_size=cfg.get("world", 1), split=cfg.get("split", "shards"))
    L = make_loader(None, src, **kw)
    t1 = time.perf_counter()
    it = L.iter_with_meta()
    next(it)
    t2 = time.perf_counter()
    out.update(loader_s=round(t1 - t0, 3), first_batch_s=round(t2 - t0, 3), steps_per_epoch=len(L))
    if cfg.get("batches"):
        n, t3 = 0, time.perf_counter()
        for _ in range(cfg["batches"]):
            b, _m = next(it)
            n += b.n_unpaired
        out.update(images_per_s=round(n / (time.perf_counter() - t3), 1))
    import resource

    out["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def run_child(cfg: dict) -> dict:
    r = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True, check=False
    )
    if r.returncode:
        return dict(
            cfg, error=r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
        )
    return json.loads(r.stdout.strip().splitlines()[-1])


def plan(
    n: int, manifest: Path, prepared: Path, shard_size: int, full_check_max: int, batches: int
) -> list[dict]:
    m, p = str(manifest), str(prepared)
    rows = [dict(kind="manifest", check=c, n=n, manifest=m) for c in ("none", "header")]
    rows.append(dict(kind="manifest", check="header", world=2, n=n, manifest=m))
    if n <= full_check_max:
        rows += [dict(kind="manifest", check="all", n=n, manifest=m)]
    rows += [
        dict(kind="prepare", n=n, manifest=m, prepared=p, shard_size=shard_size),
        dict(kind="shards", n=n, prepared=p),
        dict(kind="stream", n=n, prepared=p, world=2, split="shards"),
        dict(kind="trainer", source="manifest", check="header", n=n, manifest=m, out=f"{p}-run-m"),
        dict(kind="trainer", source="prepared", n=n, prepared=p, out=f"{p}-run-p"),
    ]
    if batches:  # throughput after the first batch: files (no check) vs memory-mapped shards vs stream
        rows += [
            dict(kind="manifest", check="none", n=n, manifest=m, batches=batches),
            dict(kind="shards", n=n, prepared=p, batches=batches),
            dict(kind="stream", n=n, prepared=p, world=1, batches=batches),
        ]
    return rows


def label(r: dict) -> str:
    k = r["kind"]
    if k == "trainer":
        return f"Trainer to the end of step 1 ({r['source']}{', check_images=' + r['check'] if r.get('check') else ''})"
    if k == "manifest":
        return f"manifest, check_images={r['check']}" + (
            f", rank 0 of {r['world']}" if r.get("world") else ""
        )
    if k == "stream":
        return f"prepared, streaming (rank 0 of {r.get('world', 1)})"
    return {"shards": "prepared, memory-mapped", "prepare": "maskedclip-prepare (once)"}[k]


def markdown(rows: list[dict], meta: dict) -> str:
    sizes = sorted({r["n"] for r in rows if "n" in r})
    start = [r for r in rows if "batches" not in r and r.get("kind") not in (None, "prepare")]
    names = list(dict.fromkeys(label(r) for r in start))
    first = lambda r: r["first_step_s"] if r["kind"] == "trainer" else r["first_batch_s"]
    cell = lambda r: "error" if "error" in r else f"{first(r):.2f}"
    out = [
        "# Start-up: time to the first batch, one rank (issue 19)",
        "",
        f"Machine: {meta['cpus']} CPUs ({meta['machine']}), torch {meta['torch']}, datasets {meta['datasets']}; "
        f"tiny 16x16 PNG records (hard links to {POOL} images), batch {BATCH}, image size 16, warm page cache. "
        "Seconds from `make_loader` to the first batch in a fresh process (the data side of the first training step); "
        "Trainer rows: from `Trainer(...)` (tiny MAE model, unpaired data, batch 64 at 64 px) to the end of step 1.",
        "",
        "| configuration | " + " | ".join(f"{n:,} records" for n in sizes) + " | growth 10x -> 10x |",
        "|---|" + "---:|" * len(sizes) + "---|",
    ]
    for name in names:
        by = {r["n"]: r for r in start if label(r) == name}
        vals = [cell(by[n]) if n in by else "-" for n in sizes]
        ok = [first(by[n]) for n in sizes if n in by and "error" not in by[n]]
        growth = " / ".join(f"{b / a:.1f}x" for a, b in zip(ok, ok[1:]) if a > 0) or "-"
        out.append(f"| {name} | " + " | ".join(vals) + f" | {growth} |")
    prep = {r["n"]: r for r in rows if r.get("kind") == "prepare"}
    if prep:
        out += [
            "",
            "`maskedclip-prepare` once (validates every image with check 'verify', writes the Arrow shards):",
            "",
            "| records | seconds | shards |",
            "|---:|---:|---:|",
        ]
        out += [
            f"| {n:,} | {r.get('seconds', 'error')} | {r.get('shards', '-')} |"
            for n, r in sorted(prep.items())
        ]
    tp = [r for r in rows if "batches" in r]
    if tp:
        out += [
            "",
            "Loader throughput after the first batch (images/s, one process, no workers, tiny images: the per-sample "
            "overhead of each source, not decoding):",
            "",
            "| records | source | images/s |",
            "|---:|---|---:|",
        ]
        out += [f"| {r['n']:,} | {label(r)} | {r.get('images_per_s', 'error')} |" for r in tp]
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument(
        "--work", type=Path, default=Path("runs/bench-startup"), help="where the corpora are written"
    )
    ap.add_argument("--shard-size", type=int, default=10_000)
    ap.add_argument(
        "--full-check-max", type=int, default=100_000, help="largest N timed with check_images=all"
    )
    ap.add_argument(
        "--batches", type=int, default=40, help="batches timed for throughput (at the smallest size)"
    )
    ap.add_argument(
        "--out", type=Path, default=None, help="folder for startup.json and startup.md (merged by size)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the generated corpora")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))), flush=True)
        return
    import datasets
    import torch

    meta = dict(
        bench="startup-setup",
        cpus=os.cpu_count(),
        machine=platform.machine(),
        torch=torch.__version__,
        datasets=datasets.__version__,
    )
    rows = []
    old = a.out / "startup.json" if a.out else None
    if old is not None and old.is_file():  # keep the sizes measured earlier, replace the ones measured now
        rows = [
            r for r in map(json.loads, old.read_text().splitlines()) if r.get("n") not in a.sizes and "n" in r
        ]
    print(json.dumps(meta), flush=True)
    for n in sorted(a.sizes):
        root = a.work / f"n{n}"
        shutil.rmtree(root, ignore_errors=True)
        manifest = make_corpus(root, n)
        for cfg in plan(
            n,
            manifest,
            root / "prepared",
            a.shard_size,
            a.full_check_max,
            a.batches if n == min(a.sizes) else 0,
        ):
            r = run_child(cfg)
            r = {k: v for k, v in r.items() if k not in ("manifest", "prepared", "out")}
            print(json.dumps(r), flush=True)
            rows.append(r)
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    rows.sort(key=lambda r: (r["n"], "batches" in r))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "startup.json").write_text("".join(json.dumps(r) + "\n" for r in [meta] + rows))
        (a.out / "startup.md").write_text(markdown(rows, meta))
        print(markdown(rows, meta))


if __name__ == "__main__":
    main()
