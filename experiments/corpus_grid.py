"""Sample grid of two corpora on disk, row by row (the first N unpaired images of each, as stored: 64 px PNG).

python experiments/corpus_grid.py runs/study/before/corpus runs/demo-v2/corpus experiments/results/corpus-v2/grid_v1_v2.png
"""

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("corpora", nargs="+", help="corpus folders, one row each, then the output PNG")
    ap.add_argument("--n", type=int, default=10, help="images per row")
    a = ap.parse_args(argv)
    *roots, out = a.corpora
    rows = []
    for r in map(Path, roots):
        recs = [json.loads(l) for l in (r / "pretrain" / "unpaired.jsonl").read_text().splitlines()[: a.n]]
        ims = [np.asarray(Image.open(r / x["image"]).convert("RGB")) for x in recs]
        gap = np.full((ims[0].shape[0], 2, 3), 255, np.uint8)
        rows.append(np.concatenate([c for im in ims for c in (im, gap)][:-1], 1))
    hgap = np.full((2, rows[0].shape[1], 3), 255, np.uint8)
    grid = np.concatenate([c for row in rows for c in (row, hgap)][:-1], 0)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(out, optimize=True)
    print(out, grid.shape, Path(out).stat().st_size, "bytes")


if __name__ == "__main__":
    main()
