"""Linear-probe features in fp32 and under bf16 autocast, side by side (issue 21, D37).

    python benchmarks/compare_eval_precision.py RUN_DIR/final CORPUS --out benchmarks/results/eval_precision

Extracts the demo's four tasks' features with `precision='fp32'` and `'bf16'` for the pre-trained encoder and for
random init (seeds 0 1 2), fits the same probes (10 % and 100 % of the labels), and writes
`OUT.json` (every run, both precisions, timings) and `OUT.md` (how many bf16 AUROCs fall inside the fp32 run's
bootstrap CI, and the time each precision took)."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("encoder", help="a pre-trained run's final/ folder (or anything load_encoder takes)")
    ap.add_argument("corpus", help="the corpus root with tasks/")
    ap.add_argument("--out", default="benchmarks/results/eval_precision", help="output path without suffix")
    ap.add_argument("--workers", type=int, default=1, help="evaluation processes (timings are per precision)")
    a = ap.parse_args(argv)
    from maskedclip.demo import DEMO_TASKS
    from maskedclip.evaluate import evaluate_all

    res, secs = {}, {}
    for prec in ("fp32", "bf16"):
        t0 = time.time()
        df = evaluate_all(
            {"random init": "random", "pretrained": a.encoder},
            tasks=DEMO_TASKS,
            fractions=(0.1, 1.0),
            seeds=(0, 1, 2),
            corpus_root=a.corpus,
            n_boot=500,
            progress=False,
            log=None,
            workers=a.workers,
            precision=prec,
        )
        secs[prec] = round(time.time() - t0, 1)
        res[prec] = df[["method", "task", "fraction", "seed", "auroc", "ci_low", "ci_high"]].to_dict(
            "records"
        )
    rows, inside = [], 0
    for f, b in zip(res["fp32"], res["bf16"]):
        assert (f["method"], f["task"], f["fraction"], f["seed"]) == (
            b["method"],
            b["task"],
            b["fraction"],
            b["seed"],
        )
        ok = f["ci_low"] <= b["auroc"] <= f["ci_high"]
        inside += ok
        rows.append((f, b, ok))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(
        command=f"python benchmarks/compare_eval_precision.py {a.encoder} {a.corpus} --out {a.out} --workers {a.workers}",
        seconds=secs,
        load_average=os.getloadavg(),
        inside=inside,
        n=len(rows),
        max_abs_diff=max(abs(f["auroc"] - b["auroc"]) for f, b, _ in rows),
    )
    out.with_suffix(".json").write_text(
        json.dumps(dict(meta, fp32=res["fp32"], bf16=res["bf16"]), indent=1) + "\n"
    )
    lines = [
        "# Linear-probe features: fp32 and bf16 autocast",
        "",
        f"`{meta['command']}` — evaluation time fp32 {secs['fp32']} s, bf16 {secs['bf16']} s "
        f"(load average at the end {', '.join(f'{x:.1f}' for x in meta['load_average'])}).",
        "",
        f"bf16 AUROC inside the fp32 run's bootstrap 95% CI: **{inside} of {len(rows)}**; largest |difference| "
        f"{meta['max_abs_diff']:.4f}.",
        "",
        "| encoder | task | fraction | seed | fp32 [95% CI] | bf16 | bf16 − fp32 | inside |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f, b, ok in rows:
        lines.append(
            f"| {f['method']} | {f['task']} | {f['fraction']} | {f['seed']} | {f['auroc']:.3f} [{f['ci_low']:.3f}, "
            f"{f['ci_high']:.3f}] | {b['auroc']:.3f} | {b['auroc'] - f['auroc']:+.4f} | {'yes' if ok else 'no'} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:6]))


if __name__ == "__main__":
    main()
