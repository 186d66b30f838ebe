"The training engine: DDP equals one process, exact resume, crash-safe checkpoints, non-finite stop, CLI."

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maskedclip.config import DataConfig, ExperimentConfig, TrainConfig, get_preset
from maskedclip.model import MaskedCLIP
from maskedclip.train import (
    InMemoryBatches,
    NonFiniteLossError,
    Trainer,
    checkpoint_dirs,
    config_from_args,
    find_latest,
)

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import ddp_worker  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}


def _run_worker(args, nproc=1, env=None, timeout=300):
    if nproc == 1:
        cmd = [sys.executable, str(HERE / "ddp_worker.py"), *map(str, args)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(HERE / "ddp_worker.py"),
            *map(str, args),
        ]
    return subprocess.run(cmd, capture_output=True, text=True, env={**ENV, **(env or {})}, timeout=timeout)


@pytest.mark.two_cores  # two processes / a browser: see tests/conftest.py
@pytest.mark.slow
def test_two_process_gloo_equals_one_process(tmp_path):
    r1 = _run_worker([tmp_path / "one", 3, 8])
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = _run_worker([tmp_path / "two", 3, 4], nproc=2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "final_state.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "final_state.pt", weights_only=True)
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    # the gathered label-guided loss of the first step equals the single-process loss on the whole batch
    ra, rb = (
        json.loads((tmp_path / "one" / "rows.json").read_text()),
        json.loads((tmp_path / "two" / "rows.json").read_text()),
    )
    assert ra[0]["lg_clip"] == pytest.approx(rb[0]["lg_clip"], abs=1e-5)
    assert ra[0]["mim"] == pytest.approx(rb[0]["mim"], abs=1e-5) and ra[0]["mfd"] == pytest.approx(
        rb[0]["mfd"], abs=1e-5
    )
    # and training changed the weights (the comparison is not vacuous)
    init = MaskedCLIP(get_preset("tiny")).state_dict()
    assert any(not torch.equal(init[k], a[k]) for k in a if k.startswith("encoder.blocks"))


def _trainer(out, steps, resume=None, seed_data=0):
    torch.manual_seed(0)
    cfg = ExperimentConfig(
        model=get_preset("tiny"),
        data=DataConfig(paired_batch_size=4, unpaired_batch_size=4, synthetic=True),
        train=TrainConfig(output_dir=str(out), steps=steps, lr=2e-3, warmup_steps=2, seed=11, resume=resume),
    )
    pi, texts, labels, ui = ddp_worker.global_data(12)
    return Trainer(
        cfg,
        loader=InMemoryBatches(pi, texts, labels, ui, 4, 4, tokenize=MaskedCLIP(cfg.model).tokenize, seed=5),
        progress=False,
    )


def test_resume_is_bit_exact(tmp_path):
    # 7 steps in one go (an epoch is 3 steps, so resume happens mid-epoch and crosses epoch boundaries)
    full = _trainer(tmp_path / "full", 7)
    full.fit()
    part = _trainer(tmp_path / "part", 7)
    part.fit(until=4)  # stop after 4 of the 7 steps (same schedule), as an interrupted run would
    resumed = _trainer(tmp_path / "part", 7, resume="latest")
    assert resumed.step == 4
    resumed.fit()
    sa, sb = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])][:5]
    assert any(k.startswith("teacher.") for k in sa)
    oa, ob = full.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    assert all(torch.equal(oa[i]["exp_avg_sq"], ob[i]["exp_avg_sq"]) for i in oa)
    la = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l) for l in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb] and [r["lr"] for r in la] == [
        r["lr"] for r in lb
    ]


def test_checkpoint_contents_load_weights_only(tmp_path):
    tr = _trainer(tmp_path, 2)
    tr.fit()
    ck = find_latest(tmp_path)
    assert {"config.json", "model.safetensors", "state.pt", "rng_rank0.pt", "COMPLETE"} <= {
        p.name for p in ck.iterdir()
    }
    st = torch.load(ck / "state.pt", weights_only=True)
    assert st["step"] == 2 and st["scheduler"]["total_steps"] == 2 and "state" in st["optimizer"]
    torch.load(ck / "rng_rank0.pt", weights_only=True)
    assert ExperimentConfig.from_json(ck / "config.json").train.steps == 2
    again = MaskedCLIP.from_pretrained(tmp_path / "final")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), tr.model.state_dict().values()))
    from safetensors.torch import load_file

    from maskedclip.vision import timm_vit

    timm_vit(tr.cfg.model.vision).load_state_dict(
        load_file(str(tmp_path / "encoder.safetensors")), strict=True
    )


@pytest.mark.slow
def test_kill_while_saving_leaves_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    r = _run_worker([out, 6, 4, "-", 1], env={"CRASH_AT_SAVE": "3"})
    assert r.returncode != 0  # SIGKILLed in the middle of the 3rd save
    assert [p.name for p in checkpoint_dirs(out)] == ["step_00000001", "step_00000002"]
    assert find_latest(out).name == "step_00000002"
    MaskedCLIP.from_pretrained(find_latest(out))  # loadable
    r = _run_worker([out, 6, 4, "latest", 1])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step_00000002" in r.stdout
    assert find_latest(out).name == "step_00000006"
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][-4:] == [3, 4, 5, 6]


def test_non_finite_loss_stops_with_named_part(tmp_path):
    torch.manual_seed(0)
    cfg = ExperimentConfig(
        model=get_preset("tiny"),
        data=DataConfig(paired_batch_size=2, unpaired_batch_size=2, synthetic=True),
        train=TrainConfig(output_dir=str(tmp_path), steps=5, lr=1e-3),
    )
    pi, texts, labels, ui = ddp_worker.global_data(8)
    ui[:] = float("nan")  # unpaired images only feed MIM and MFD
    tr = Trainer(
        cfg,
        loader=InMemoryBatches(
            pi, texts, labels, ui, 2, 2, tokenize=MaskedCLIP(cfg.model).tokenize, shuffle=False
        ),
        progress=False,
    )
    with pytest.raises(NonFiniteLossError, match=r"step 1: .*mim=nan") as e:
        tr.fit()
    assert "lg_clip" not in str(e.value) and find_latest(tmp_path) is not None


def test_cli_config_parsing_and_errors(tmp_path):
    cfg, progress = config_from_args(
        [
            "--preset",
            "tiny",
            "--method",
            "mae",
            "--output-dir",
            str(tmp_path),
            "--steps",
            "4",
            "--set",
            "train.base_lr=2e-4",
            "--set",
            "data.paired_batch_size=2",
            "--set",
            "model.mask_ratio=0.6",
            "--no-progress",
        ]
    )
    assert (
        cfg.model.method == "mae"
        and not cfg.model.use_clip
        and cfg.train.base_lr == 2e-4
        and cfg.model.mask_ratio == 0.6
        and not progress
    )
    with pytest.raises(ValueError, match="model.mask_ratio"):
        config_from_args(["--set", "model.mask_ratio=1.2"])
    with pytest.raises(ValueError, match="train.bogus"):
        config_from_args(["--set", "train.bogus=1"])


def test_lr_scaling_printed(tmp_path, capsys):
    cfg = ExperimentConfig(
        model=get_preset("tiny", "mae"),
        data=DataConfig(paired_batch_size=4, unpaired_batch_size=4, synthetic=True),
        train=TrainConfig(output_dir=str(tmp_path / "b"), steps=1, base_lr=1.5e-4),
    )
    pi, texts, labels, ui = ddp_worker.global_data(8)
    t2 = Trainer(cfg, loader=InMemoryBatches(pi, texts, labels, ui, 4, 4), progress=False)
    assert t2.lr == pytest.approx(1.5e-4 * 8 / 256)
    assert "base_lr=0.00015 -> lr=4.6875e-06" in capsys.readouterr().out


def test_check_images_flag_sets_the_policy():
    "`--check-images` (issue 19) is the data.check_images policy; the default reads headers only; bad values refused."
    assert config_from_args([])[0].data.check_images == "header"
    for v in ("header", "all", "none"):
        assert config_from_args(["--check-images", v])[0].data.check_images == v
    with pytest.raises(SystemExit):
        config_from_args(["--check-images", "some"])
