"Every notebook in nbs/ runs top to bottom (its assert cells are tests), through nbdev's own `test_nb`."

import importlib
import json
import sys
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


def _library_classes() -> dict[type, dict]:
    """Every class of every `maskedclip` module (all imported first), with a copy of its namespace. A notebook runs in
    this process, and its `@patch` cells add methods to the library classes it imports (09f patches
    `maskedclip.train.Trainer` with functions whose globals are the notebook's, its own `NonFiniteLossError` included),
    so each notebook's patches are undone before the next test runs."""
    for m in _modules():
        importlib.import_module(f"maskedclip.{m.removesuffix('.__init__')}".removesuffix("."))
    out = {}
    for name, mod in list(sys.modules.items()):
        if name == "maskedclip" or name.startswith("maskedclip."):
            for obj in list(vars(mod).values()):
                if isinstance(obj, type) and obj.__module__ == name:
                    out[obj] = dict(vars(obj))
    return out


def _restore_classes(saved: dict[type, dict]):
    "Put every class's namespace back as `_library_classes` saw it: added names removed, replaced ones restored."
    for cls, d in saved.items():
        for k in set(vars(cls)) - set(d):
            delattr(cls, k)
        for k, v in d.items():
            if k not in ("__dict__", "__weakref__") and vars(cls).get(k, d) is not v:
                setattr(cls, k, v)


@pytest.mark.parametrize("nb", NBS, ids=[p.stem for p in NBS])
def test_notebook(nb):
    saved = _library_classes()
    try:
        ok, seconds = run_notebook(nb, skip_flags=["notest", "slow"], showerr=True)
    finally:
        _restore_classes(saved)
    assert ok, f"{nb.name} failed (see the traceback above)"


def test_notebook_patches_are_undone():
    "A method a notebook adds to a library class, or replaces, is gone / back after the restore."
    from maskedclip.train import Trainer

    saved = _library_classes()
    fit, Trainer.fit, Trainer._added_by_a_notebook = Trainer.fit, lambda self: None, 1
    _restore_classes(saved)
    assert Trainer.fit is fit and not hasattr(Trainer, "_added_by_a_notebook")


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
