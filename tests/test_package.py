"The package as users get it: build the wheel, install it outside the source tree, import and build a model."

import os
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_wheel_installs_and_builds_tiny_model(tmp_path):
    dist = tmp_path / "dist"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    wheels = list(dist.glob("maskedclip-*.whl"))
    assert len(wheels) == 1
    # a fresh environment whose only extra path is this environment's site-packages (for torch etc.):
    # a plain line in a .pth file adds the directory without running its editable-install hooks
    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    site = Path(
        subprocess.check_output(
            [
                str(env_dir / "bin" / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            ],
            text=True,
        ).strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheels[0])],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    code = textwrap.dedent("""
        import maskedclip, pathlib, torch
        from maskedclip.config import get_preset
        from maskedclip.model import MaskedCLIP
        here = pathlib.Path(maskedclip.__file__).resolve()
        assert 'site-packages' in str(here) and not (here.parent.parent / 'nbs').exists(), here
        m = MaskedCLIP(get_preset('tiny'))
        print('OK', maskedclip.__version__, sum(p.numel() for p in m.parameters()))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    r = subprocess.run(
        [str(env_dir / "bin" / "python"), "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stdout + r.stderr[-3000:]
    # the wheel carries no notebooks, and the console scripts are declared
    import zipfile

    names = zipfile.ZipFile(wheels[0]).namelist()
    assert not any(n.endswith(".ipynb") for n in names)
    ep = next(n for n in names if n.endswith("entry_points.txt"))
    assert "maskedclip-demo" in zipfile.ZipFile(wheels[0]).read(ep).decode()
