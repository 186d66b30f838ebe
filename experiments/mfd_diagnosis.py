"""The masked-feature-distillation collapse, diagnosed from a reproduction's pre-training runs (issue 16, D25, D26).

Reads `<out>/pretrain/<run>/metrics.jsonl` of the MaskedCLIP runs with each distillation target (and the bridge run
without distillation) and writes `mfd_diagnosis.md` / `.json`: for each run the `diag/*` numbers at the first and
the last diagnostics step, and the distillation loss over the last 50 steps.

    python experiments/mfd_diagnosis.py runs/reproduce-v2 --out experiments/results/reproduce-v2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from maskedclip.train import read_metrics

RUNS = {
    "maskedclip": "teacher (paper: EMA(B∘E_I))",
    "maskedclip_teacher_ln": "teacher_ln (LayerNorm per patch)",
    "maskedclip_teacher_in": "teacher_in (instance norm per image)",
    "maskedclip_encoder": "encoder (EMA(E_I))",
    "mae_clip_bridge": "no MFD (MAE + CLIP + bridge)",
}
KEYS = (
    "encoder_patch_cos",
    "encoder_erank",
    "bridge_patch_cos",
    "bridge_erank",
    "teacher_patch_cos",
    "teacher_erank",
    "mfd_target_patch_cos",
    "mfd_target_var",
    "align",
    "uniform_image",
)


def diagnose(run_dir: Path) -> dict:
    "First and last `diag/*` rows and the mean L_mfd of the last 50 logged steps of one run."
    rows = read_metrics(run_dir)
    diag = [r for r in rows if "diag/encoder_patch_cos" in r]
    if not diag:
        raise ValueError(
            f"{run_dir}: no diag/* rows in metrics.jsonl (a run from before D26, or train.diag_every=0)"
        )
    tail = [r["mfd"] for r in rows[-50:] if "mfd" in r]
    return dict(
        first_step=diag[0]["step"],
        last_step=diag[-1]["step"],
        first={k: diag[0].get(f"diag/{k}") for k in KEYS},
        last={k: diag[-1].get(f"diag/{k}") for k in KEYS},
        mfd_last50=sum(tail) / len(tail) if tail else None,
        trajectory={
            k: [(r["step"], r.get(f"diag/{k}")) for r in diag]
            for k in ("teacher_patch_cos", "mfd_target_patch_cos")
        },
    )


def _f(v, d=3):
    return "–" if v is None else f"{v:.{d}f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reproduction", help="the reproduction's out_dir (holds pretrain/<run>/metrics.jsonl)")
    p.add_argument(
        "--out", default=None, help="where to write mfd_diagnosis.md/.json (default: the reproduction folder)"
    )
    a = p.parse_args(argv)
    root = Path(a.reproduction)
    found = {
        name: diagnose(root / "pretrain" / name)
        for name in RUNS
        if (root / "pretrain" / name / "metrics.jsonl").is_file()
    }
    if not found:
        print(f"mfd_diagnosis: no run of {list(RUNS)} under {root / 'pretrain'}", file=sys.stderr)
        return 2
    out = Path(a.out) if a.out else root
    out.mkdir(parents=True, exist_ok=True)
    (out / "mfd_diagnosis.json").write_text(json.dumps(found, indent=1) + "\n")
    head = (
        "| distillation target | step | encoder cos | encoder e-rank | bridge cos | bridge e-rank | teacher cos | teacher e-rank "
        "| target cos | target var | L_mfd (last 50) |"
    )
    lines = [head, "|" + "---|" * 11]
    for name, d in found.items():
        for when in ("first", "last"):
            v = d[when]
            lines.append(
                f"| {RUNS[name] if when == 'first' else ''} | {d[when + '_step']} | {_f(v['encoder_patch_cos'])} | "
                f"{_f(v['encoder_erank'], 1)} | {_f(v['bridge_patch_cos'])} | {_f(v['bridge_erank'], 1)} | {_f(v['teacher_patch_cos'])} | "
                f"{_f(v['teacher_erank'], 1)} | {_f(v['mfd_target_patch_cos'])} | {_f(v['mfd_target_var'])} | "
                f"{_f(d['mfd_last50']) if when == 'last' else ''} |"
            )
    text = (
        "MFD collapse diagnostics (`diag/*` on 32 fixed paired images; cos = mean within-image patch-token cosine, e-rank = "
        "entropy effective rank of one image's patch tokens, target = what L_mfd regresses after `mfd_target`'s normalisation, "
        "var = its within-image variance share)\n\n" + "\n".join(lines) + "\n"
    )
    (out / "mfd_diagnosis.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
