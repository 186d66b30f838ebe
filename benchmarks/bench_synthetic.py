"""Throughput of the synthetic fundus renderer and corpus builder (a measurement, not a test).

    python benchmarks/bench_synthetic.py [--sizes 64 224 512] [--n 20] [--corpus 200] [--workers 1 2]

Prints one JSON line per measurement: per-image render time (median over eyes of the best of 3 repeats,
wall and CPU seconds of this process) for each size, and corpus images/second for each worker count.
The machine is shared: compare numbers from the same run only.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from maskedclip.synthetic import build_corpus, make_sample, render_fundus, sample_findings


def bench_render(size: int, n: int) -> dict:
    eyes = [sample_findings(np.random.default_rng(i)) for i in range(n)]
    wall, cpu = [], []
    for i, f in enumerate(eyes):
        bw = bc = float("inf")
        for _ in range(3):
            t, c = time.perf_counter(), time.process_time()
            render_fundus(f, size, np.random.default_rng(i))
            bw, bc = min(bw, time.perf_counter() - t), min(bc, time.process_time() - c)
        wall.append(bw)
        cpu.append(bc)
    return dict(
        bench="render_fundus",
        size=size,
        n=n,
        wall_ms_median=round(1e3 * float(np.median(wall)), 2),
        cpu_ms_median=round(1e3 * float(np.median(cpu)), 2),
        wall_ms_max=round(1e3 * max(wall), 2),
    )


def bench_sample(size: int, n: int) -> dict:
    t = time.perf_counter()
    for i in range(n):
        make_sample(0, i, size)
    return dict(
        bench="make_sample", size=size, n=n, wall_ms_mean=round(1e3 * (time.perf_counter() - t) / n, 2)
    )


def bench_corpus(n: int, workers: int, size: int = 64) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        build_corpus(
            Path(tmp) / "c",
            n_paired=n // 2,
            n_unpaired=n // 2,
            n_task_per_split=0,
            size=size,
            num_workers=workers,
            progress=False,
        )
        dt = time.perf_counter() - t
    return dict(
        bench="build_corpus",
        size=size,
        images=n,
        workers=workers,
        seconds=round(dt, 2),
        images_per_s=round(n / dt, 1),
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 224, 512])
    p.add_argument("--n", type=int, default=20, help="eyes per size")
    p.add_argument("--corpus", type=int, default=200, help="images in the corpus benchmark (0 = skip)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    a = p.parse_args(argv)
    for s in a.sizes:
        print(json.dumps(bench_render(s, a.n if s <= 256 else max(3, a.n // 4))), flush=True)
    print(json.dumps(bench_sample(64, 2 * a.n)), flush=True)
    if a.corpus:
        for w in a.workers:
            print(json.dumps(bench_corpus(a.corpus, w)), flush=True)


if __name__ == "__main__":
    main()
