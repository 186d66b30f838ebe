"""Prepared datasets (issue 19): maskedclip-prepare's shards and report against independent counts and the source files;
the memory-mapped and streaming loaders against the manifest loader; split_dataset_by_node coverage; streaming resume."""

import io
import itertools
import json
import os
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from maskedclip.data import (
    PREPARED_INFO,
    PreparedStream,
    StreamingLoader,
    load_prepared,
    make_loader,
    prepare_dataset,
    write_manifest,
)
from maskedclip.data.prepare import main as prepare_main
from maskedclip.synthetic import build_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    "A synthetic corpus (paired records with lesion masks) and a manifest with three deliberately broken records."
    root = build_corpus(tmp_path_factory.mktemp("prep") / "corpus", 20, 18, 0, size=32, progress=False)
    paired = [json.loads(l) for l in (root / "pretrain" / "paired.jsonl").read_text().splitlines()]
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    broken = [
        dict(paired[0], id="gone", image="images/does-not-exist.png"),
        dict(paired[1], id="corrupt", image="images/corrupt.png"),
        dict(paired[2], text="a second record with the id of paired[2]"),
    ]
    mixed = paired[:10] + broken + paired[10:]
    write_manifest(mixed, root / "mixed.jsonl")
    return root, paired, mixed


def _expected_report(rows, root):
    "An independent count of what must be kept and skipped: PIL opens each file, ids are counted in order."
    seen, kept, why = set(), [], Counter()
    for r in rows:
        if r["id"] in seen:
            why["duplicate_id"] += 1
            continue
        seen.add(r["id"])
        p = root / r["image"]
        if not p.exists():
            why["missing_file"] += 1
            continue
        try:
            with Image.open(p) as im:
                im.load()
        except Exception:
            why["corrupt_image"] += 1
            continue
        kept.append(r)
    return kept, dict(why)


def test_prepare_report_and_round_trip(corpus, tmp_path, capsys):
    root, paired, mixed = corpus
    out = tmp_path / "prepared"
    info = prepare_dataset(root / "mixed.jsonl", out, shard_size=4)
    line = capsys.readouterr().out.strip()
    kept, why = _expected_report(mixed, root)
    assert why == {"missing_file": 1, "corrupt_image": 1, "duplicate_id": 1}
    assert (info["total"], info["kept"], info["skipped_by_reason"]) == (len(mixed), len(kept), why)
    assert line.count("\n") == 0 and f"{len(mixed)} records, {len(kept)} kept, 3 skipped" in line
    on_disk = json.loads((out / PREPARED_INFO).read_text())
    assert on_disk["skipped_by_reason"] == why and {s["reason"] for s in on_disk["skipped"]} == set(why)
    # shards: ceil(20 / 4) = 5 Arrow files whose row counts are those of the report
    shards = sorted(p.name for p in out.glob("data-*.arrow"))
    assert shards == [s["file"] for s in info["shards"]] and len(shards) == 5
    from datasets import Dataset

    assert [len(Dataset.from_file(str(out / s))) for s in shards] == [s["num_rows"] for s in info["shards"]]
    # round trip: every column equals the source record and file
    ds = load_prepared(out).dataset
    assert ds["id"] == [r["id"] for r in kept]
    n_masks = 0
    for row, rec in zip(ds, kept):
        assert (row["text"], row["label"], row["labels"], row["source"], row["split"]) == (
            rec["text"],
            rec["label"],
            rec["labels"],
            rec["source"],
            rec["split"],
        )
        assert (
            row["image"]["bytes"] == (root / rec["image"]).read_bytes() and row["image_path"] == rec["image"]
        )
        got = {m["lesion"]: m for m in row["masks"]}
        assert set(got) == set(rec["masks"])
        for lesion, rel in rec["masks"].items():
            assert got[lesion]["mask"]["bytes"] == (root / rel).read_bytes()
            a = np.asarray(Image.open(io.BytesIO(got[lesion]["mask"]["bytes"])))
            assert np.array_equal(a, np.asarray(Image.open(root / rel))) and got[lesion]["path"] == rel
            n_masks += 1
        extra = json.loads(row["extra"])
        assert (extra["eye"], extra["index"]) == (rec["eye"], rec["index"])
    assert n_masks > 0  # the corpus has lesions, so masks were carried


def test_prepare_bad_mask_and_cli(corpus, tmp_path, capsys):
    root, paired, _ = corpus
    with_mask = next(r for r in paired if r["masks"])
    lesion = next(iter(with_mask["masks"]))
    recs = [dict(with_mask, masks={lesion: "masks/none.png"}), paired[3]]
    write_manifest(recs, root / "badmask.jsonl")
    assert prepare_main([str(root / "badmask.jsonl"), str(tmp_path / "bm"), "--quiet"]) == 0
    info = json.loads((tmp_path / "bm" / PREPARED_INFO).read_text())
    assert info["kept"] == 1 and info["skipped_by_reason"] == {"missing_file": 1}
    assert f"field 'masks.{lesion}'" in info["skipped"][0]["message"]
    assert capsys.readouterr().out.count("[maskedclip-prepare]") == 1
    # an existing output is refused (exit code 2: a command-line error) with one line naming it
    assert prepare_main([str(root / "badmask.jsonl"), str(tmp_path / "bm")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(tmp_path / "bm") in err and "overwrite" in err


def _run(paired, unpaired, root, epochs=2, bu=3, **kw):
    L = make_loader(
        paired,
        unpaired,
        root=root,
        image_size=16,
        batch_size_paired=4,
        batch_size_unpaired=bu,
        verbose=False,
        **kw,
    )
    return [
        (m["paired_ids"], m["unpaired_ids"], b.paired_images, b.unpaired_images, b.labels)
        for _ in range(epochs)
        for b, m in L.iter_with_meta()
    ]


def _same(a, b):
    return len(a) == len(b) and all(
        x[:2] == y[:2] and all(torch.equal(u, v) for u, v in zip(x[2:], y[2:])) for x, y in zip(a, b)
    )


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    root, _, _ = corpus
    d = tmp_path_factory.mktemp("prepared")
    for name, k in (("paired", 5), ("unpaired", 4)):
        prepare_dataset(root / "pretrain" / f"{name}.jsonl", d / name, root=root, shard_size=k, verbose=False)
    return d


@pytest.mark.parametrize("train", [True, False])
def test_loaders_from_shards_equal_manifest(corpus, prepared, train):
    root = corpus[0]
    ref = _run(root / "pretrain" / "paired.jsonl", root / "pretrain" / "unpaired.jsonl", root, train=train)
    mmap = _run(prepared / "paired", (prepared / "unpaired").as_uri(), None, train=train)
    assert _same(ref, mmap)  # memory-mapped shards: the manifest loader's batches, bit for bit
    url = (prepared / "unpaired").as_uri()  # file:// URL: the fsspec path
    stream = _run(prepared / "paired", url, None, train=train, streaming=True)
    if not train:
        assert _same(ref, stream)  # no shuffle, one process: the same batches, bit for bit
    else:  # shuffled: another order (shards + buffer), the same records in every epoch
        half = len(ref) // 2
        for ep in (slice(0, half), slice(half, None)):
            assert sorted(sum((x[1] for x in ref[ep]), [])) == sorted(sum((x[1] for x in stream[ep]), []))
        assert [x[1] for x in ref] != [x[1] for x in stream]


@pytest.mark.parametrize(
    "shard_size", [3, 4]
)  # 6 shards (divisible by 2: whole shards) and 5 (row-level split)
def test_split_by_node_covers_every_record_once(corpus, tmp_path, shard_size):
    root = corpus[0]
    prepare_dataset(
        root / "pretrain" / "unpaired.jsonl", tmp_path / "u", root=root, shard_size=shard_size, verbose=False
    )
    st = PreparedStream((tmp_path / "u").as_uri())
    all_ids = sorted(load_prepared(tmp_path / "u").dataset["id"])
    for epoch in (0, 1):
        per_rank = []
        for rank in (0, 1):
            it = st.iterable(shuffle=True, seed=5, buffer_size=4, rank=rank, world_size=2)
            it.set_epoch(epoch)
            per_rank.append([r["id"] for r in it])
        assert sorted(per_rank[0] + per_rank[1]) == all_ids  # every record exactly once per epoch
        assert min(map(len, per_rank)) >= st.rows_per_rank(2)
    # the loader: both ranks take the same number of steps, disjoint records
    loaders = [
        make_loader(
            None,
            tmp_path / "u",
            image_size=8,
            batch_size_unpaired=2,
            rank=r,
            world_size=2,
            streaming=True,
            buffer_size=4,
            verbose=False,
        )
        for r in (0, 1)
    ]
    ids = [sum((m["unpaired_ids"] for _, m in L.iter_with_meta()), []) for L in loaders]
    assert len(loaders[0]) == len(loaders[1]) and not set(ids[0]) & set(ids[1])


@pytest.mark.parametrize("num_workers", [0, 1])
def test_streaming_resume(prepared, num_workers):
    kw = dict(
        root=None,
        image_size=16,
        batch_size_paired=3,
        batch_size_unpaired=4,
        verbose=False,
        streaming=True,
        buffer_size=5,
        num_workers=num_workers,
    )
    full = make_loader(prepared / "paired", prepared / "unpaired", **kw)
    ref = [
        (m["paired_ids"], m["unpaired_ids"], b.unpaired_images)
        for _ in range(2)
        for b, m in full.iter_with_meta()
    ]
    L = make_loader(prepared / "paired", prepared / "unpaired", **kw)
    it = L.iter_with_meta()
    head = [next(it) for _ in range(3)]  # stop mid-epoch 0 (workers have read ahead)
    state = json.loads(json.dumps(L.state_dict()))  # a checkpoint stores it as JSON-able data
    del it
    L.close()
    assert isinstance(L, StreamingLoader) and (state["epoch"], state["step"]) == (0, 3)
    R = make_loader(prepared / "paired", prepared / "unpaired", **kw)
    R.load_state_dict(state)
    rest = [
        (m["paired_ids"], m["unpaired_ids"], b.unpaired_images)
        for _ in range(2)
        for b, m in R.iter_with_meta()
    ]
    got = [(m["paired_ids"], m["unpaired_ids"], b.unpaired_images) for b, m in head] + rest[: len(ref) - 3]
    assert [g[:2] for g in got] == [r[:2] for r in ref]
    assert all(torch.equal(g[2], r[2]) for g, r in zip(got, ref))
    # the same loader object continues where the caller stopped, too (the workers' read-ahead is rewound)
    again = [(m["paired_ids"], m["unpaired_ids"]) for b, m in L.iter_with_meta()]
    assert again == [r[:2] for r in ref[3 : len(L)]]
    with pytest.raises(ValueError, match="world_size"):
        make_loader(prepared / "paired", prepared / "unpaired", rank=0, world_size=2, **kw).load_state_dict(
            state, strict=False
        )


def test_prepared_errors(corpus, prepared, tmp_path):
    root = corpus[0]
    with pytest.raises(ValueError, match="streaming reads prepared datasets"):
        make_loader(None, root / "pretrain" / "unpaired.jsonl", root=root, streaming=True, verbose=False)
    with pytest.raises(ValueError, match="not in the label space"):
        make_loader(prepared / "paired", None, label_space=["normal"], verbose=False)
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        PreparedStream(tmp_path)
    with pytest.raises(FileExistsError, match="overwrite"):
        prepare_dataset(root / "pretrain" / "paired.jsonl", prepared / "paired", root=root, verbose=False)
    assert Path(prepared / "paired" / PREPARED_INFO).is_file()  # the refused call left it alone


def _steps(L, n=None):
    return [
        (m["paired_ids"], m["unpaired_ids"], b.unpaired_images, b.paired_images)
        for b, m in itertools.islice(L.iter_with_meta(), n)
    ]


def test_rows_split_is_world_size_independent_and_elastic(prepared):
    "split='rows': at every step the ranks' batches in rank order are the one-process batch; states resume 2 -> 1, 1 -> 2."
    kw = dict(image_size=16, verbose=False, streaming=True, split="rows", buffer_size=4)
    one = lambda: make_loader(
        prepared / "paired", prepared / "unpaired", batch_size_paired=4, batch_size_unpaired=4, **kw
    )
    two = lambda r: make_loader(
        prepared / "paired",
        prepared / "unpaired",
        batch_size_paired=2,
        batch_size_unpaired=2,
        rank=r,
        world_size=2,
        **kw,
    )
    ref = [s for L in [one()] for _ in range(2) for s in _steps(L)]  # two epochs of one process, batch 4 + 4
    ranks = [[s for L in [two(r)] for _ in range(2) for s in _steps(L)] for r in (0, 1)]
    assert len(ref) == len(ranks[0]) == len(ranks[1]) == 2 * (18 // 4)
    for k, s in enumerate(ref):
        a, b = ranks[0][k], ranks[1][k]
        # rank 0 holds the first half of the global batch, rank 1 the second (the trainer's convention, e.g. for the
        # masking noise): concatenated in rank order they are the one-process batch, rows and augmentation
        assert a[0] + b[0] == s[0] and a[1] + b[1] == s[1]
        assert torch.equal(torch.cat([a[2], b[2]]), s[2]) and torch.equal(torch.cat([a[3], b[3]]), s[3])
    # elastic resume: 2 ranks stop after 3 steps, one process resumes from rank 0's state, and the other way round
    L2 = two(0)
    _steps(L2, 3)
    L1 = one()
    L1.load_state_dict(json.loads(json.dumps(L2.state_dict())))
    assert [s[:2] for s in _steps(L1)] == [s[:2] for s in ref[3 : len(ref) // 2]]
    L1 = one()
    _steps(L1, 2)
    st = L1.state_dict()
    for r in (0, 1):
        R = two(r)
        R.load_state_dict(st)
        assert [x[1] for x in _steps(R)] == [s[1][2 * r : 2 * r + 2] for s in ref[2 : len(ref) // 2]]
    with pytest.raises(ValueError, match="world_size"):  # split='shards' states are per rank
        make_loader(
            prepared / "paired",
            prepared / "unpaired",
            batch_size_paired=4,
            batch_size_unpaired=4,
            **dict(kw, split="shards"),
        ).load_state_dict(dict(L2.state_dict(), split="shards"), strict=False)


@pytest.fixture(scope="module")
def corpus64(tmp_path_factory):
    "A corpus at the tiny preset's image size, and both pre-training manifests prepared."
    root = build_corpus(tmp_path_factory.mktemp("c64") / "corpus", 16, 16, 0, size=64, progress=False)
    for name in ("paired", "unpaired"):
        prepare_dataset(
            root / "pretrain" / f"{name}.jsonl",
            root / f"{name}-prepared",
            root=root,
            shard_size=4,
            verbose=False,
        )
    return root


def _pretrain(out, paired, unpaired, root=None, steps=3, **data):
    from maskedclip.config import DataConfig, ExperimentConfig, TrainConfig, get_preset
    from maskedclip.train import Trainer

    torch.manual_seed(0)
    cfg = ExperimentConfig(
        model=get_preset("tiny"),
        data=DataConfig(
            paired=str(paired),
            unpaired=str(unpaired),
            root=root,
            paired_batch_size=4,
            unpaired_batch_size=4,
            **data,
        ),
        train=TrainConfig(output_dir=str(out), steps=steps, lr=1e-3, warmup_steps=1, seed=3),
    )
    Trainer(cfg, progress=False).fit()
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def test_pretrain_from_shards_equals_manifest(corpus64, tmp_path):
    "maskedclip-pretrain's loader: a run from memory-mapped shards logs the manifest run's losses exactly."
    root = corpus64
    ref = _pretrain(
        tmp_path / "m", root / "pretrain" / "paired.jsonl", root / "pretrain" / "unpaired.jsonl", str(root)
    )
    mm = _pretrain(tmp_path / "s", root / "paired-prepared", root / "unpaired-prepared")
    assert len(ref) == 3 and [r["loss"] for r in ref] == [r["loss"] for r in mm]
    st = _pretrain(
        tmp_path / "t", (root / "paired-prepared").as_uri(), root / "unpaired-prepared", streaming=True
    )
    assert len(st) == 3 and all(np.isfinite(r["loss"]) for r in st)


def test_prepare_adapter_output(tmp_path, capsys):
    "An adapter's records (retina_cataract's class folders) through the CLI: labels from the folders, one broken image."
    r = tmp_path / "cataractdataset" / "dataset"
    want = {}
    for folder, label in (("1_normal", "normal"), ("2_cataract", "cataract"), ("2_glaucoma", "glaucoma")):
        (r / folder).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (20, 20), (40 * i, 90, 30)).save(r / folder / f"{folder}_{i}.png")
            want[f"{folder}_{i}"] = label
    (r / "1_normal" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "prepared"
    code = prepare_main(
        [str(tmp_path / "cataractdataset"), str(out), "--adapter", "retina_cataract", "--quiet"]
    )
    assert code == 0 and "7 records, 6 kept, 1 skipped (corrupt_image 1)" in capsys.readouterr().out
    ds = load_prepared(out).dataset
    assert {Path(p).stem: l for p, l in zip(ds["image_path"], ds["label"])} == want
    assert set(ds["source"]) == {"retina_cataract"}


_DDP_WORKER = """
import json, os, sys
from maskedclip.config import DataConfig, ExperimentConfig, TrainConfig, get_preset
from maskedclip.train import Trainer, cleanup_distributed, setup_distributed

out, paired, unpaired = sys.argv[1:4]
di = setup_distributed("cpu")
b = 4 // di.world_size  # the same global batch on any number of processes
cfg = ExperimentConfig(
    model=get_preset("tiny"),
    data=DataConfig(paired=paired, unpaired=unpaired, paired_batch_size=b, unpaired_batch_size=b,
                    streaming=True, stream_split="rows", shuffle_buffer=8),
    train=TrainConfig(output_dir=out, steps=3, lr=1e-3, warmup_steps=1, seed=3, diag_every=0, precision="fp32"),
)
Trainer(cfg, dist_info=di, progress=False).fit()
cleanup_distributed()
"""


@pytest.mark.two_cores  # two processes / a browser: see tests/conftest.py
@pytest.mark.slow
def test_two_process_streaming_run_equals_one_process(corpus64, tmp_path):
    "DDP over gloo from streamed shards (split='rows', a file:// URL): the losses of 2 processes are the 1-process losses."
    import subprocess
    import sys

    worker = tmp_path / "worker.py"
    worker.write_text(_DDP_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent.parent))
    rows = {}
    for n in (1, 2):
        out = tmp_path / f"run{n}"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={n}",
            str(worker),
        ]
        args = [str(out), (corpus64 / "paired-prepared").as_uri(), str(corpus64 / "unpaired-prepared")]
        r = subprocess.run(cmd + args, capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        rows[n] = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert len(rows[1]) == len(rows[2]) == 3
    for a, b in zip(rows[1], rows[2]):
        for k in ("loss", "lg_clip", "mim", "mfd"):
            assert a[k] == pytest.approx(b[k], abs=1e-5), (k, a, b)
    assert rows[1][0]["loss"] != rows[1][2]["loss"]  # it trained (the comparison is not of constants)
