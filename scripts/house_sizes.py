"""Sizes of the house (issue 15): largest module, largest export cell, longest function, mean export cell.

python scripts/house_sizes.py            # a markdown table row per measure, from the working tree
"""

import ast
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPORT = re.compile(r"^\s*#\|\s*export", re.M)


def sizes(root: Path = ROOT) -> dict:
    mods = {
        p: p.read_text().count("\n") for p in (root / "maskedclip").rglob("*.py") if p.name != "_modidx.py"
    }
    big_mod = max(mods, key=mods.get)
    cells = []
    for nb in sorted((root / "nbs").glob("*.ipynb")):
        for c in json.loads(nb.read_text())["cells"]:
            src = "".join(c["source"])
            if c["cell_type"] == "code" and EXPORT.match(src):
                cells.append((len(src.splitlines()), nb.name))
    funs = []
    for p in mods:
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funs.append((n.end_lineno - n.lineno + 1, f"{p.relative_to(root)}:{n.name}"))
    long_lines = sum(len(l) > 110 for p in mods for l in p.read_text().splitlines())
    return {
        "largest module": f"{big_mod.relative_to(root)} ({mods[big_mod]} lines)",
        "largest export cell": "{0} lines ({1})".format(*max(cells)),
        "export cells over 60 lines": f"{sum(n > 60 for n, _ in cells)} of {len(cells)}",
        "mean export cell": f"{sum(n for n, _ in cells) / len(cells):.1f} lines",
        "longest function": "{0} lines ({1})".format(*max(funs)),
        "package lines over 110 characters": str(long_lines),
    }


if __name__ == "__main__":
    for k, v in sizes().items():
        print(f"| {k} | {v} |")
