"The demo command end to end (quick settings): corpus -> pre-training -> evaluation -> report."

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "from maskedclip.demo import main; raise SystemExit(main())",
            "--out",
            str(out),
            "--quick",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
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
    r2 = subprocess.run(
        [
            sys.executable,
            "-c",
            "from maskedclip.demo import main; raise SystemExit(main())",
            "--out",
            str(out),
            "--quick",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r2.returncode == 0 and "pretrain_s" in r2.stdout
    assert "corpus_s" not in json.loads((out / "results.json").read_text())["timings"]
