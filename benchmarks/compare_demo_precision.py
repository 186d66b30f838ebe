"""Does the demo learn the same in bf16 as in fp32? Side by side from two `maskedclip-demo` runs (issue 21, D27).

    nice -n 10 maskedclip-demo --precision fp32 --out runs/demo-fp32
    nice -n 10 maskedclip-demo --precision bf16 --out runs/demo-bf16
    python benchmarks/compare_demo_precision.py runs/demo-fp32 runs/demo-bf16

Reads each run's `results.json` and `pretrain/metrics.jsonl`; writes `--out`.json and `--out`.md (default
`benchmarks/results/demo_precision`): the loss parts averaged over windows of steps, and every downstream number
(linear probe per task, label fraction and seed; zero-shot per task) with its bootstrap 95% CI, and whether the
bf16 number lies inside the fp32 run's CI and the two CIs overlap.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _load(run: Path) -> tuple[dict, list[dict]]:
    res = run / "results.json"
    met = run / "pretrain" / "metrics.jsonl"
    for p in (res, met):
        if not p.is_file():
            raise SystemExit(
                f"compare_demo_precision: {p} does not exist; run maskedclip-demo --out {run} first"
            )
    rows = [json.loads(l) for l in met.read_text().splitlines() if l.strip()]
    return json.loads(res.read_text()), rows


def loss_windows(rows: list[dict], width: int = 100) -> list[dict]:
    "Mean of every loss part over consecutive windows of `width` steps."
    keys = [k for k in rows[0] if k == "loss" or k in ("mim", "mfd", "lg_clip", "mcl", "ot", "sup")]
    out = []
    for lo in range(0, max(r["step"] for r in rows), width):
        w = [r for r in rows if lo < r["step"] <= lo + width]
        if w:
            out.append(
                dict(steps=f"{lo + 1}-{lo + width}", **{k: sum(r[k] for r in w) / len(w) for k in keys})
            )
    return out


def compare(a: dict, b: dict, key: tuple) -> dict:
    inside = a["ci_low"] <= b["auroc"] <= a["ci_high"]
    overlap = a["ci_low"] <= b["ci_high"] and b["ci_low"] <= a["ci_high"]
    return dict(
        zip(("task", "fraction", "seed"), key),
        fp32=a["auroc"],
        fp32_ci=[a["ci_low"], a["ci_high"]],
        bf16=b["auroc"],
        bf16_ci=[b["ci_low"], b["ci_high"]],
        diff=b["auroc"] - a["auroc"],
        bf16_inside_fp32_ci=inside,
        cis_overlap=overlap,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fp32", type=Path)
    ap.add_argument("bf16", type=Path)
    ap.add_argument("--out", default="benchmarks/results/demo_precision")
    ap.add_argument("--method", default="maskedclip")
    ap.add_argument(
        "--note", default="", help="a line for the markdown (e.g. the load average during the runs)"
    )
    a = ap.parse_args(argv)
    (ra, ma), (rb, mb) = _load(a.fp32), _load(a.bf16)
    probe = {}
    for tag, res in (("fp32", ra), ("bf16", rb)):
        for r in res["linear_probe_runs"]:
            if r["method"] == a.method and r.get("test_set", "test") == "test":
                probe.setdefault((r["task"], r["fraction"], r["seed"]), {})[tag] = r
    lp = [compare(v["fp32"], v["bf16"], k) for k, v in sorted(probe.items()) if len(v) == 2]
    zs = []
    za = {r["task"]: r for r in ra["zero_shot"]}
    for r in rb["zero_shot"]:
        if r["task"] in za:
            zs.append(compare(za[r["task"]], r, (r["task"], 0.0, 0)))
    wa, wb = loss_windows(ma), loss_windows(mb)
    R = dict(
        runs=dict(fp32=str(a.fp32), bf16=str(a.bf16)),
        timings=dict(fp32=ra.get("timings"), bf16=rb.get("timings")),
        precision=dict(fp32=ra.get("precision"), bf16=rb.get("precision")),
        final_loss=dict(fp32=wa[-1], bf16=wb[-1]),
        loss_windows=dict(fp32=wa, bf16=wb),
        linear_probe=lp,
        zero_shot=zs,
        linear_probe_inside=f"{sum(r['bf16_inside_fp32_ci'] for r in lp)}/{len(lp)}",
        linear_probe_overlap=f"{sum(r['cis_overlap'] for r in lp)}/{len(lp)}",
        zero_shot_inside=f"{sum(r['bf16_inside_fp32_ci'] for r in zs)}/{len(zs)}",
        note=a.note,
    )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(R, indent=1) + "\n")
    L = [
        "# The demo in fp32 and in bf16",
        "",
        f"`maskedclip-demo --precision fp32 --out {a.fp32}` and `--precision bf16 --out {a.bf16}` (the demo's recipe: "
        "500 steps of 32 + 32 images, lr 1e-3; same seeds), compared by `benchmarks/compare_demo_precision.py`. "
        + a.note,
        "",
        "| | fp32 | bf16 |",
        "|---|---|---|",
    ]
    for k in ("corpus_s", "pretrain_s", "evaluate_s", "report_s", "total_s"):
        f = lambda t: f"{t[k]:.0f} s" if t and k in t else "–"
        L.append(f"| {k} | {f(ra.get('timings'))} | {f(rb.get('timings'))} |")
    L += ["", "Loss (mean over each window of steps):", ""]
    keys = [k for k in wa[0] if k != "steps"]
    L += [
        "| steps | " + " | ".join(f"{k} fp32 | {k} bf16" for k in keys) + " |",
        "|---|" + "---|---|" * len(keys),
    ]
    for x, y in zip(wa, wb):
        L.append(f"| {x['steps']} | " + " | ".join(f"{x[k]:.4f} | {y[k]:.4f}" for k in keys) + " |")
    L += [
        "",
        f"Linear probe (AUROC, test split, every task × label fraction × seed): the bf16 number lies inside the fp32 "
        f"run's bootstrap 95% CI in {R['linear_probe_inside']}; the CIs overlap in {R['linear_probe_overlap']}.",
        "",
        "| task | fraction | seed | fp32 [95% CI] | bf16 [95% CI] | bf16 − fp32 | inside |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in lp:
        L.append(
            f"| {r['task']} | {r['fraction']} | {r['seed']} | {r['fp32']:.3f} [{r['fp32_ci'][0]:.3f}, {r['fp32_ci'][1]:.3f}] "
            f"| {r['bf16']:.3f} [{r['bf16_ci'][0]:.3f}, {r['bf16_ci'][1]:.3f}] | {r['diff']:+.3f} | "
            f"{'yes' if r['bf16_inside_fp32_ci'] else 'no'} |"
        )
    L += ["", f"Zero-shot (AUROC): bf16 inside the fp32 CI in {R['zero_shot_inside']}.", ""]
    L += ["| task | fp32 [95% CI] | bf16 [95% CI] | bf16 − fp32 |", "|---|---|---|---|"]
    for r in zs:
        L.append(
            f"| {r['task']} | {r['fp32']:.3f} [{r['fp32_ci'][0]:.3f}, {r['fp32_ci'][1]:.3f}] | {r['bf16']:.3f} "
            f"[{r['bf16_ci'][0]:.3f}, {r['bf16_ci'][1]:.3f}] | {r['diff']:+.3f} |"
        )
    out.with_suffix(".md").write_text("\n".join(L) + "\n")
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    sys.exit(main())
