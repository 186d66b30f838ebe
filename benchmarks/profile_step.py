"""Where the time of one training step goes: `torch.profiler` on the ViT-B MaskedCLIP step and the MAE-only step.

    python benchmarks/profile_step.py                      # ViT-B/16 at 224 px, fp32 and bf16, 1 thread
    python benchmarks/profile_step.py --size tiny --quick  # a 20-second smoke run

For each (method, precision) it builds the benchmark harness's training step (`benchlib.TrainStep`: forward +
backward + fused AdamW + zero_grad + clamp log τ + teacher EMA, batch on the device), runs `--warmup` steps,
times `--steps` steps without the profiler (the median is the step time), then profiles one more step and
counts the FLOPs of forward + backward (`benchlib.count_flops`, math SDPA backend). Every profiled operator's
self time goes to one op class (matmul, attention, norm, GELU, optimizer, EMA update, gather/scatter of masked
tokens, loss ops, copies/casts, other element-wise); the text tower's and the loss functions' forward time come
from ranges around them (backward ops run outside those ranges, so these two are forward-only). FLOPs
utilisation = FLOPs / step time / the matmul peak of the same precision measured in the same run
(`benchlib.task_peak`). Writes `--out`.json and `--out`.md (default `benchmarks/results/profile_cpu`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import maskedclip.model as mc_model  # noqa: E402

# operator name -> op class, first match wins (self time of leaf operators; autograd wrappers have ~0 self time)
OP_CLASSES = [
    ("optimizer", r"adam|zero_"),
    ("EMA update", r"_foreach_"),
    ("matmul", r"(^|::)(mm|addmm|bmm|baddbmm|matmul|linear|_linear|addmv|mv)\b|mkldnn|onednn|conv"),
    (
        "attention",
        r"scaled_dot_product|flash_attention|efficient_attention|(^|::)_?softmax\b|_softmax_backward",
    ),
    ("norm", r"layer_norm|group_norm|batch_norm|rms_norm"),
    ("GELU", r"gelu"),
    (
        "gather/scatter (masked tokens)",
        r"gather|scatter|index|take_along|(^|::)(sort|argsort|masked_select|nonzero)\b",
    ),
    ("loss ops", r"log_softmax|nll_loss|cross_entropy|mse_loss|cosine|_log_softmax"),
    ("copies/casts", r"copy_|_to_copy|(^|::)to\b|clone|contiguous|(^|::)(cat|stack)\b"),
    ("other element-wise", r".*"),
]
LOSS_FNS = ("mim_loss", "masked_feature_distillation_loss", "label_guided_clip_loss", "normalize_targets")


def op_class(name: str) -> str:
    for cls, pat in OP_CLASSES:
        if re.search(pat, name):
            return cls
    return "other element-wise"


@contextlib.contextmanager
def labelled_ranges(model):
    "Profiler ranges around the loss functions (wrapped in `maskedclip.model`) and the text tower's forward."
    saved = {n: getattr(mc_model, n) for n in LOSS_FNS if hasattr(mc_model, n)}

    def wrap(fn):
        def inner(*a, **k):
            with record_function("range::loss"):
                return fn(*a, **k)

        return inner

    for n, fn in saved.items():
        setattr(mc_model, n, wrap(fn))
    hooks, stack = [], []
    mods = {"text tower": model.text, "teacher (EMA) forward": model.teacher}
    for label, m in mods.items():
        if m is None:
            continue

        def pre(mod, args, label=label):
            r = record_function(f"range::{label}")
            r.__enter__()
            stack.append(r)

        def post(mod, args, out):
            stack.pop().__exit__(None, None, None)

        hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(mc_model, n, fn)
        for h in hooks:
            h.remove()


def model_config(size: str, method: str):
    "`benchlib.model_config`, plus 'demo': the `maskedclip-demo` model (tiny image side at 64 px, MiniLM text tower)."
    if size == "demo":
        from maskedclip.config import get_preset

        return get_preset("demo", method)
    return benchlib.model_config(size, method)


def profile_one(size, method, precision, bp, bu, warmup, steps, threads, sdpa="auto") -> dict:
    cfg = model_config(size, method)
    ts = benchlib.TrainStep(cfg, bp, bu, "cpu", precision)
    ts.trainer_attention = sdpa == "auto"  # 'default': torch's own SDPA under autocast (before D27)
    for _ in range(warmup):
        ts.step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        ts.step()
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)

    def phased_step():
        with record_function("phase::forward+backward"):
            ts.forward_backward()
        with record_function("phase::optimizer"):
            ts.opt.step()
            ts.opt.zero_grad(set_to_none=True)
            ts.model.clamp_logit_scale()
        with record_function("phase::EMA update"):
            ts.model.update_teacher()

    with labelled_ranges(ts.model), profile(activities=[ProfilerActivity.CPU]) as prof:
        phased_step()
    events = prof.key_averages()
    classes, ranges, top = {}, {}, []
    for e in events:
        name = e.key
        if name.startswith(("range::", "phase::")):
            ranges[name.split("::", 1)[1]] = ranges.get(name.split("::", 1)[1], 0.0) + e.cpu_time_total / 1e6
            continue
        s = e.self_cpu_time_total / 1e6
        if s <= 0:
            continue
        c = op_class(name)
        classes[c] = classes.get(c, 0.0) + s
        top.append((s, name, c))
    total = sum(classes.values())
    flops = benchlib.count_flops(ts.forward_backward, ts.opt)["total"]
    top.sort(reverse=True)
    return dict(
        size=size,
        method=method,
        precision=precision,
        sdpa=sdpa,
        batch=f"{bp}+{bu}",
        threads=threads,
        step_s=step_s,
        step_s_all=times,
        images_per_s=(bp + bu) / step_s,
        profiled_self_s=total,
        classes_s=dict(sorted(classes.items(), key=lambda kv: -kv[1])),
        classes_share={k: v / total for k, v in classes.items()},
        ranges_s=ranges,
        top_ops=[dict(op=n, cls=c, self_s=s) for s, n, c in top[:15]],
        flops=flops,
        gflops_per_s=flops / step_s / 1e9,
        loss_finite=ts.loss_finite(),
    )


def label(r: dict) -> str:
    return r["precision"] + (
        ", torch's bf16 SDPA" if r.get("sdpa") == "default" and r["precision"] != "fp32" else ""
    )


def render_md(R: dict) -> str:
    pk = R["peak"]
    L = [
        "# Profile of one training step (CPU)",
        "",
        f"`{R['command']}` — {R['cpu']}, {R['threads']} thread(s), torch {R['torch']}, load average at start "
        f"{R['loadavg_start']} / end {R['loadavg_end']}; {R['wall_s']:.0f} s.",
        "",
        f"Matmul peak measured in this run: fp32 {pk['fp32_peak_gflops']:.1f} GFLOP/s ({pk['fp32_peak_source']}), "
        f"bf16 {pk['bf16_peak_gflops'] or 0:.1f} GFLOP/s ({pk['bf16_peak_source']}).",
        "",
        "| method | precision | batch | step (s) | images/s | GFLOP/step | GFLOP/s | utilisation vs same-precision peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in R["runs"]:
        L.append(
            f"| {r['method']} | {label(r)} | {r['batch']} | {r['step_s']:.2f} | {r['images_per_s']:.2f} | "
            f"{r['flops'] / 1e9:.1f} | {r['gflops_per_s']:.1f} | {100 * r['utilisation']:.0f}% |"
        )
    classes = [c for c, _ in OP_CLASSES]
    L += [
        "",
        "Share of the profiled step's operator self time per op class (text tower and loss: forward ranges, "
        "seconds):",
        "",
        "| op class | " + " | ".join(f"{r['method']} {label(r)}" for r in R["runs"]) + " |",
        "|---|" + "---|" * len(R["runs"]),
    ]
    for c in classes:
        L.append(
            f"| {c} | "
            + " | ".join(
                f"{100 * r['classes_share'].get(c, 0):.1f}% ({r['classes_s'].get(c, 0):.2f} s)"
                for r in R["runs"]
            )
            + " |"
        )
    for k in ("text tower", "loss", "teacher (EMA) forward", "EMA update", "optimizer"):
        L.append(
            f"| range: {k} | "
            + " | ".join(f"{r['ranges_s'].get(k, 0):.3f} s" if k in r["ranges_s"] else "–" for r in R["runs"])
            + " |"
        )
    L += ["", "Top operators by self time:", ""]
    for r in R["runs"]:
        L.append(
            f"- {r['method']} {label(r)}: "
            + ", ".join(f"`{t['op']}` {t['self_s']:.2f} s" for t in r["top_ops"][:6])
        )
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="vitb", choices=[*benchlib.SIZES, "demo"])
    ap.add_argument("--methods", default="maskedclip,mae")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--maskedclip-batch", default="2+2", help="paired+unpaired images of the MaskedCLIP step")
    ap.add_argument("--mae-batch", default="0+8", help="paired+unpaired images of the MAE step")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2, help="timed steps (median), before the profiled one")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--sdpa",
        default="auto,default",
        help="attention backends to compare: auto (the trainer's choice, D27) and/or default (torch's choice)",
    )
    ap.add_argument("--quick", action="store_true", help="smaller peak measurement")
    ap.add_argument("--out", default="benchmarks/results/profile_cpu")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0, load0 = time.time(), os.getloadavg()
    peak = benchlib.task_peak("cpu", a.quick, a.threads)
    runs = []
    for method in a.methods.split(","):
        bp, bu = map(int, (a.maskedclip_batch if method != "mae" else a.mae_batch).split("+"))
        for prec, sdpa in [(p, s) for p in a.precisions.split(",") for s in a.sdpa.split(",")]:
            if prec == "fp32" and sdpa == "default" and "auto" in a.sdpa:
                continue  # the same thing: the trainer changes the backend only under bf16
            print(f"[profile] {a.size} {method} {prec} (sdpa {sdpa}) batch {bp}+{bu} ...", flush=True)
            r = profile_one(a.size, method, prec, bp, bu, a.warmup, a.steps, a.threads, sdpa)
            p = peak["bf16_peak_gflops"] if prec == "bf16" else peak["fp32_peak_gflops"]
            r["utilisation"] = r["gflops_per_s"] / p if p else None
            print(
                f"[profile]   step {r['step_s']:.2f} s, {r['gflops_per_s']:.1f} GFLOP/s "
                f"({100 * (r['utilisation'] or 0):.0f}% of the {prec} peak)",
                flush=True,
            )
            runs.append(r)
    R = dict(
        command="python benchmarks/profile_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        cpu=platform.processor() or platform.machine(),
        torch=torch.__version__,
        threads=a.threads,
        loadavg_start=[round(x, 2) for x in load0],
        loadavg_end=[round(x, 2) for x in os.getloadavg()],
        wall_s=time.time() - t0,
        peak=peak,
        runs=runs,
    )
    try:
        R["cpu"] = next(
            l.split(":", 1)[1].strip()
            for l in Path("/proc/cpuinfo").read_text().splitlines()
            if l.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(R, indent=1) + "\n")
    out.with_suffix(".md").write_text(render_md(R))
    print(render_md(R))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
