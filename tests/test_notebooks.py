"Every notebook in nbs/ runs top to bottom (its assert cells are tests), through nbdev's own `test_nb`."

import json
from pathlib import Path

import pytest
from nbdev.test import test_nb as run_notebook  # alias: pytest must not collect nbdev's function itself

ROOT = Path(__file__).parent.parent
NBS = sorted((ROOT / "nbs").glob("[0-9]*.ipynb"))


def _modules() -> list[str]:
    "Every generated module as `#| default_exp` names it: `config`, `data.records`, `data.__init__` (sub-package inits)."
    out = []
    for p in sorted((ROOT / "maskedclip").rglob("*.py")):
        parts = p.relative_to(ROOT / "maskedclip").with_suffix("").parts
        if parts == ("__init__",) or (parts[-1].startswith("_") and parts[-1] != "__init__"):
            continue
        out.append(".".join(parts))
    return out


@pytest.mark.parametrize("nb", NBS, ids=[p.stem for p in NBS])
def test_notebook(nb):
    ok, seconds = run_notebook(nb, skip_flags=["notest", "slow"], showerr=True)
    assert ok, f"{nb.name} failed (see the traceback above)"


def test_every_module_has_a_notebook():
    mods = set(_modules())
    assert {"config", "data.records", "data.__init__"} <= mods
    exported = set()
    for nb in NBS:
        for cell in json.loads(nb.read_text())["cells"]:
            for line in "".join(cell["source"]).splitlines():
                if line.startswith("#| default_exp"):
                    exported.add(line.split()[-1])
    assert mods <= exported, f"modules without a source notebook: {sorted(mods - exported)}"


def test_module_docstrings_are_whole_sentences():
    "nbdev turns a notebook's `> description` into the module docstring and keeps only its first line: one line, one sentence."
    import importlib

    for nb in NBS:
        head = "".join(json.loads(nb.read_text())["cells"][0]["source"]).splitlines()
        desc = [l for l in head if l.startswith("> ")]
        assert len(desc) == 1, (
            f"{nb.name}: the `> description` must be one line (nbdev keeps only the first), got {len(desc)}"
        )
    for mod in _modules():
        mod = mod.removesuffix(".__init__")
        doc = (importlib.import_module(f"maskedclip.{mod}").__doc__ or "").strip()
        assert doc.endswith((".", ".)")), (
            f"maskedclip.{mod}: module docstring is not a whole sentence: ...{doc[-60:]!r}"
        )
