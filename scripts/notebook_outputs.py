"""Outputs kept in the notebooks: only cells tagged `keep_output`, within a size budget.

A notebook is read without running it, so a few outputs that teach (the training-curves figure in `11f_viz_curves`,
the printed tables in `10d_evaluate_tables`) are kept; every other output is cleared.

    python scripts/notebook_outputs.py            # re-run the notebooks that have tagged cells and keep those outputs
    python scripts/notebook_outputs.py --check    # no run: fail if an untagged cell has output or a budget is exceeded

Budget: at most 64 KB of kept output per notebook and 160 KB in all (plotly figures as
`application/vnd.plotly.v1+json`, text as `text/plain`); no images, no HTML bundles.
"""

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TAG = "keep_output"
PER_NB, TOTAL = 64_000, 160_000
ALLOWED = {"application/vnd.plotly.v1+json", "text/plain"}


def _tagged(c) -> bool:
    return TAG in c.get("metadata", {}).get("tags", [])


def _size(outputs) -> int:
    return len(json.dumps(outputs, separators=(",", ":")))


def check(root: Path = ROOT) -> list[str]:
    "Problems found (empty = within the rules)."
    bad, total = [], 0
    for nb in sorted((root / "nbs").glob("*.ipynb")):
        n = 0
        for c in json.loads(nb.read_text())["cells"]:
            outs = c.get("outputs", [])
            if outs and not _tagged(c):
                bad.append(f"{nb.name}: cell {c.get('id')} has output but no `{TAG}` tag")
            for o in outs:
                extra = set(o.get("data", {})) - ALLOWED
                if extra:
                    bad.append(
                        f"{nb.name}: cell {c.get('id')} keeps {sorted(extra)} (allowed: {sorted(ALLOWED)})"
                    )
            n += _size(outs)
        if n > PER_NB:
            bad.append(f"{nb.name}: {n} bytes of output > {PER_NB}")
        total += n
    if total > TOTAL:
        bad.append(f"all notebooks: {total} bytes of output > {TOTAL}")
    return bad


def refresh(nb_path: Path):
    "Run the notebook (execnb, like nbdev_test) and keep the outputs of its tagged cells only."
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell

    os.environ.setdefault("PLOTLY_RENDERER", "plotly_mimetype")
    nb = read_nb(nb_path)
    cwd = os.getcwd()
    os.chdir(nb_path.parent)
    try:
        CaptureShell().run_all(nb)
    finally:
        os.chdir(cwd)
    for c in nb.cells:
        if c.cell_type != "code":
            continue
        if _tagged(c):
            keep = []
            for o in c.get("outputs", []):
                o = dict(o)
                o.pop("execution_count", None)
                if "data" in o:
                    o["data"] = {k: v for k, v in o["data"].items() if k in ALLOWED}
                    o["metadata"] = {}
                    if not o["data"]:
                        continue
                keep.append(o)
            c["outputs"] = keep
        else:
            c["outputs"] = []
        c["execution_count"] = None
    write_nb(nb, nb_path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check the rules; run nothing")
    a = ap.parse_args(argv)
    if not a.check:
        for nb in sorted((ROOT / "nbs").glob("*.ipynb")):
            if any(_tagged(c) for c in json.loads(nb.read_text())["cells"]):
                print(f"running {nb.name}", flush=True)
                refresh(nb)
    bad = check()
    for b in bad:
        print(b, file=sys.stderr)
    if not bad:
        print("notebook outputs: only tagged cells, within budget")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
