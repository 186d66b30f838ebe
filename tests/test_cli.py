"""The console scripts behave like their neighbours (issue 22, CLI part): help for every option, choices, --version,
--print-config, one clear line for a malformed option, and `main()` that returns its exit code in-process."""

import argparse
import contextlib
import io
import subprocess
import sys

import pytest

from maskedclip import __version__
from maskedclip.config import PRESETS, ExitCode, ExperimentConfig


def _call(fn, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = fn(argv)
    return code, out.getvalue(), err.getvalue()


def _parsers():
    from maskedclip.evaluate import build_parser
    from maskedclip.train import pretrain_parser

    return {"maskedclip-pretrain": pretrain_parser(), "maskedclip-eval": build_parser()}


@pytest.mark.parametrize("prog", ["maskedclip-pretrain", "maskedclip-eval"])
def test_every_option_has_help(prog):
    ap = _parsers()[prog]
    missing = [
        a.option_strings
        for a in ap._actions
        if a.option_strings and not (a.help and a.help != argparse.SUPPRESS)
    ]
    assert not missing, missing
    text = ap.format_help()
    for opt in ("--version", "--output-dir" if prog == "maskedclip-pretrain" else "--out"):
        assert opt in text


def test_grid_and_demo_help_and_version():
    from maskedclip.demo import main as demo_main
    from maskedclip.train import grid_main

    for fn, prog, opts in (
        (grid_main, "maskedclip-grid", ("--notebook", "--out", "--grid", "--set")),
        (demo_main, "maskedclip-demo", ("--out", "--preset", "--method", "--steps", "--quick")),
    ):
        code, out, _ = _call(fn, ["--help"])
        assert code == 0 and all(o in out for o in opts)
        lines = out.split("options:")[1].splitlines()
        for o in opts:  # each option's line (or the next one) carries a description
            i = next(i for i, l in enumerate(lines) if l.strip().startswith(o))
            assert len(lines[i].split()) > 2 or (
                i + 1 < len(lines) and not lines[i + 1].strip().startswith("-")
            ), (prog, o, lines[i])
        code, out, _ = _call(fn, ["--version"])
        assert code == 0 and out.strip() == f"{prog} {__version__}"


def test_pretrain_version_choices_and_print_config(tmp_path):
    from maskedclip.train import main

    code, out, _ = _call(main, ["--version"])
    assert code == 0 and out.strip() == f"maskedclip-pretrain {__version__}"
    for opt, bad in (("--preset", "huge"), ("--method", "bert")):
        code, _, err = _call(main, [opt, bad])
        assert code == 2 and f"argument {opt}: invalid choice: '{bad}'" in err and "choose from" in err, err
    code, out, err = _call(
        main,
        [
            "--preset",
            "tiny",
            "--method",
            "mae",
            "--steps",
            "7",
            "--output-dir",
            str(tmp_path / "r"),
            "--print-config",
            "--set",
            "train.base_lr=2e-4",
        ],
    )
    assert code == 0, err
    cfg = ExperimentConfig.from_json(out)
    assert (
        cfg.model.method == "mae"
        and cfg.train.steps == 7
        and cfg.train.base_lr == 2e-4
        and not (tmp_path / "r").exists()
    )
    assert set(PRESETS) <= set(_parsers()["maskedclip-pretrain"]._option_string_actions["--preset"].choices)


def test_malformed_options_one_clear_line(tmp_path):
    from maskedclip.train import grid_main, main

    for fn, argv, fragment in (
        (main, ["--set", "x"], "--set 'x': expected SECTION.FIELD=VALUE"),
        (main, ["--set", "=3"], "expected SECTION.FIELD=VALUE"),
        (main, ["--set", "train.nope.deeper=1"], "is not a config section"),
        (
            grid_main,
            ["--out", str(tmp_path), "--grid", '{"seed": [0]}', "--set", "x"],
            "--set 'x': expected PARAM=VALUE",
        ),
        (grid_main, ["--out", str(tmp_path), "--grid", "{seed: 0"], "--grid: not valid JSON"),
        (
            grid_main,
            ["--out", str(tmp_path), "--grid", '{"seed": 0}'],
            "--grid: expected an object of non-empty lists",
        ),
        (
            grid_main,
            ["--out", str(tmp_path), "--grid", '{"seed": [0]}', "--notebook", str(tmp_path / "no.ipynb")],
            "--notebook: ",
        ),
        (grid_main, ["--grid", "{}"], "the following arguments are required: --out"),
    ):
        code, out, err = _call(fn, argv)
        assert code == ExitCode.CONFIG, (argv, code, err)
        assert (
            fragment in err
            and "Traceback" not in err
            and len([l for l in err.splitlines() if "error" in l]) == 1
        ), (argv, err)


def test_eval_cli_errors():
    from maskedclip.evaluate import main

    for argv, fragment, want in (
        (
            ["--checkpoint", "a=random", "--corpus", "c", "--out", "o", "--fractions", "abc"],
            "--fractions: 'abc' is not a number",
            2,
        ),
        (
            ["--checkpoint", "a=random", "--corpus", "c", "--out", "o", "--seeds", "x"],
            "--seeds: 'x' is not an integer",
            2,
        ),
        (
            ["--checkpoint", "a=/nonexistent/x", "--corpus", "c", "--out", "o"],
            "--checkpoint a=/nonexistent/x: not found",
            2,
        ),
        (
            ["--checkpoint", "a=random", "--corpus", "c", "--out", "o", "--protocol", "knn"],
            "invalid choice: 'knn'",
            2,
        ),
    ):
        code, out, err = _call(main, argv)
        assert code == want and fragment in err and "Traceback" not in err, (argv, err)


def test_eval_pickle_renamed_safetensors(tmp_path):
    import torch

    from maskedclip.evaluate import main

    evil = tmp_path / "encoder.safetensors"
    torch.save({"w": torch.zeros(1)}, evil)
    code, _, err = _call(
        main, ["--checkpoint", f"e={evil}", "--corpus", str(tmp_path), "--out", str(tmp_path / "o")]
    )
    assert code == ExitCode.DATA and "not a valid safetensors file" in err and "Traceback" not in err, err


def test_main_in_process_returns_an_int_and_the_interpreter_survives(tmp_path):
    "`main([...])` returns; only `console_main` (the installed script, `python -m`) leaves with os._exit."
    code = subprocess.run(
        [
            sys.executable,
            "-c",
            "from maskedclip.train import main\n"
            "c = main(['--set', 'train.steps=2.5'])\nprint('still here', type(c).__name__, c)",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert code.returncode == 0 and "still here int 2" in code.stdout, code.stderr[-2000:]
    r = subprocess.run(
        [sys.executable, "-m", "maskedclip.train", "--set", "train.steps=2.5"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        r.returncode == 2
        and r.stderr.strip().splitlines()[-1]
        == "maskedclip-pretrain: error: train.steps: expected an integer or null, got 2.5"
    )


def test_launch_refuses_a_directory_in_use(tmp_path):
    "`launch` (the notebook launcher) checks the run lock before it overwrites the live run's config.json."
    from maskedclip.config import RunEnvironmentError
    from maskedclip.train import RunLock, experiment_config, launch

    run = tmp_path / "run"
    run.mkdir()
    cfg = experiment_config("tiny", "mae", steps=2, output_dir=str(run))
    with RunLock(run):
        with pytest.raises(RunEnvironmentError, match="in use by another run"):
            launch(cfg, progress=False)
    assert not (run / "config.json").exists()
