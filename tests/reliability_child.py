"""Child processes of tests/test_reliability.py, started from a forkserver that has already imported maskedclip
(so each start costs milliseconds, not seconds of imports).

`run_cli(argv, log, plan, fsize)` runs `maskedclip.train.main(argv)` with one torch thread, stdout/stderr to `log`,
and optionally:
- `plan=(hook, n)`: SIGKILL itself in the middle of the n-th call of `hook` in this process — `"save_file"` (the
  safetensors writes: model.safetensors of a checkpoint, then final/ and encoder.safetensors), `"torch.save"` (state.pt,
  rng_rank0.pt) after writing half the bytes, or `"atomic"` (the COMPLETE marker / `latest` pointer, before the rename);
- `fsize`: an RLIMIT_FSIZE in bytes (a file-size limit that fails like a full disk, even for root), SIGXFSZ ignored.
"""

import os
import signal
import sys
from pathlib import Path


def _kill_now():
    os.kill(os.getpid(), signal.SIGKILL)


def _install(plan):
    hook, n = plan
    calls = {"n": 0}

    def due():
        calls["n"] += 1
        return calls["n"] == n

    if hook == "save_file":
        import safetensors.torch as st

        real = st.save_file

        def save_file(tensors, filename, metadata=None):
            if due():
                real(tensors, filename, metadata=metadata)
                with open(filename, "r+b") as f:
                    f.truncate(os.path.getsize(filename) // 2)  # a torn write
                _kill_now()
            return real(tensors, filename, metadata=metadata)

        st.save_file = save_file
    elif hook == "torch.save":
        import torch

        real = torch.save

        def save(obj, f, *a, **k):
            if due():
                real(obj, f, *a, **k)
                with open(f, "r+b") as fh:
                    fh.truncate(os.path.getsize(f) // 2)
                _kill_now()
            return real(obj, f, *a, **k)

        torch.save = save  # every module's `torch.save`: the same function
    elif hook == "atomic":
        from maskedclip.train import checkpoint, trainer

        real = checkpoint._atomic_write_text

        def atomic(path, text):
            if due():
                _kill_now()
            return real(path, text)

        for m in (checkpoint, trainer):  # each module that calls it looks it up in its own namespace
            m._atomic_write_text = atomic
    elif hook == "rmtree":  # deleting an old checkpoint: half of its files gone, then killed
        import shutil

        real = shutil.rmtree

        def rmtree(path, *a, **k):
            if due():
                for f in sorted(p for p in Path(path).glob("*") if p.is_file() and p.name != "COMPLETE")[:2]:
                    f.unlink()
                _kill_now()
            return real(path, *a, **k)

        shutil.rmtree = rmtree  # every module's `shutil.rmtree`: the same function
    else:
        raise ValueError(hook)


def run_cli(argv, log, plan=None, fsize=None):
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import torch

    torch.set_num_threads(1)
    if fsize is not None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    if plan:
        _install(plan)
    from maskedclip.train import main

    code = main(list(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
