"""The paper's claims, checked against a reproduction's `results.csv` (issue 16).

For each claim "A beats B" and each (protocol, label fraction, test set, task) the script reports both means over
seeds, the difference, and a verdict by a fixed rule chosen before looking at the numbers:

- **holds (separated)**: every seed's 95 % bootstrap CI of A lies above every seed's CI of B;
- **holds (within CIs)**: A's mean is higher, but some CIs overlap;
- **does not hold**: A's mean is not higher.

    python experiments/claims.py experiments/results/reproduce-v2/results.csv --out experiments/results/reproduce-v2/claims.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

CLAIMS = [  # (A, B, what the paper says)
    ("maskedclip", "random", "Table 1: MaskedCLIP beats random init"),
    ("maskedclip", "supervised", "Table 1: MaskedCLIP beats the supervised reference"),
    ("maskedclip", "mae", "Table 1: MaskedCLIP beats MAE"),
    ("maskedclip", "clip", "Table 1: MaskedCLIP beats CLIP"),
    ("mae", "random", "Table 1: MAE pre-training beats random init"),
    ("clip", "random", "Table 1: CLIP pre-training beats random init"),
    ("mae_clip", "clip", "Table 2: adding MIM to CLIP helps (MAE + CLIP > CLIP)"),
    ("mae_clip_bridge", "mae_clip", "Table 2: the bridge helps (+ bridge > MAE + CLIP)"),
    ("maskedclip", "mae_clip_bridge", "Table 2: masked feature distillation helps (MaskedCLIP > + bridge)"),
    ("maskedclip_teacher_in", "maskedclip", "D25: the instance-normalised MFD target beats the paper's"),
]


def verdict(a: pd.DataFrame, b: pd.DataFrame) -> str:
    if a["auroc"].mean() <= b["auroc"].mean():
        return "does not hold"
    return "holds (separated)" if a["ci_low"].min() > b["ci_high"].max() else "holds (within CIs)"


def check(df: pd.DataFrame) -> pd.DataFrame:
    rows = []
    keys = ["protocol", "fraction", "test_set", "task"]
    for (proto, frac, ts, task), d in df.groupby(keys, sort=False):
        for a, b, what in CLAIMS:
            da, db = d[d["method"] == a], d[d["method"] == b]
            if da.empty or db.empty:
                continue
            rows.append(
                dict(
                    claim=what,
                    protocol=proto,
                    fraction=frac,
                    test_set=ts,
                    task=task,
                    a=a,
                    b=b,
                    mean_a=da["auroc"].mean(),
                    mean_b=db["auroc"].mean(),
                    diff=da["auroc"].mean() - db["auroc"].mean(),
                    ci_a=f"[{da['ci_low'].min():.3f}, {da['ci_high'].max():.3f}]",
                    ci_b=f"[{db['ci_low'].min():.3f}, {db['ci_high'].max():.3f}]",
                    seeds=len(da),
                    verdict=verdict(da, db),
                )
            )
    return pd.DataFrame(rows)


def tally(c: pd.DataFrame) -> pd.DataFrame:
    "Per claim and protocol: in how many (fraction, test set, task) cells it holds, and how many of those are separated."
    g = c.groupby(["claim", "protocol"], sort=False)["verdict"]
    return pd.DataFrame(
        {
            "cells": g.size(),
            "holds": g.apply(lambda v: int(v.str.startswith("holds").sum())),
            "separated": g.apply(lambda v: int((v == "holds (separated)").sum())),
        }
    ).reset_index()


def markdown(df: pd.DataFrame) -> str:
    "A pipe table (no extra dependency)."
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r] for r in df.itertuples(index=False)]
    return "\n".join(
        ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
        + ["| " + " | ".join(r) + " |" for r in cells]
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="results.csv of experiments/reproduce.ipynb")
    p.add_argument("--out", default=None, help="write the tables as Markdown here")
    a = p.parse_args(argv)
    df = pd.read_csv(a.results)
    if "test_set" not in df.columns:
        df["test_set"] = "test"
    c = check(df)
    if c.empty:
        print(
            f"claims: no pair of methods of {sorted({x for t in CLAIMS for x in t[:2]})} in {a.results}",
            file=sys.stderr,
        )
        return 2
    t = tally(c)
    fmt = c.assign(fraction=(100 * c["fraction"]).round(0).astype(int).astype(str) + " %")
    text = (
        "Claims of the paper against this reproduction: 'separated' = every seed's 95 % bootstrap CI of A above every seed's "
        "CI of B; 'within CIs' = higher mean, overlapping CIs.\n\n## Tally (cells where the claim holds, of all cells)\n\n"
        + markdown(t)
        + "\n\n## Every cell\n\n"
        + markdown(fmt)
        + "\n"
    )
    if a.out:
        Path(a.out).write_text(text)
    print(markdown(t))
    return 0


if __name__ == "__main__":
    sys.exit(main())
