import os

# Nothing may download at test time.
for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(k, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# papermill notebooks must run on this interpreter's kernel, not a "python3" kernelspec from elsewhere
import sys
from pathlib import Path

if (Path(sys.prefix) / "share" / "jupyter" / "kernels" / "python3").is_dir():
    os.environ["JUPYTER_PATH"] = str(Path(sys.prefix) / "share" / "jupyter")


import pytest


@pytest.fixture(scope="module")
def one_thread():
    "Tiny models: one intra-op thread is faster than two, and far faster on a shared, busy machine (restored after)."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- figures that a suite wants printed at the end of the run (the reliability suite's kills / bad inputs / ...)
_FIGURES = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def figures(request) -> dict:
    "A dict whose items are printed in pytest's terminal summary under 'reliability figures'."
    return request.config.stash.setdefault(_FIGURES, {})


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    figs = config.stash.get(_FIGURES, {})
    if not figs:
        return
    terminalreporter.section("reliability figures (issue 17)")
    for k, v in figs.items():
        for line in v if isinstance(v, list) else [v]:
            terminalreporter.write_line(f"{k}: {line}")
