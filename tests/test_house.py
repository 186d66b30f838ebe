"""The house rules that a reader relies on: outputs kept only where they teach, within the stated budget."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kept_outputs_are_tagged_and_within_budget():
    no = _load("notebook_outputs")
    assert no.check() == []
    kept = {
        nb.name
        for nb in (ROOT / "nbs").glob("*.ipynb")
        for c in json.loads(nb.read_text())["cells"]
        if c.get("outputs")
    }
    assert kept == {
        "11f_viz_curves.ipynb",
        "10d_evaluate_tables.ipynb",
    }  # the figure and the tables the issue asks for


def test_output_check_catches_an_untagged_output(tmp_path):
    no = _load("notebook_outputs")
    (tmp_path / "nbs").mkdir()
    cell = dict(cell_type="code", id="x", metadata={}, source="1", execution_count=None)
    out = [dict(output_type="stream", name="stdout", text="1\n")]
    nb = dict(cells=[dict(cell, outputs=out)], metadata={}, nbformat=4, nbformat_minor=5)
    (tmp_path / "nbs" / "a.ipynb").write_text(json.dumps(nb))
    assert len(no.check(tmp_path)) == 1 and "no `keep_output` tag" in no.check(tmp_path)[0]
    nb["cells"][0]["metadata"] = {"tags": ["keep_output"]}
    nb["cells"][0]["outputs"] = [dict(output_type="stream", name="stdout", text="x" * (no.PER_NB + 10))]
    (tmp_path / "nbs" / "a.ipynb").write_text(json.dumps(nb))
    assert any("bytes of output" in b for b in no.check(tmp_path))


def test_house_sizes_measure_the_package():
    hs = _load("house_sizes")
    s = hs.sizes()
    assert s["largest module"].startswith("maskedclip/") and "lines" in s["longest function"]
