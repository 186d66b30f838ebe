import os
# Nothing may download at test time.
for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"): os.environ.setdefault(k, "1")
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
