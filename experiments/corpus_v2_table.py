"""Before/after table of two `mae_corpus_study.py` results (markdown to stdout).

python experiments/corpus_v2_table.py experiments/results/corpus-v2/before.json experiments/results/corpus-v2/after.json

Two more arguments name the columns (default: corpus-v2's before / after), e.g. for corpus v3 (D40):
python experiments/corpus_v2_table.py experiments/results/corpus-v2/after.json experiments/results/corpus-v3/v3.json \
    "corpus v2 (after)" "corpus v3: extended_signs=true"
"""

import json
import sys


def main(argv=None):
    paths = argv or sys.argv[1:]
    if len(paths) not in (2, 4):
        raise SystemExit(__doc__)
    b, a = (json.load(open(p)) for p in paths[:2])
    cols = paths[2:] or [
        "before (corpus v1, no crops/flips, 1024 unpaired)",
        "after (corpus v2, crops 0.2-1, flips 0.5, 8192 unpaired)",
    ]
    out = [
        f"| | {cols[0]} | {cols[1]} |",
        "|---|---|---|",
    ]
    names = dict(
        unseen="MIM loss, 512 unseen renders of the same generator",
        unseen_zoom5="MIM loss, the same renders zoomed 5 %",
        pretraining_images="MIM loss, 512 pre-training images",
        random_init_unseen="MIM loss of a random-init model, unseen renders",
    )
    for k, n in names.items():
        out.append(f"| {n} | {b['mim_loss'][k]:.4f} | {a['mim_loss'][k]:.4f} |")

    def cell(r):
        v = "separated" if r["separated"] else "not separated"
        return (
            f"MAE {r['method_auroc']:.3f} vs random {r['baseline_auroc']:.3f} (MAE CI low {r['method_ci_low']:.3f}, "
            f"random CI high {r['baseline_ci_high']:.3f}: {v})"
        )

    for rb, ra in zip(b["linear_probe_margins"], a["linear_probe_margins"]):
        assert rb["task"] == ra["task"]
        out.append(f"| linear probe AUROC at 10 % labels, {rb['task']} | {cell(rb)} | {cell(ra)} |")
    for key, lab in (("finetune_margins", "fine-tune"),):
        if key in b and key in a:
            for rb, ra in zip(b[key], a[key]):
                out.append(f"| {lab} AUROC at 10 % labels, {rb['task']} | {cell(rb)} | {cell(ra)} |")
    n_sep = sum(r["separated"] and r["method_auroc"] > r["baseline_auroc"] for r in a["linear_probe_margins"])
    out.append("")
    out.append(
        f"After: MAE beats random init with separated CIs on {n_sep} of {len(a['linear_probe_margins'])} tasks (linear probe, 10 % labels)."
    )
    print("\n".join(out))


if __name__ == "__main__":
    main()
