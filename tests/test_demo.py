"""The demo command end to end (quick settings): corpus -> pre-training -> evaluation -> report, for the default
method (MaskedCLIP) and for `--method mlip` (whose report adds φ, prompt heatmaps and the segmentation table)."""

import json
import subprocess
import sys

import pytest


def _quick_demo(out, *args) -> subprocess.CompletedProcess:
    "`maskedclip-demo --out OUT --quick ARGS` in a fresh interpreter (what `make demo` runs, at smoke size)."
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from maskedclip.demo import main; raise SystemExit(main())",
            "--out",
            str(out),
            "--quick",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    r = _quick_demo(out)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"report: {(out / 'report.html').resolve()}" in r.stdout
    s = json.loads((out / "results.json").read_text())
    assert {row["method"] for row in s["linear_probe"]} == {"random init", "maskedclip"}
    assert {row["task"] for row in s["zero_shot"]} == {"glaucoma", "dr_referral"}
    page = (out / "report.html").read_text()
    assert (
        "linear probe (mean over seeds)" in page and "prompt heatmaps" in page and "reconstructions" in page
    )
    assert (out / "pretrain" / "final" / "model.safetensors").is_file()
    # a second run reuses the corpus and the trained model
    r2 = _quick_demo(out)
    assert r2.returncode == 0 and "pretrain_s" in r2.stdout
    assert "corpus_s" not in json.loads((out / "results.json").read_text())["timings"]
    assert json.loads((out / "results.json").read_text())["corpus_prior"] == {
        "extended_signs": True
    }  # v3 (D42)
    # the folder's corpus is version 3: asking for version 2 is one clear error, before any pre-training
    r3 = _quick_demo(out, "--corpus-prior", "extended_signs=false")
    assert r3.returncode == 4 and "corpus.json: rendered with another finding prior" in r3.stderr, r3.stderr[
        -2000:
    ]
    assert str(out / "corpus" / "corpus.json") in r3.stderr


@pytest.mark.slow
def test_demo_quick_mlip(tmp_path):
    out = tmp_path / "demo"
    r = _quick_demo(out, "--method", "mlip")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    page = (out / "report.html").read_text()
    # the three MLIP sections: φ (the map and its evolution), prompt heatmaps on a few images, the segmentation table
    assert "semantic-integrity weights φ" in page and "φ over training" in page
    assert page.count("prompt heatmaps (MLIP patch_proj), test image") >= 2
    assert "few-shot red-lesion segmentation (frozen patch features, Dice)" in page
    s = json.loads((out / "results.json").read_text())
    seg = s["mlip_segmentation"]
    assert {row["method"] for row in seg} == {"random init", "mlip"}
    assert sorted({row["fraction"] for row in seg}) == [0.01, 0.1, 1.0]
    for row in seg:
        lo, hi = json.loads(row["dice_pooled_ci"])
        assert 0 <= lo <= row["dice_pooled"] <= hi <= 1
