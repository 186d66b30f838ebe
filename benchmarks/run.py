#!/usr/bin/env python
"""maskedclip performance benchmarks (issue 8): one command, one machine, one JSON + one Markdown table.

    python benchmarks/run.py [--quick] [--device auto|cpu|cuda] [--out benchmarks/results] [--only tiny,methods,...]

Measures, in one run on the current machine: training-step throughput and peak memory of every method at the tiny
and ViT-B sizes, FLOPs per step and FLOPs utilisation against matmul ceilings measured in the same run, the
encoder's masking speed-up, the combined MaskedCLIP step against the sum of its parts, fused vs explicit attention,
torch.compile, bf16 autocast, scaling in batch size / image size / processes, and data-loader throughput; then
checks the issue's CPU targets. See benchmarks/README.md for what every number means.

Each measurement runs in its own child process (forked from a server that has already imported torch and
maskedclip, so a child starts in milliseconds): peak memory is per variant, and a crash or time-out of one
measurement is recorded and the run goes on. Variants that are compared with each other are timed alternately in
the same child. Children get MALLOC_* settings that keep glibc from returning memory to the system every step.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# glibc malloc: serve tensors up to 1 GiB from the heap instead of fresh mmaps, and never trim the heap (DESIGN.md:
# the default returns large blocks to the system every step -> page faults, ±30% run-to-run). The trim threshold
# must exceed what one step frees: a ViT-B step frees > 1 GiB of activations, so a 1 GiB threshold still trims and
# re-faults ~500k pages per step. Values already set in the environment win.
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(2**30),
    "MALLOC_TRIM_THRESHOLD_": str(2**36),
    "MALLOC_TOP_PAD_": str(64 * 2**20),
}
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
SECTIONS = (
    "peak",
    "methods",
    "masking",
    "parts",
    "attention",
    "compile",
    "precision",
    "scaling",
    "dist",
    "loader",
)
SIZE_NAMES = ("tiny", "vitb")
METHODS = ("mae", "clip", "mae_clip", "mae_clip_bridge", "maskedclip", "mlip")
TARGETS = dict(masking=2.5, parts=0.10, utilisation=0.40, loader=3.0)

# ------------------------------------------------------------------------------------------------ options


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"sections: {', '.join(SECTIONS)}; sizes: {', '.join(SIZE_NAMES)}",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny size only, few repeats, no compile (a few minutes on 2 cores)",
    )
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--out", type=Path, default=HERE / "results", help="folder for latest.json / latest.md")
    ap.add_argument("--tag", default=None, help="also write <tag>.json / <tag>.md next to latest.*")
    ap.add_argument(
        "--only",
        default=None,
        help="comma list of sizes (tiny, vitb) and/or sections; sizes replace the default sizes, sections "
        "restrict what runs (e.g. --only tiny; --only vitb,methods,peak; --only compile)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per process (default: the CPUs this process may use)",
    )
    ap.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16"),
        help="precision of the main measurements (auto: bf16 on CUDA, fp32 on CPU, as the trainer)",
    )
    ap.add_argument("--batch-tiny", default="8+8", help="paired+unpaired batch at the tiny size")
    ap.add_argument("--batch-vitb", default="2+2", help="paired+unpaired batch at the ViT-B size")
    ap.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="warm-up steps per variant (default quick 2; full tiny 3, vitb 2)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed steps per variant (default quick 5; full tiny 10, vitb 5)",
    )
    ap.add_argument(
        "--passes",
        type=int,
        default=None,
        help="method table: passes over the variants, alternating order (quick 1, full 2)",
    )
    ap.add_argument("--methods", default=",".join(METHODS), help="methods of the method table")
    ap.add_argument(
        "--nproc",
        default=None,
        help="process counts for the scaling section (default 1,2,4,.. up to the CPUs / GPUs)",
    )
    ap.add_argument("--workers", default="0,1,2", help="data-loader worker counts")
    ap.add_argument(
        "--job-timeout",
        type=float,
        default=None,
        help="seconds before a measurement is abandoned (quick 900, full 2400)",
    )
    ap.add_argument(
        "--no-malloc-env", action="store_true", help="do not set the MALLOC_* variables for the children"
    )
    ap.add_argument(
        "--spawn",
        action="store_true",
        help="start every child as a fresh interpreter instead of forking a pre-imported server",
    )
    a = ap.parse_args(argv)
    sizes, sections = [], []
    for tok in filter(None, (t.strip() for t in (a.only or "").split(","))):
        if tok in SIZE_NAMES:
            sizes.append(tok)
        elif tok in SECTIONS:
            sections.append(tok)
        else:
            ap.error(f"--only: {tok!r} is neither a size {SIZE_NAMES} nor a section {SECTIONS}")
    a.sizes = sizes or (["tiny"] if a.quick else ["tiny", "vitb"])
    a.compile_sizes = sizes or ["tiny"]  # compiling ViT-B on a CPU takes long: only when its size is named
    explicit = set(sections)
    a.sections = sections or [s for s in SECTIONS if not (a.quick and s == "compile")]
    a.compile_skipped_reason = (
        None
        if "compile" in a.sections
        else (
            "skipped in --quick (compiling takes minutes on 2 cores); run the full mode or add --only compile"
            if a.quick and not explicit
            else "not selected (--only)"
        )
    )
    if any(s in a.sections for s in ("methods", "precision")) and "peak" not in a.sections:
        a.sections.insert(0, "peak")
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in a.methods if m not in METHODS]
    if bad:
        ap.error(f"--methods: {bad[0]!r} is not one of {METHODS}")
    a.batch = {}
    for name, spec in (("tiny", a.batch_tiny), ("vitb", a.batch_vitb)):
        try:
            bp, bu = (int(x) for x in spec.split("+"))
        except ValueError:
            ap.error(f"--batch-{name}: {spec!r} is not P+U, e.g. 8+8")
        if bp < 1 or bu < 0:
            ap.error(f"--batch-{name}: need at least one paired image, got {spec!r}")
        a.batch[name] = (bp, bu)
    a.workers = [int(w) for w in a.workers.split(",")]
    a.passes = a.passes or (1 if a.quick else 2)
    a.job_timeout = a.job_timeout or (900 if a.quick else 2400)
    return a


def counts(a, size: str) -> tuple[int, int]:
    "(warm-up, repeats) for `size` under the options."
    if a.quick:
        w, r = 2, 5
    else:
        w, r = (3, 10) if size == "tiny" else (2, 5)
    return (a.warmup if a.warmup is not None else w), (a.repeats if a.repeats is not None else r)


# ------------------------------------------------------------------------------------------------ machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                fl = line.split(":", 1)[1].split()
                return sorted(
                    f for f in fl if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2", "avx512_vnni"))
                )
    except OSError:
        pass
    return []


def loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def git_commit() -> str | None:
    try:
        return (
            subprocess.run(
                ["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------------------------------------ children


class Children:
    "Runs `benchlib.child_main(task, kwargs)` in a child process; returns (ok, result-or-error)."

    def __init__(self, env: dict, spawn: bool = False):
        import multiprocessing as mp

        os.environ.update(env)  # read by the server / fresh interpreters at start-up (glibc, HF)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(HERE)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        self.method = "spawn" if spawn or "forkserver" not in mp.get_all_start_methods() else "forkserver"
        self.ctx = mp.get_context(self.method)
        if self.method == "forkserver":
            self.ctx.set_forkserver_preload(["benchlib"])
        import benchlib  # noqa: F401  (the parent needs the module to pickle the target by reference)

        self.child_main = benchlib.child_main

    def run(self, task: str, kwargs: dict, timeout: float) -> tuple[bool, dict | str]:
        r, w = self.ctx.Pipe(duplex=False)
        p = self.ctx.Process(target=self.child_main, args=(task, kwargs, w), daemon=False)
        p.start()
        w.close()
        try:
            if not r.poll(timeout):
                p.terminate()
                p.join(10)
                if p.is_alive():
                    p.kill()
                return False, f"timed out after {timeout:.0f} s"
            status, payload = r.recv()
            return status == "ok", payload
        except EOFError:
            p.join(10)
            return False, f"child died (exit code {p.exitcode}; killed for memory?)"
        finally:
            r.close()
            p.join(30)
            if p.is_alive():
                p.kill()


def run_torchrun(
    a,
    nproc: int,
    threads: int,
    size: str,
    bp: int,
    bu: int,
    warmup: int,
    repeats: int,
    precision: str,
    env: dict,
    tmp: Path,
) -> tuple[bool, dict | str]:
    out = tmp / f"dist-{nproc}.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(HERE / "dist_worker.py"),
        "--json",
        str(out),
        "--device",
        a.device,
        "--size",
        size,
        "--bp",
        str(bp),
        "--bu",
        str(bu),
        "--warmup",
        str(warmup),
        "--repeats",
        str(repeats),
        "--precision",
        precision,
        "--threads",
        str(threads),
    ]
    e = {**os.environ, **env, "OMP_NUM_THREADS": str(threads)}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=a.job_timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {a.job_timeout:.0f} s"
    if p.returncode != 0 or not out.is_file():
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-15:])
        return False, f"torchrun exited {p.returncode}: {tail}"
    return True, json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------ the plan


@dataclass
class Job:
    section: str
    name: str
    task: str  # benchlib task, or 'torchrun'
    kwargs: dict = field(default_factory=dict)


def build_plan(a, device: str, precision: str, tmp: Path) -> list[Job]:
    jobs: list[Job] = []
    sec, th = a.sections, a.threads
    common = dict(device=device, threads=th)
    if "peak" in sec:
        jobs.append(Job("peak", "matmul peaks", "peak", dict(common, quick=a.quick)))
    if "methods" in sec:
        variants = []
        for size in a.sizes:
            for m in a.methods:
                for cv in (None,) if m in ("mae", "mlip") else ("full", "masked"):
                    variants.append((size, m, cv))
        order = list(variants)
        for p in range(a.passes):
            for size, m, cv in order if p % 2 == 0 else order[::-1]:
                w, r = counts(a, size)
                r_p = r // a.passes + (1 if p < r % a.passes else 0)
                if r_p == 0:
                    continue
                bp, bu = a.batch[size]
                jobs.append(
                    Job(
                        "methods",
                        f"{size} {m}{'/' + cv if cv else ''} (pass {p + 1})",
                        "method",
                        dict(
                            common,
                            size=size,
                            method=m,
                            clip_view=cv,
                            bp=bp,
                            bu=bu,
                            warmup=w,
                            repeats=r_p,
                            precision=precision,
                            flops=(p == 0),
                        ),
                    )
                )
    for size in a.sizes:
        w, r = counts(a, size)
        bp, bu = a.batch[size]
        if "masking" in sec:
            jobs.append(
                Job(
                    "masking",
                    f"{size} encoder mask 0 vs 0.75",
                    "masking",
                    dict(
                        common,
                        size=size,
                        n_images=bp + bu,
                        ratios=[0.0, 0.75],
                        warmup=w,
                        repeats=r,
                        precision=precision,
                    ),
                )
            )
        if "parts" in sec:
            jobs.append(
                Job(
                    "parts",
                    f"{size} combined vs parts",
                    "parts",
                    dict(common, size=size, bp=bp, bu=bu, warmup=w, repeats=r, precision=precision),
                )
            )
        if "attention" in sec:
            jobs.append(
                Job(
                    "attention",
                    f"{size} fused vs explicit attention",
                    "pair",
                    dict(
                        common,
                        size=size,
                        kind="attention",
                        bp=bp,
                        bu=bu,
                        warmup=w,
                        repeats=r,
                        precision=precision,
                    ),
                )
            )
        if "precision" in sec:
            jobs.append(
                Job(
                    "precision",
                    f"{size} fp32 vs bf16 autocast",
                    "pair",
                    dict(
                        common,
                        size=size,
                        kind="precision",
                        bp=bp,
                        bu=bu,
                        warmup=w,
                        repeats=r,
                        precision="fp32",
                    ),
                )
            )
        if "compile" in sec and size in a.compile_sizes:
            jobs.append(
                Job(
                    "compile",
                    f"{size} torch.compile",
                    "compile",
                    dict(common, size=size, bp=bp, bu=bu, warmup=w, repeats=r, precision=precision),
                )
            )
    if "scaling" in sec:
        for size in a.sizes:
            w, r = counts(a, size)
            bp, bu = a.batch[size]
            if size == "tiny":
                bs = [2, 4, 8] if a.quick else [2, 4, 8, 16]
                jobs.append(
                    Job(
                        "scaling",
                        "tiny batch size",
                        "scaling",
                        dict(
                            common,
                            size=size,
                            method="maskedclip",
                            points=[[b, b, 64] for b in bs],
                            warmup=w,
                            repeats=r,
                            precision=precision,
                        ),
                    )
                )
                imgs = [32, 64, 96] if a.quick else [32, 64, 96, 128]
                jobs.append(
                    Job(
                        "scaling",
                        "tiny image size",
                        "scaling",
                        dict(
                            common,
                            size=size,
                            method="maskedclip",
                            points=[[bp, bu, s] for s in imgs],
                            warmup=w,
                            repeats=r,
                            precision=precision,
                        ),
                    )
                )
            else:
                ws, rs = (
                    (w, r) if (a.warmup is not None or a.repeats is not None) else (1, 3)
                )  # ViT-B scaling: 1 + 3 steps per point by default
                jobs.append(
                    Job(
                        "scaling",
                        "vitb batch size",
                        "scaling",
                        dict(
                            common,
                            size=size,
                            method="maskedclip",
                            points=[[b, b, 224] for b in (1, 2, 4)],
                            warmup=ws,
                            repeats=rs,
                            precision=precision,
                        ),
                    )
                )
                for s in (112, 160, 224):  # one child each: three ViT-B models at once would need ~10 GB
                    jobs.append(
                        Job(
                            "scaling",
                            f"vitb image size {s}",
                            "scaling",
                            dict(
                                common,
                                size=size,
                                method="maskedclip",
                                points=[[bp, bu, s]],
                                warmup=ws,
                                repeats=rs,
                                precision=precision,
                            ),
                        )
                    )
    if "dist" in sec:
        cpus = usable_cpus()
        limit = max(1, _cuda_count()) if device == "cuda" else cpus
        ns = (
            [int(n) for n in a.nproc.split(",")]
            if a.nproc
            else [n for n in (1, 2, 4, 8, 16) if n <= limit] or [1]
        )
        size = "tiny"
        w, r = counts(a, size)
        bp, bu = a.batch[size]
        for n in ns:
            jobs.append(
                Job(
                    "dist",
                    f"{n} process(es), tiny",
                    "torchrun",
                    dict(
                        nproc=n,
                        threads=max(1, (a.threads or cpus) // n),
                        size=size,
                        bp=bp,
                        bu=bu,
                        warmup=w,
                        repeats=r,
                        precision=precision,
                    ),
                )
            )
    if "loader" in sec:
        for s in (64, 224):
            bp, bu = a.batch["tiny" if s == 64 else "vitb"]
            n = 32 if a.quick else 64
            jobs.append(
                Job(
                    "loader",
                    f"loader {s}px",
                    "loader",
                    dict(
                        common,
                        image_size=s,
                        n_paired=n,
                        n_unpaired=n,
                        bp=bp,
                        bu=bu,
                        workers=a.workers,
                        min_seconds=1.0 if a.quick else 3.0,
                        corpus_dir=str(tmp),
                    ),
                )
            )
    return jobs


def _cuda_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
        return sum(1 for line in out.splitlines() if line.startswith("GPU "))
    except (OSError, subprocess.SubprocessError):
        return 0


# ------------------------------------------------------------------------------------------------ derived numbers


def merge_method_passes(rows: list[dict]) -> list[dict]:
    "Combine the passes of each (size, method, clip_view): all samples pooled, memory = max, FLOPs from pass 1."
    import benchlib

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["size"], r["method"], r["clip_view"]), []).append(r)
    out = []
    for key, rs in groups.items():
        base = dict(next((r for r in rs if "flops" in r), rs[0]))
        samples = [s for r in rs for s in r["samples_s"]]
        base.update(benchlib.summary(samples))
        base["passes"] = len(rs)
        base["peak_mem_mb"] = max(r["peak_mem_mb"] for r in rs)
        base["minor_faults_per_step"] = round(sum(r["minor_faults_per_step"] for r in rs) / len(rs))
        base["loss_finite"] = all(r["loss_finite"] for r in rs)
        out.append(base)
    return out


def derive(R: dict, a, precision: str) -> dict:
    "Throughput, utilisation, ratios and the targets from the raw results."
    peaks = R.get("peak") or {}

    def peak_for(prec):
        return (peaks.get("bf16_peak_gflops") if prec == "bf16" else peaks.get("fp32_peak_gflops")) or None

    for row in R.get("methods", []):
        row["images_per_s"] = row["images"] / row["median_s"]
        if row.get("flops"):
            row["achieved_gflops"] = row["flops"]["total"] / row["median_s"] / 1e9
            p = peak_for(row["precision"])
            row["utilisation"] = row["achieved_gflops"] / p if p else None
            mm = (peaks.get(f"mm_{row['precision']}") or {}).get("gflops")
            row["utilisation_vs_mm"] = row["achieved_gflops"] / mm if mm else None
    for row in R.get("precision", []) + R.get("attention", []):
        for k, v in row["rows"].items():
            v["achieved_gflops"] = row["flops"] / v["median_s"] / 1e9
            p = peak_for(v.get("precision", k))
            v["utilisation"] = v["achieved_gflops"] / p if p else None
    for row in R.get("masking", []):
        for r in row["rows"]:
            r["achieved_gflops"] = r["flops"] / r["median_s"] / 1e9
    # the targets
    T = []

    def main_row(size):
        return next(
            (
                r
                for r in R.get("methods", [])
                if r["size"] == size and r["method"] == "maskedclip" and r["clip_view"] == "full"
            ),
            None,
        )

    # 1. masking
    mk = {r["size"]: r for r in R.get("masking", [])}
    size = "vitb" if "vitb" in mk else ("tiny" if "tiny" in mk else None)
    if size:
        m0, m75 = mk[size]["rows"][0], mk[size]["rows"][-1]
        val = m0["median_s"] / m75["median_s"]
        why = None
        if val < TARGETS["masking"]:
            fr = m0["flops"] / m75["flops"]
            if fr < TARGETS["masking"]:
                why = f"FLOPs only fall {fr:.2f}x (patch embedding and CLS/attention terms do not shrink with the mask)"
            else:
                why = (
                    f"FLOPs fall {fr:.2f}x but time only {val:.2f}x: at {m75['tokens']} tokens/image the matmuls run at "
                    f"{m75['achieved_gflops']:.0f} GFLOP/s vs {m0['achieved_gflops']:.0f} at {m0['tokens']} (fixed per-op costs dominate small shapes)"
                )
        T.append(
            dict(
                target="encoder fwd+bwd: mask 0.75 ≥ 2.5× faster than mask 0",
                size=size,
                value=val,
                unit="×",
                passed=val >= TARGETS["masking"],
                why=why,
                note=None if size == "vitb" else "tiny size only (ViT-B not measured in this run)",
            )
        )
    else:
        T.append(
            dict(
                target="encoder fwd+bwd: mask 0.75 ≥ 2.5× faster than mask 0",
                size=None,
                value=None,
                passed=None,
                why=None,
                note="not measured",
            )
        )
    # 2. parts
    pt = {r["size"]: r for r in R.get("parts", [])}
    size = "vitb" if "vitb" in pt else ("tiny" if "tiny" in pt else None)
    tgt = "combined MaskedCLIP step ≤ 1.10 × (MAE part + CLIP part + MFD part)"
    if size:
        p = pt[size]
        val = p["overhead"]
        why = None
        if val > TARGETS["parts"]:
            excess = (1 + p["overhead"]) / (1 + p["flop_overhead"]) - 1
            rows = p["rows"]
            why = (
                f"combined does {100 * p['flop_overhead']:+.0f}% FLOPs vs the parts' sum but takes {100 * val:+.0f}% time "
                f"(time per FLOP {100 * excess:+.0f}%); parts: "
                + ", ".join(f"{k} {rows[k]['median_s'] * 1e3:.0f} ms" for k in ("mae", "clip", "mfd"))
                + f", combined {rows['combined']['median_s'] * 1e3:.0f} ms"
            )
        T.append(
            dict(
                target=tgt,
                size=size,
                value=val,
                unit="overhead",
                passed=val <= TARGETS["parts"],
                why=why,
                note=None if size == "vitb" else "tiny size only (ViT-B not measured in this run)",
            )
        )
    else:
        T.append(dict(target=tgt, size=None, value=None, passed=None, why=None, note="not measured"))
    # 3. utilisation
    row = main_row("vitb")
    tgt = "ViT-B training step FLOPs utilisation ≥ 40% of the measured matmul peak"
    if row and row.get("utilisation") is not None:
        val = row["utilisation"]
        src = peaks.get("bf16_peak_source" if row["precision"] == "bf16" else "fp32_peak_source")
        why = None
        if val < TARGETS["utilisation"]:
            fm = row["flops"].get("forward_per_module", {})
            tot = sum(fm.values()) or 1
            top = sorted(fm.items(), key=lambda kv: -kv[1])[:3]
            enc0 = next((r["rows"][0] for r in R.get("masking", []) if r["size"] == "vitb"), None)
            ref = (
                f"; the encoder alone at mask 0 reaches {enc0['achieved_gflops'] / peak_for(row['precision']):.0%}"
                if enc0 and peak_for(row["precision"])
                else ""
            )
            why = (
                f"{row['achieved_gflops']:.0f} GFLOP/s of {peak_for(row['precision']):.0f}; forward FLOPs: "
                + ", ".join(f"{k} {v / tot:.0%}" for k, v in top)
                + f"; batch {row['bp']}+{row['bu']} gives small matmuls (masked pass: {int(row['images'])} images × {int(row['num_patches'] * (1 - row['mask_ratio'])) + 1} tokens){ref}"
            )
        T.append(
            dict(
                target=tgt,
                size="vitb",
                value=val,
                unit="%",
                passed=val >= TARGETS["utilisation"],
                why=why,
                note=f"maskedclip (clip_view full), {row['precision']}, against {src} = {peak_for(row['precision']):.0f} GFLOP/s",
            )
        )
    else:
        T.append(
            dict(
                target=tgt,
                size="vitb",
                value=None,
                passed=None,
                why=None,
                note="ViT-B not measured in this run (full mode, or --only vitb)",
            )
        )
    # 4. loader
    tgt = "data loader ≥ 3× the images/s the training step consumes"
    done = False
    for L in R.get("loader", []):
        size = "tiny" if L["image_size"] == 64 else ("vitb" if L["image_size"] == 224 else None)
        row = main_row(size) if size else None
        best = max(L["rows"], key=lambda r: r["images_per_s"])
        L["best_workers"] = best["workers"]
        if row is None:
            continue
        ratio = best["images_per_s"] / row["images_per_s"]
        L["train_images_per_s"], L["ratio"] = row["images_per_s"], ratio
        why = None
        if ratio < TARGETS["loader"]:
            per = (
                max(r["images_per_s_per_worker"] for r in L["rows"] if r["workers"] > 0)
                if any(r["workers"] > 0 for r in L["rows"])
                else best["images_per_s"]
            )
            why = (
                f"step consumes {row['images_per_s']:.1f} img/s, loader gives {best['images_per_s']:.1f} (best: {best['workers']} workers, "
                f"{per:.1f} img/s per worker) -> needs ≥ {math.ceil(3 * row['images_per_s'] / per)} workers' worth of CPU"
            )
        T.append(
            dict(
                target=tgt,
                size=f"{L['image_size']} px",
                value=ratio,
                unit="×",
                passed=ratio >= TARGETS["loader"],
                why=why,
                note=f"best of workers {','.join(str(r['workers']) for r in L['rows'])} vs maskedclip {size} step",
            )
        )
        done = True
    if not done:
        T.append(
            dict(
                target=tgt,
                size=None,
                value=None,
                passed=None,
                why=None,
                note="not measured (needs the loader and the maskedclip/full method row)",
            )
        )
    return dict(targets=T)


# ------------------------------------------------------------------------------------------------ markdown


def _f(x, nd=1, unit=""):
    if x is None:
        return "–"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return "–"
    return f"{x:,.{nd}f}{unit}"


def _ms(s):
    return _f(None if s is None else s * 1e3, 1)


def _tgt_value(t):
    v = t["value"]
    if v is None:
        return "–"
    if t["unit"] == "%":
        return f"{100 * v:.1f}%"
    if t["unit"] == "overhead":
        return f"{100 * v:+.1f}%"
    return f"{v:.2f}×"


def render_md(R: dict) -> str:
    M = R["meta"]
    L = []
    add = L.append
    add(f"# maskedclip benchmarks — {M['mode']} run, {M['finished']}")
    add("")
    add(
        f"- machine: **{M['cpu_model']}**, {M['cpus']} CPUs usable ({M['cpu_count']} logical), {M['memory_gb']} GB RAM; device **{M['device_name']}**"
    )
    add(
        f"- torch {M['torch']}, timm {M['timm']}, python {M['python']}, maskedclip commit {M['git_commit'] or '?'}; "
        f"{M['threads']} torch threads per process; precision {M['precision']}; fused AdamW: {M.get('fused_adamw')}"
    )
    add(
        f"- children: {M['child_start']}; MALLOC env {'set: ' + ', '.join(f'{k}={v}' for k, v in M['malloc_env'].items()) if M['malloc_env'] else 'not set (--no-malloc-env)'}"
    )
    la0, la1 = M.get("loadavg_start"), M.get("loadavg_end")
    busy = (la0 and la0[0] > 0.5 * M["cpus"]) or (la1 and la1[0] > 0.5 * M["cpus"])
    add(
        f"- load average at start {la0}, at end {la1}"
        + (
            " — **the machine was busy: timings are noisy, compare only variants timed together**"
            if busy
            else ""
        )
    )
    add(f"- wall time {M['wall_s'] / 60:.1f} min; command: `{M['command']}`")
    add("- sizes: " + "; ".join(f"**{k}** = {v}" for k, v in M["sizes"].items()))
    add("")
    add("## Targets (issue 8)")
    add("")
    add("| target | size | measured | result | note / why |")
    add("|---|---|---|---|---|")
    for t in R["derived"]["targets"]:
        res = "–" if t["passed"] is None else ("PASS" if t["passed"] else "MISS")
        note = "; ".join(x for x in (t.get("note"), ("why: " + t["why"]) if t.get("why") else None) if x)
        add(f"| {t['target']} | {t['size'] or '–'} | {_tgt_value(t)} | {res} | {note} |")
    add("")
    pk = R.get("peak")
    if pk:
        add("## Matmul ceilings (measured in this run, best of repeats)")
        add("")
        add("| kernel | shape (M,K,N) | GFLOP/s (best) | GFLOP/s (median) |")
        add("|---|---|---|---|")
        for k in ("mm_fp32", "linear_fp32", "mm_bf16", "linear_bf16"):
            v = pk.get(k) or {}
            add(
                f"| {k.replace('_', ' ')} | {v.get('shape', '–')} | {_f(v.get('gflops'), 0)} | {_f(v.get('median_gflops'), 0)}{' ' + v['error'] if v.get('error') else ''} |"
            )
        add("")
        add(
            f"Utilisation below is achieved FLOP/s ÷ the best fp32 ceiling ({pk.get('fp32_peak_source')}, {_f(pk.get('fp32_peak_gflops'), 0)} GFLOP/s)"
            f" for fp32 steps, ÷ the best bf16 ceiling ({pk.get('bf16_peak_source')}, {_f(pk.get('bf16_peak_gflops'), 0)} GFLOP/s) for bf16 steps; "
            f"'vs mm' uses the plain `torch.mm` ceiling of the same dtype."
        )
        add("")
    rows = R.get("methods") or []
    if rows:
        add("## Training step per method")
        add("")
        add(
            "Step = forward + backward + AdamW + teacher EMA; median of the timed steps (passes pooled); peak memory "
            + (
                "= `torch.cuda.max_memory_allocated`."
                if R["meta"]["device"] == "cuda"
                else "= RSS high-water mark above the RSS before the model was built (fresh process per variant)."
            )
        )
        add("")
        add(
            "| size | method | clip view | batch | step ms (median) | spread IQR | images/s | GFLOP/step | GFLOP/s | util. | util. vs mm | peak MB | faults/step |"
        )
        add("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            fl = r.get("flops", {}).get("total")
            add(
                f"| {r['size']} | {r['method']} | {r['clip_view'] or '–'} | {r['bp']}+{r['bu']} | {_ms(r['median_s'])} | ±{_f(r['spread_pct'] / 2 if r['spread_pct'] is not None else None, 0)}% | "
                f"{_f(r['images_per_s'], 1)} | {_f(fl / 1e9 if fl else None, 1)} | {_f(r.get('achieved_gflops'), 1)} | {_f(100 * r['utilisation'] if r.get('utilisation') is not None else None, 1, '%')} | "
                f"{_f(100 * r['utilisation_vs_mm'] if r.get('utilisation_vs_mm') is not None else None, 1, '%')} | {_f(r['peak_mem_mb'], 0)} | {r['minor_faults_per_step']:,} |"
            )
        notfin = [f"{r['size']}/{r['method']}" for r in rows if not r["loss_finite"]]
        if notfin:
            add(f"\n**non-finite loss** in: {', '.join(notfin)}")
        add("")
        add("Forward FLOPs by part (GFLOP, one step; FlopCounterMode, math SDPA):")
        add("")
        mods = []
        for r in rows:
            for k in r.get("flops", {}).get("forward_per_module", {}):
                if k not in mods:
                    mods.append(k)
        add("| size | method | clip view | " + " | ".join(mods) + " |")
        add("|---|---|---|" + "---|" * len(mods))
        for r in rows:
            fm = r.get("flops", {}).get("forward_per_module", {})
            add(
                f"| {r['size']} | {r['method']} | {r['clip_view'] or '–'} | "
                + " | ".join(_f(fm[k] / 1e9, 2) if k in fm else "–" for k in mods)
                + " |"
            )
        add("")
    if R.get("masking"):
        add("## Masking speed-up of the encoder (forward + backward of the encoder alone)")
        add("")
        add("| size | images | mask | tokens/image | ms (median) | GFLOP | GFLOP/s | speed-up | FLOP ratio |")
        add("|---|---|---|---|---|---|---|---|---|")
        for m in R["masking"]:
            for r in m["rows"]:
                add(
                    f"| {m['size']} | {m['n_images']} | {r['mask_ratio']:g} | {r['tokens']} | {_ms(r['median_s'])} | {_f(r['flops'] / 1e9, 1)} | {_f(r['achieved_gflops'], 1)} | {r['speedup_vs_first']:.2f}× | {r['flop_ratio_vs_first']:.2f}× |"
                )
        for m in R["masking"]:
            c = m["analytic_check"]
            add(
                f"\nFLOP-counter check ({m['size']}, one image, forward): counted with math SDPA {c['counted_math_sdpa'] / 1e9:.3f} GFLOP vs analytic "
                f"{c['analytic'] / 1e9:.3f} (ratio {c['ratio']:.4f}); with the default fused SDPA the counter gives {c['counted_default_backend'] / 1e9:.3f} (attention counted as 0)."
            )
        add("")
    if R.get("parts"):
        add("## Combined MaskedCLIP step vs the sum of its parts (same model and batch, alternating)")
        add("")
        add("| size | clip view | step | ms (median) | spread IQR | GFLOP |")
        add("|---|---|---|---|---|---|")
        for p in R["parts"]:
            for k in ("mae", "clip", "mfd", "combined"):
                r = p["rows"][k]
                add(
                    f"| {p['size']} | {p['clip_view']} | {k} | {_ms(r['median_s'])} | ±{_f(r['spread_pct'] / 2 if r['spread_pct'] is not None else None, 0)}% | {_f(r['flops'] / 1e9, 1)} |"
                )
            add(
                f"| {p['size']} | {p['clip_view']} | **sum of parts** | {_ms(p['parts_sum_s'])} | | {_f(p['parts_flops_sum'] / 1e9, 1)} |"
            )
            add(
                f"| {p['size']} | {p['clip_view']} | **overhead** (combined ÷ sum − 1) | {100 * p['overhead']:+.1f}% | | {100 * p['flop_overhead']:+.1f}% |"
            )
        add("")
    pairs = [
        (
            "attention",
            "Fused (SDPA) vs explicit attention (timm `Attention.fused_attn`; the BERT text tower is not switched)",
        ),
        ("precision", "bf16 autocast vs fp32"),
    ]
    for key, title in pairs:
        if not R.get(key):
            continue
        add(f"## {title}")
        add("")
        add("| size | method | batch | variant | ms (median) | spread IQR | images/s | speed-up | util. |")
        add("|---|---|---|---|---|---|---|---|---|")
        for p in R[key]:
            for k, r in p["rows"].items():
                sp = p["rows"][p["first"]]["median_s"] / r["median_s"]
                add(
                    f"| {p['size']} | {p['method']} | {p['bp']}+{p['bu']} | {k} | {_ms(r['median_s'])} | ±{_f(r['spread_pct'] / 2 if r['spread_pct'] is not None else None, 0)}% | "
                    f"{_f(p['images'] / r['median_s'], 1)} | {sp:.2f}× | {_f(100 * r['utilisation'] if r.get('utilisation') is not None else None, 1, '%')} |"
                )
        add("")
    if R.get("compile") or R["meta"].get("compile_skipped_reason"):
        add("## torch.compile (encoder, decoders and bridge, as the Trainer compiles them)")
        add("")
        if R.get("compile"):
            add("| size | method | eager ms | compiled ms | speed-up | compile time s | note |")
            add("|---|---|---|---|---|---|---|")
            for c in R["compile"]:
                if c.get("skipped"):
                    add(f"| {c['size']} | {c['method']} | – | – | – | – | skipped: {c['reason']} |")
                else:
                    add(
                        f"| {c['size']} | {c['method']} | {_ms(c['rows']['eager']['median_s'])} | {_ms(c['rows']['compiled']['median_s'])} | {c['speedup']:.2f}× | {c['compile_s']:.1f} | first compiled steps {', '.join(f'{x:.1f}' for x in c['first_compiled_steps_s'])} s |"
                    )
        else:
            add(f"Not run: {R['meta']['compile_skipped_reason']}.")
        add("")
    sc = R.get("scaling") or []
    if sc:
        add("## Scaling (maskedclip, clip view full)")
        add("")
        add(
            "Each table's points are timed alternately in one process (ViT-B image sizes: one process each). 'vs first' = "
            "images/s relative to the table's first row; for batch scaling 1.00× everywhere would mean no gain from batching."
        )
        add("")
        add(
            "| table | batch | image px | patches/image | ms (median) | spread IQR | images/s | images/s vs first | ms per image |"
        )
        add("|---|---|---|---|---|---|---|---|---|")
        for s in sc:
            base = s["rows"][0]["images_per_s"]
            for r in s["rows"]:
                add(
                    f"| {s['table']} | {r['bp']}+{r['bu']} | {r['image_size']} | {r['tokens']} | {_ms(r['median_s'])} | ±{_f(r['spread_pct'] / 2 if r['spread_pct'] is not None else None, 0)}% | "
                    f"{_f(r['images_per_s'], 1)} | {r['images_per_s'] / base:.2f}× | {_f(1e3 * r['median_s'] / r['images'], 1)} |"
                )
        add("")
    ds = R.get("dist") or []
    if ds:
        add(
            "## Processes (torch.distributed.run --standalone, gloo on CPU / nccl on CUDA; weak scaling: fixed per-process batch)"
        )
        add("")
        add(
            "| processes | threads/process | batch/process | step ms (median, slowest rank) | global images/s | weak-scaling efficiency |"
        )
        add("|---|---|---|---|---|---|")
        t1 = next((d["median_s"] for d in ds if d["nproc"] == 1), None)
        for d in ds:
            eff = t1 / d["median_s"] if t1 else None
            add(
                f"| {d['nproc']} | {d['threads_per_process']} | {d['bp']}+{d['bu']} | {_ms(d['median_s'])} | {_f(d['global_images_per_s'], 1)} | {_f(100 * eff if eff else None, 0, '%')} |"
            )
        add("")
    ld = R.get("loader") or []
    if ld:
        add(
            "## Data loader (`make_loader` on a `build_corpus` synthetic corpus; MAE train transform + tokenizer)"
        )
        add("")
        add(
            "| image px | batch | workers | images/s | images/s per worker | training step consumes (img/s) | ratio |"
        )
        add("|---|---|---|---|---|---|---|")
        for l in ld:
            for r in l["rows"]:
                tr = l.get("train_images_per_s")
                add(
                    f"| {l['image_size']} | {l['bp']}+{l['bu']} | {r['workers']} | {_f(r['images_per_s'], 1)} | {_f(r['images_per_s_per_worker'], 1)} | {_f(tr, 1)} | {_f(r['images_per_s'] / tr if tr else None, 2, '×')} |"
                )
        add("")
    if R.get("errors"):
        add("## Measurements that did not complete")
        add("")
        for e in R["errors"]:
            add(f"- **{e['name']}**: {e['error'].splitlines()[0][:300]}")
        add("")
    return "\n".join(L)


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    a = parse_args(argv)
    t_start = time.perf_counter()
    la_start = loadavg()
    env = dict(OFFLINE_ENV)
    malloc = {} if a.no_malloc_env else {k: os.environ.get(k, v) for k, v in MALLOC_ENV.items()}
    env.update(malloc)
    from tqdm.auto import tqdm

    kids = Children(env, spawn=a.spawn)
    import benchlib
    import timm
    import torch

    try:
        dev = benchlib.resolve_device(a.device)
    except ValueError as e:
        print(f"[bench] {e}", file=sys.stderr)
        return 2
    precision = benchlib.resolve_precision(a.precision, dev)
    cpus = usable_cpus()
    a.threads = a.threads or cpus
    if la_start and la_start[0] > 0.5 * cpus:
        hint = (
            f" (with {a.threads} threads per process an oversubscribed CPU can be many times slower; --threads 1 is steadier)"
            if a.threads > 1
            else ""
        )
        print(
            f"[bench] load average {la_start[0]:.1f} on {cpus} CPUs: the machine is busy, timings will be noisy{hint}",
            file=sys.stderr,
        )
    tmp = Path(tempfile.mkdtemp(prefix="maskedclip-bench-"))
    jobs = build_plan(a, dev.type, precision, tmp)
    R: dict = {
        k: []
        for k in (
            "methods",
            "masking",
            "parts",
            "attention",
            "precision",
            "compile",
            "scaling",
            "dist",
            "loader",
        )
    }
    R["peak"], R["errors"] = None, []
    raw_methods = []
    bar = tqdm(jobs, desc="benchmarks", unit="job", dynamic_ncols=True)
    try:
        for job in bar:
            bar.set_postfix_str(job.name)
            t0 = time.perf_counter()
            if job.task == "torchrun":
                ok, res = run_torchrun(a, env=env, tmp=tmp, **job.kwargs)
            else:
                ok, res = kids.run(job.task, job.kwargs, a.job_timeout)
            if not ok:
                R["errors"].append(dict(section=job.section, name=job.name, error=str(res)))
                tqdm.write(f"[bench] {job.name}: FAILED: {str(res).splitlines()[0][:200]}")
                if job.section == "compile":
                    R["compile"].append(
                        dict(
                            size=job.kwargs["size"],
                            method="maskedclip",
                            skipped=True,
                            reason=str(res).splitlines()[0][:300],
                        )
                    )
                continue
            res["job_wall_s"] = time.perf_counter() - t0
            if job.section == "peak":
                R["peak"] = res
            elif job.section == "methods":
                raw_methods.append(res)
            elif job.section == "scaling":
                res["table"] = "vitb image size" if job.name.startswith("vitb image size") else job.name
                R["scaling"].append(res)
            else:
                R[job.section].append(res)
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    R["methods"] = merge_method_passes(raw_methods)
    R["scaling"] = _merge_scaling(R["scaling"])
    fused = next((r["fused_adamw"] for r in R["methods"]), None)
    R["meta"] = dict(
        mode="quick" if a.quick else "full",
        finished=datetime.datetime.now().isoformat(timespec="seconds"),
        command=" ".join(["python", "benchmarks/run.py"] + (sys.argv[1:] if argv is None else list(argv))),
        device=dev.type,
        device_name=(torch.cuda.get_device_name(0) if dev.type == "cuda" else f"CPU ({cpu_model()})"),
        cpu_model=cpu_model(),
        cpu_flags=cpu_flags(),
        cpus=cpus,
        cpu_count=os.cpu_count(),
        memory_gb=_mem_gb(),
        torch=torch.__version__,
        timm=timm.__version__,
        python=platform.python_version(),
        git_commit=git_commit(),
        cpu_capability=_cpu_capability(torch),
        threads=a.threads,
        precision=precision,
        fused_adamw=fused,
        child_start=f"{kids.method} (pre-imported server)"
        if kids.method == "forkserver"
        else "spawn (fresh interpreter)",
        malloc_env=malloc,
        loadavg_start=la_start,
        loadavg_end=loadavg(),
        wall_s=time.perf_counter() - t_start,
        sizes={s: benchlib.SIZES[s] + f", batch {a.batch[s][0]}+{a.batch[s][1]}" for s in a.sizes},
        warmup_repeats={s: counts(a, s) for s in a.sizes},
        passes=a.passes,
        sections=a.sections,
        compile_skipped_reason=a.compile_skipped_reason,
        targets=TARGETS,
    )
    R["derived"] = derive(R, a, precision)
    md = render_md(R)
    a.out.mkdir(parents=True, exist_ok=True)
    names = ["latest"] + ([a.tag] if a.tag else [])
    for n in names:
        (a.out / f"{n}.json").write_text(json.dumps(R, indent=1, default=str) + "\n")
        (a.out / f"{n}.md").write_text(md + "\n")
    print(md)
    print(
        f"\n[bench] wrote {', '.join(str(a.out / f'{n}.{e}') for n in names for e in ('json', 'md'))} in {(time.perf_counter() - t_start) / 60:.1f} min"
    )
    return 0


def _merge_scaling(rows: list[dict]) -> list[dict]:
    "One table per scaling job; the one-point ViT-B image-size children are merged into one table."
    out: dict[str, dict] = {}
    for s in rows:
        if s["table"] in out:
            out[s["table"]]["rows"] = sorted(
                out[s["table"]]["rows"] + s["rows"], key=lambda r: r["image_size"]
            )
        else:
            out[s["table"]] = dict(s, rows=list(s["rows"]))
    return list(out.values())


def _mem_gb():
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _cpu_capability(torch):
    with contextlib.suppress(Exception):
        return torch.backends.cpu.get_cpu_capability()
    return None


if __name__ == "__main__":
    sys.exit(main())
