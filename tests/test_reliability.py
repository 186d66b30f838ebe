"""Reliability suite (issue 17): kill-and-resume campaign, every bad input -> one clear line and its exit code, a full
disk, a read-only directory, two runs on one directory. The figures are printed at the end of the pytest run
(conftest.py's terminal summary) and by each test (`-rA` / `-s`).

Runs start from a forkserver that imported maskedclip once, so each child costs milliseconds to start; everything
uses the tiny preset on a 16+16-image synthetic corpus with 2+2 images per step."""

import contextlib
import io
import json
import multiprocessing as mp
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import reliability_child  # noqa: E402

from maskedclip.config import ExitCode  # noqa: E402
from maskedclip.train import RunLock, checkpoint_dirs, find_latest, main  # noqa: E402

pytestmark = pytest.mark.timeout(600)


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from maskedclip.synthetic import build_corpus

    root = tmp_path_factory.mktemp("corpus") / "c"
    build_corpus(root, n_paired=16, n_unpaired=16, n_task_per_split=2, size=64, seed=0, progress=False)
    return root


@pytest.fixture(scope="module")
def ctx():
    "A forkserver whose server process imported maskedclip (and nothing ran torch ops in it: safe to fork)."
    env = {
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    c = mp.get_context("forkserver")
    c.set_forkserver_preload(["reliability_child", "maskedclip.train", "safetensors.torch"])
    p = c.Process(target=reliability_child.run_cli, args=(["--version"], os.devnull))  # starts the server now
    p.start()
    p.join(120)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    yield c
    from multiprocessing import forkserver  # stop the server (and reap it) so it does not outlive the tests

    with contextlib.suppress(Exception):
        forkserver._forkserver._stop()


def base_args(corpus, out, steps, *extra):
    return [
        "--preset",
        "tiny",
        "--output-dir",
        str(out),
        "--steps",
        str(steps),
        "--no-progress",
        "--set",
        "data.synthetic=true",
        "--set",
        f"data.synthetic_dir={corpus}",
        "--set",
        "data.paired_batch_size=2",
        "--set",
        "data.unpaired_batch_size=2",
        "--set",
        "train.lr=1e-3",
        "--set",
        "train.warmup_steps=1",
        *extra,
    ]


def start(ctx, argv, log, plan=None, fsize=None):
    p = ctx.Process(target=reliability_child.run_cli, args=(argv, str(log), plan, fsize))
    p.start()
    return p


def run_in_process(argv) -> tuple[int, str]:
    "`main(argv)` in this interpreter: its exit code and everything it said (stdout, stderr, warnings)."
    out, err = io.StringIO(), io.StringIO()
    with (
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        warnings.catch_warnings(record=True) as ws,
    ):
        warnings.simplefilter("always")
        code = main(argv)
    return code, out.getvalue() + err.getvalue() + "".join(f"warning: {w.message}\n" for w in ws)


def load_checkpoint_ok(ck: Path) -> bool:
    "A complete checkpoint loads (safetensors + weights-only pickles) and holds only finite tensors."
    from safetensors.torch import load_file

    try:
        sd = load_file(str(ck / "model.safetensors"))
        torch.load(ck / "state.pt", weights_only=True)
        torch.load(ck / "rng_rank0.pt", weights_only=True)
        return all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    except Exception:
        return False


def metric_steps(run: Path) -> list[int]:
    return [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]


# ------------------------------------------------------------------------------------------------ kill and resume
def test_kill_and_resume_campaign(ctx, corpus, tmp_path, figures):
    steps = 10
    argv = lambda out: base_args(
        corpus, out, steps, "--set", "train.save_every=1", "--set", "train.keep_last=2", "--resume", "latest"
    )
    ref = start(ctx, argv(tmp_path / "ref"), tmp_path / "ref.log")
    ref.join(300)
    assert ref.exitcode == 0, (tmp_path / "ref.log").read_text()[-3000:]
    run, log = tmp_path / "run", tmp_path / "run.log"
    rng = random.Random(17)
    # injected kills in the middle of a write (an old checkpoint half-deleted, safetensors / torch.save half-written,
    # before COMPLETE or `latest`),
    # each advancing the run by at most two steps, so all of them land before the 10 steps are done; then random-time
    # kills (timed from the moment the child holds the run lock); then, once the run has finished, one kill while
    # final/ is written. The n of a plan counts calls inside that one child process.
    plans = [
        ("rmtree", 4),
        ("save_file", 2),
        ("torch.save", 3),
        ("atomic", 3),
        ("atomic", 2),
        ("torch.save", 2),
        ("save_file", 3),
        None,
        None,
        None,
        None,
        "finish",
        ("save_file", 2),
    ]
    kills = mid_write = survived = corrupt = 0
    took_over = cleaned = 0
    for plan in plans:
        before = log.read_text() if log.exists() else ""
        p = start(ctx, argv(run), log, plan=None if plan in (None, "finish") else plan)
        if plan is None:
            for _ in range(
                600
            ):  # wait until this child holds the lock (it has started), then kill it at a random moment
                if not p.is_alive() or (
                    (run / RunLock.NAME).is_file() and f'"pid": {p.pid}' in (run / RunLock.NAME).read_text()
                ):
                    break
                time.sleep(0.05)
            p.join(rng.uniform(0.2, 2.0))
            if p.is_alive():
                p.kill()
        p.join(300)
        if p.exitcode == 0:
            continue  # finished before the kill came
        assert p.exitcode == -9, log.read_text()[len(before) :][-3000:]
        kills += 1
        mid_write += plan is not None
        said = log.read_text()[len(before) :]
        took_over += "took over the stale lock" in said
        cleaned += "leftover(s) of an interrupted run" in said
        latest = find_latest(run)
        ok = latest is None or load_checkpoint_ok(latest)
        corrupt += sum(not load_checkpoint_ok(c) for c in checkpoint_dirs(run))
        survived += ok
    last = start(ctx, argv(run), log)
    last.join(300)
    assert last.exitcode == 0, log.read_text()[-3000:]
    from safetensors.torch import load_file

    a, b = (
        load_file(str(tmp_path / "ref" / "final" / "model.safetensors")),
        load_file(str(run / "final" / "model.safetensors")),
    )
    identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    got = metric_steps(run)
    duplicated = len(got) - len(set(got))
    leftovers = [
        p.name
        for p in list(run.iterdir()) + list((run / "checkpoints").iterdir())
        if ".tmp" in p.name or p.name == ".lock"
    ]
    figures["kills survived"] = (
        f"{survived}/{kills} ({mid_write} in the middle of a write; final weights bit-identical: {identical})"
    )
    figures["duplicated metrics rows"] = duplicated
    figures["corrupt checkpoints"] = corrupt
    print(
        f"\ncampaign: {kills} SIGKILLs ({mid_write} mid-write), {survived} resumed from a loadable checkpoint, "
        f"stale locks taken over {took_over}, leftovers cleaned {cleaned}, corrupt checkpoints {corrupt}, "
        f"duplicated rows {duplicated}, bit-identical {identical}"
    )
    assert mid_write == 8 and kills >= 8 and survived == kills and corrupt == 0
    assert identical, [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert got == list(range(1, steps + 1)), got
    assert took_over >= 1 and cleaned >= 1 and leftovers == []


# ------------------------------------------------------------------------------------------------ bad inputs
def _bad_png(path: Path, size: int = 64):
    "A PNG whose chunk CRCs are right (it passes the load-time check) but whose compressed pixels are garbage."
    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(0).rand(size, size, 3) * 255).astype("uint8")).save(buf, "PNG")
    b = bytearray(buf.getvalue())
    i = b.index(b"IDAT")
    n = struct.unpack(">I", b[i - 4 : i])[0]
    data = bytearray(b[i + 4 : i + 4 + n])
    data[len(data) // 2 :] = b"\0" * (len(data) - len(data) // 2)
    b[i + 4 : i + 4 + n] = data
    b[i + 4 + n : i + 8 + n] = struct.pack(">I", zlib.crc32(b"IDAT" + bytes(data)) & 0xFFFFFFFF)
    path.write_bytes(bytes(b))


def _manifest(corpus: Path, path: Path, n_good: int, extra: list[dict]) -> Path:
    rows = [json.loads(l) for l in (corpus / "pretrain" / "paired.jsonl").read_text().splitlines()][:n_good]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + extra))
    return path


@pytest.fixture(scope="module")
def bad_inputs(corpus, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (corpus / "bad").mkdir(exist_ok=True)
    _bad_png(corpus / "bad" / "late.png")
    Image.new("RGB", (1, 1), (120, 30, 20)).save(corpus / "bad" / "one.png")
    (corpus / "bad" / "trunc.png").write_bytes((corpus / "bad" / "late.png").read_bytes()[:200])
    late = _manifest(
        corpus,
        d / "late.jsonl",
        3,
        [dict(id="late", image="bad/late.png", text="a fundus photograph", label="normal")],
    )
    tiny = _manifest(
        corpus,
        d / "tiny.jsonl",
        3,
        [dict(id="one", image="bad/one.png", text="a fundus photograph", label="normal")],
    )
    unknown = _manifest(
        corpus,
        d / "label.jsonl",
        3,
        [
            dict(
                id="typo",
                image=json.loads((corpus / "pretrain" / "paired.jsonl").read_text().splitlines()[5])["image"],
                text="a fundus photograph",
                label="glaucomaa",
            )
        ],
    )
    trunc = _manifest(
        corpus, d / "trunc.jsonl", 3, [dict(id="trunc", image="bad/trunc.png", text="x", label="normal")]
    )
    malformed = d / "malformed.jsonl"
    malformed.write_text(late.read_text().splitlines()[0] + "\n{not json\n")
    evil = d / "evil.safetensors"
    torch.save({"w": torch.zeros(2)}, evil)
    badjson = d / "bad.json"
    badjson.write_text('{"train": {"steps": 3,}')
    good_ck = d / "ck"  # a finished tiny run whose checkpoint gets a pickle in place of its safetensors
    return dict(
        dir=d,
        late=late,
        tiny=tiny,
        unknown=unknown,
        trunc=trunc,
        malformed=malformed,
        evil=evil,
        badjson=badjson,
        ck=good_ck,
    )


def _cases(corpus, b):
    data = lambda m, *x: [
        "--set",
        f"data.paired={m}",
        "--set",
        "data.unpaired=null",
        "--set",
        "data.unpaired_batch_size=0",
        "--set",
        f"data.root={corpus}",
        "--set",
        "data.synthetic=false",
        *x,
    ]
    labels = '["normal", "glaucoma", "diabetic retinopathy", "cataract", "age-related macular degeneration"]'
    C, D, E, N, OK = ExitCode.CONFIG, ExitCode.DATA, ExitCode.ENVIRONMENT, ExitCode.NON_FINITE, ExitCode.OK
    return [
        # (name, extra argv, expected fragment, exit code, steps); new in issue 17 first, then the ones handled before
        ("non-finite total loss", ["--set", "model.lambda_mim=1e39"], "total (weighted sum)=inf", N, 2),
        (
            "train.steps=2.5",
            ["--set", "train.steps=2.5"],
            "train.steps: expected an integer or null, got 2.5",
            C,
            None,
        ),
        ("non-int seed", ["--set", 'train.seed="abc"'], "train.seed: expected an integer, got 'abc'", C, 2),
        ("unknown device name", ["--set", "train.device=gpu"], "train.device: 'gpu' is not a device", C, 2),
        (
            "missing GPU",
            ["--set", "train.device=cuda:99"],
            "train.device: cuda:99 is not available on this machine",
            E,
            2,
        ),
        (
            "--resume missing path",
            ["--resume", str(b["dir"] / "nope")],
            "does not exist; give 'latest' or a checkpoint directory",
            C,
            2,
        ),
        ("--config missing", ["--config", str(b["dir"] / "nope.json")], "--config: ", C, 2),
        ("--config bad JSON", ["--config", str(b["badjson"])], "not valid JSON (line 1", C, 2),
        (
            "pickle renamed .safetensors (init_weights)",
            ["--set", f"model.vision.init_weights={b['evil']}"],
            "is not a valid safetensors file",
            D,
            2,
        ),
        (
            "pickle renamed .safetensors (resume)",
            ["--resume", str(b["ck"] / "checkpoints" / "step_00000001")],
            "is not a readable safetensors file",
            D,
            2,
        ),
        ("late decode failure, raise", data(b["late"]), f"{b['late']}:4", D, 4),
        (
            "late decode failure, skip",
            data(b["late"], "--set", "data.on_bad_record=skip"),
            f"failed to decode (data.on_bad_record=skip): {b['late']}:4",
            OK,
            4,
        ),
        (
            "unknown label with a label space",
            data(b["unknown"], "--set", f"data.label_space={labels}"),
            "label 'glaucomaa' is not in the label space",
            D,
            2,
        ),
        (
            "unknown label without a label space",
            data(b["unknown"]),
            "pin it with --set data.label_space",
            OK,
            1,
        ),
        ("1x1 image", data(b["tiny"]), "is 1x1", OK, 1),
        ("--set without =", ["--set", "train.steps"], "expected SECTION.FIELD=VALUE", C, 2),
        ("--preset unknown", ["--preset", "huge"], "invalid choice: 'huge'", C, 2),
        ("--method unknown", ["--method", "bert"], "invalid choice: 'bert'", C, 2),
        (
            "unknown label space name",
            data(b["unknown"], "--set", "data.label_space=imagenet"),
            "data.label_space: 'imagenet'",
            C,
            2,
        ),
        # already handled before issue 17
        ("unknown field", ["--set", "train.bogus=1"], "train.bogus: unknown field", C, 2),
        ("out-of-range value", ["--set", "model.mask_ratio=1.2"], "mask_ratio", C, 2),
        ("bad on_bad_record", ["--set", "data.on_bad_record=maybe"], "data.on_bad_record", C, 2),
        (
            "missing manifest",
            ["--set", f"data.paired={b['dir'] / 'none.jsonl'}", "--set", "data.synthetic=false"],
            "does not exist",
            D,
            2,
        ),
        ("malformed manifest line", data(b["malformed"]), f"{b['malformed']}:2", D, 2),
        ("truncated image at load", data(b["trunc"]), "trunc.png", D, 2),
        ("--steps not an int", ["--steps", "abc"], "invalid int value", C, None),
        (
            "fp16 on CPU",
            ["--set", "train.precision=fp16", "--set", "train.device=cpu"],
            "fp16 needs CUDA",
            C,
            2,
        ),
    ]


def test_bad_inputs_table(corpus, bad_inputs, tmp_path, figures):
    b = bad_inputs
    code, said = run_in_process(
        base_args(corpus, b["ck"], 1)
    )  # a real checkpoint, then a pickle in place of its weights
    assert code == 0, said
    torch.save({"w": torch.zeros(2)}, b["ck"] / "checkpoints" / "step_00000001" / "model.safetensors")
    results = []
    for i, (name, extra, fragment, want, steps) in enumerate(_cases(corpus, b)):
        out = tmp_path / f"case{i}"
        argv = base_args(corpus, out, steps or 2, *extra)
        code, said = run_in_process(argv)
        clear = fragment in said and code == want and "Traceback" not in said
        if want != ExitCode.OK:  # exactly one error line, naming the input
            clear = (
                clear
                and sum(
                    l.startswith(("maskedclip-pretrain: error:", "usage:", "maskedclip-pretrain: internal"))
                    for l in said.splitlines()
                )
                <= 2
            )
        results.append((name, clear, code, want, said if not clear else ""))
        if name == "non-finite total loss":  # nothing non-finite saved; metrics.jsonl strict JSON
            assert all(load_checkpoint_ok(c) for c in checkpoint_dirs(out)) and find_latest(out) is not None
            if (out / "metrics.jsonl").exists():
                for l in (out / "metrics.jsonl").read_text().splitlines():
                    json.loads(l, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
        if name == "late decode failure, raise":
            assert find_latest(out) is not None, said
        if name == "late decode failure, skip":
            assert (
                json.loads((out / "metrics.jsonl").read_text().splitlines()[-1]).get("skipped_records", 0)
                >= 1
            )
        if name == "train.steps=2.5":
            assert not (out / "final").exists()
    n_clear = sum(r[1] for r in results)
    figures["bad inputs with a clear message"] = f"{n_clear}/{len(results)}"
    print(f"\nbad inputs: {n_clear}/{len(results)} with one clear line and the expected exit code")
    for name, clear, code, want, said in results:
        print(f"  {'ok ' if clear else 'BAD'} exit {code} (want {int(want)})  {name}")
    assert n_clear == len(results), "\n\n".join(
        f"{n}: exit {c}, want {int(w)}\n{s[-1500:]}" for n, ok, c, w, s in results if not ok
    )


# ------------------------------------------------------------------------------------------------ disk, permissions, locks
def _mount(*args) -> bool:
    return (
        os.geteuid() == 0
        and shutil.which("mount") is not None
        and subprocess.run(["mount", *args], capture_output=True).returncode == 0
    )


@contextlib.contextmanager
def read_only_dir(tmp_path):
    "A directory this process cannot write: a read-only bind mount as root (root ignores permission bits), else mode 555."
    src, dst = tmp_path / "ro_src", tmp_path / "ro"
    src.mkdir()
    dst.mkdir()
    if os.geteuid() == 0:
        if not (_mount("--bind", str(src), str(dst)) and _mount("-o", "remount,bind,ro", str(dst))):
            subprocess.run(["umount", str(dst)], capture_output=True)
            pytest.skip(
                "running as root without mount(8) rights: no way to make a directory read-only for this process"
            )
        try:
            yield dst
        finally:
            subprocess.run(["umount", str(dst)], capture_output=True)
    else:
        dst.chmod(0o555)
        try:
            yield dst
        finally:
            dst.chmod(0o755)


def test_read_only_output_dir(corpus, tmp_path, figures):
    with read_only_dir(tmp_path) as ro:
        with pytest.raises(OSError):
            (ro / "probe").write_text("x")  # really read-only for this process
        t0 = time.perf_counter()
        code, said = run_in_process(base_args(corpus, ro / "run", 2))
        dt = time.perf_counter() - t0
    assert code == ExitCode.ENVIRONMENT, said
    assert (
        "train.output_dir:" in said
        and ("not writable" in said or "cannot create" in said)
        and "Traceback" not in said
    ), said
    assert "method=" not in said and dt < 20, (dt, said)  # stopped before the model or the data were built
    figures.setdefault("environment checks", []).append("read-only dir: exit 5 before the model build")


def test_full_disk_before_start_and_during_save(ctx, corpus, tmp_path, figures):
    # 1. a file-size limit (RLIMIT_FSIZE, works as root): the first checkpoint cannot be written
    out, log = tmp_path / "fsize", tmp_path / "fsize.log"
    p = start(ctx, base_args(corpus, out, 2), log, fsize=2 << 20)
    p.join(300)
    said = log.read_text()
    assert p.exitcode == ExitCode.ENVIRONMENT, said[-3000:]
    assert (
        "no space left on device while writing checkpoint step_00000002" in said
        and "--resume latest" in said
        and "Traceback" not in said
    ), said[-3000:]
    assert not list((out / "checkpoints").glob(".*.tmp")) and not (out / "final").exists()
    # 2. a 4 MB tmpfs: refused before any heavy work, with the size it needs
    mnt = tmp_path / "small"
    mnt.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)):
        pytest.skip("no tmpfs mount here (the file-size part ran)")
    try:
        code, said2 = run_in_process(base_args(corpus, mnt / "run", 2))
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
    assert (
        code == ExitCode.ENVIRONMENT
        and "no space left for a checkpoint" in said2
        and "MB are free" in said2
        and "method=" not in said2
    ), said2
    # 3. a real ENOSPC: a 75 MB tmpfs holds the first tiny checkpoint (~58 MB) but not a second one beside it
    mid = tmp_path / "mid"
    mid.mkdir()
    assert _mount("-t", "tmpfs", "-o", "size=75m", "tmpfs", str(mid))
    try:
        code, said3 = run_in_process(base_args(corpus, mid / "run", 3, "--set", "train.save_every=1"))
        left = [p.name for p in (mid / "run" / "checkpoints").iterdir()]
        latest_ok = load_checkpoint_ok(find_latest(mid / "run"))
    finally:
        subprocess.run(["umount", str(mid)], capture_output=True)
    assert (
        code == ExitCode.ENVIRONMENT
        and "no space left on device while writing checkpoint step_00000002" in said3
        and "Traceback" not in said3
    ), said3
    assert sorted(left) == ["latest", "step_00000001"] and latest_ok, (
        left
    )  # the partial write removed, the previous checkpoint intact
    figures.setdefault("environment checks", []).append(
        "full disk: exit 5 with 'no space left', no temp dir left"
    )


def test_two_runs_on_one_directory(ctx, corpus, tmp_path, figures):
    out, log = tmp_path / "run", tmp_path / "a.log"
    a = start(ctx, base_args(corpus, out, 12, "--set", "train.save_every=1"), log)
    lock = out / RunLock.NAME
    for _ in range(600):
        if lock.is_file() and f'"pid": {a.pid}' in lock.read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail("the first run never took the lock:\n" + log.read_text()[-2000:])
    code, said = run_in_process(
        base_args(corpus, out, 12, "--set", "train.seed=1")
    )  # same directory, another seed
    a.join(300)
    assert (
        code == ExitCode.ENVIRONMENT
        and "in use by another run" in said
        and f"pid {a.pid} on host {socket.gethostname()}" in said
    ), said
    assert a.exitcode == 0, log.read_text()[-3000:]  # the first run was not disturbed
    assert metric_steps(out) == list(range(1, 13)) and not lock.exists()
    figures.setdefault("environment checks", []).append(
        "two runs on one dir: the second stops with exit 5 naming the first"
    )


def test_stale_lock_is_taken_over(corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / RunLock.NAME).write_text(
        json.dumps(dict(host=socket.gethostname(), pid=2**22 + 12345, started="yesterday"))
    )
    (out / "checkpoints" / ".step_00000001.tmp").mkdir(parents=True)
    code, said = run_in_process(base_args(corpus, out, 1))
    assert code == 0 and "took over the stale lock" in said and "leftover(s) of an interrupted run" in said, (
        said
    )
    assert not (out / "checkpoints" / ".step_00000001.tmp").exists() and not (out / RunLock.NAME).exists()
