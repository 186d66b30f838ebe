"""Peak memory (max RSS of this process) of a 1000-image linear-probe evaluation (issue 22).

    maskedclip-synth --out /tmp/corpus224 --n-paired 1 --n-unpaired 1 --n-task 400,200,400 --size 224
    OMP_NUM_THREADS=1 python benchmarks/eval_memory.py /tmp/corpus224 [--stream] [--code DIR]

One task (glaucoma: 400 train / 200 val / 400 test images at 224 px), a random ViT (width 192, depth 2,
16-px patches), linear probe at 100 % labels, seed 0. `--code DIR` imports maskedclip from DIR (e.g. a
`git archive` of an older commit) to measure it the same way; `--stream` passes `evaluate_all(stream=True)`.
"""

import argparse
import json
import resource
import sys
import time

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("corpus", help="corpus root with tasks/glaucoma/{train,val,test}.jsonl")
p.add_argument("--stream", action="store_true", help="decode images per batch (evaluate_all(stream=True))")
p.add_argument("--code", help="import maskedclip from this folder instead")
a = p.parse_args()
if a.code:
    sys.path.insert(0, a.code)
import torch

torch.set_num_threads(1)
import maskedclip.evaluate as E
from maskedclip.config import VisionConfig

rss = lambda: round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
before, t0 = rss(), time.time()
df = E.evaluate_all(
    {"random": "random"},
    tasks=["glaucoma"],
    fractions=[1.0],
    seeds=[0],
    protocol="linear_probe",
    corpus_root=a.corpus,
    vision_config=VisionConfig(image_size=224, patch_size=16, width=192, depth=2, heads=3),
    n_boot=200,
    progress=False,
    log=None,
    **({"stream": True} if a.stream else {}),
)
print(
    json.dumps(
        dict(
            module=E.__file__,
            stream=a.stream,
            peak_rss_mb=rss(),
            rss_after_imports_mb=before,
            auroc=float(df.auroc.iloc[0]),
            seconds=round(time.time() - t0, 1),
        )
    )
)
