"`maskedclip-demo --method mlip --quick` end to end: the report shows φ, prompt heatmaps and the segmentation table."

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_quick_mlip(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "from maskedclip.demo import main; raise SystemExit(main())",
            "--out",
            str(out),
            "--quick",
            "--method",
            "mlip",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
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
