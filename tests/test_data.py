"""Tests of maskedclip.data: manifests, bad input, image modes, transforms, the two-stream loader."""

import io
import json
import os
import struct
import warnings
import zlib
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from maskedclip.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BadRecordError,
    Batch,
    ImageDataset,
    ImageTextDataset,
    ManifestData,
    MissingImageError,
    build_label_map,
    check_image,
    eval_transform,
    fundus_border_crop,
    label_to_id,
    load_image,
    load_imagefolder,
    load_manifest,
    load_records,
    make_loader,
    train_transform,
    validate_record,
    write_manifest,
)


# ----------------------------------------------------------------------------------------------- helpers
def save_img(path: Path, size=(16, 16), color=(120, 60, 30), fmt=None, noise=False, seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if noise:
        arr = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(path, fmt)
    else:
        Image.new("RGB", size, color).save(path, fmt)
    return path


def tok(texts):
    "Whitespace hashing tokenizer (stand-in for the text tower's)."
    ids = [[zlib.crc32(w.encode()) % 997 + 1 for w in t.split()] for t in texts]
    T = max(1, max(map(len, ids)))
    return dict(
        input_ids=[x + [0] * (T - len(x)) for x in ids],
        attention_mask=[[1] * len(x) + [0] * (T - len(x)) for x in ids],
    )


def text_from_label(record, rng):
    "A picklable text_fn that uses its rng (for on-the-fly text determinism)."
    return f"{record['label'] or 'none'} variant {rng.randint(0, 10**6)}", record["label"]


def png_with_header_size(path: Path, w: int, h: int) -> Path:
    "A 1x1 PNG whose IHDR claims w x h (CRC fixed): PIL reads the size without decoding."
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    b = bytearray(buf.getvalue())
    b[16:24] = struct.pack(">II", w, h)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])) & 0xFFFFFFFF)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(b))
    return path


@pytest.fixture
def corpus(tmp_path):
    "12 paired (text + label) and 30 unpaired tiny images, each with its own colour."
    root = tmp_path / "corpus"
    labels = ["no DR", "mild DR", "glaucoma"]
    paired = []
    for i in range(12):
        save_img(root / "images" / f"p{i}.png", noise=True, seed=i)  # textured: crops and flips change pixels
        paired.append(
            dict(
                id=f"p{i}",
                image=f"images/p{i}.png",
                text=f"finding number {i}",
                label=labels[i % 3] if i != 11 else None,
                source="synthetic",
                split="train",
            )
        )
    unpaired = []
    for i in range(30):
        save_img(root / "images" / f"u{i}.png", noise=True, seed=100 + i)
        unpaired.append(dict(id=f"u{i}", image=f"images/u{i}.png", source="synthetic", split="train"))
    write_manifest(paired, root / "paired.jsonl")
    write_manifest(unpaired, root / "unpaired.jsonl")
    return root, paired, unpaired, labels


def loader(root, bp=4, bu=5, **kw):
    kw.setdefault("label_space", ["no DR", "mild DR", "glaucoma"])
    return make_loader(
        root / "paired.jsonl" if bp is not None else None,
        root / "unpaired.jsonl" if bu is not None else None,
        tokenize=tok,
        image_size=8,
        batch_size_paired=bp or 0,
        batch_size_unpaired=bu or 0,
        verbose=False,
        **kw,
    )


def run(L, n=None):
    "Consume up to n batches (default: rest of the epoch): list of (paired ids, unpaired ids, batch)."
    out = []
    for b, m in L.iter_with_meta():
        out.append((m["paired_ids"], m["unpaired_ids"], b))
        if n is not None and len(out) == n:
            break
    return out


# ----------------------------------------------------------------------------------------------- manifests
def test_load_manifest_jsonl_exact(tmp_path):
    recs = []
    for i in range(25):
        save_img(tmp_path / "img" / f"{i}.png")
        recs.append(
            dict(
                id=f"id-{i}",
                image=f"img/{i}.png",
                text=f'Report {i}: "quoted", ünïcode; 0.{i} mm.',
                label=["a", "b", None][i % 3],
                labels=[["a"], ["a", "b"], None][i % 3],
                source="s",
                split=["train", "val", "test", None][i % 4],
                masks={"ma": f"m/{i}.png"},
                score=i / 4,
            )
        )
    write_manifest(recs, tmp_path / "m.jsonl")
    md = load_manifest(tmp_path / "m.jsonl", verbose=False)
    assert isinstance(md, ManifestData) and len(md) == 25
    assert (md.report.total, md.report.kept, md.report.n_skipped) == (25, 25, 0)
    ds = md.dataset
    for f in ("id", "image", "text", "label", "labels", "source", "split"):
        assert ds[f] == [r[f] for r in recs], f
    assert ds["score"] == [r["score"] for r in recs]
    assert [m["ma"] for m in ds["masks"]] == [r["masks"]["ma"] for r in recs]
    assert "25 records, 25 kept, 0 skipped" in ds.info.description
    assert md.label_values == ["a", "b"]


def test_load_manifest_csv_keeps_strings(tmp_path):
    save_img(tmp_path / "a.png")
    save_img(tmp_path / "b.png")
    (tmp_path / "m.csv").write_text(
        'id,image,text,label,labels,site\n001,a.png,"first, with comma",0,dr|amd,007\n002,b.png,,,,\n'
    )
    md = load_manifest(tmp_path / "m.csv", verbose=False)
    ds = md.dataset
    assert (
        ds["id"] == ["001", "002"]
        and ds["label"] == ["0", None]
        and ds["text"] == ["first, with comma", None]
    )
    assert ds["labels"] == [["dr", "amd"], None] and ds["site"] == ["007", ""]
    assert md.report.kept == 2


def test_write_manifest_csv_roundtrip(tmp_path):
    save_img(tmp_path / "x.png")
    recs = [
        dict(
            id="1",
            image="x.png",
            text="t",
            label="a",
            labels=["a", "b"],
            source="s",
            split="test",
            extra={"k": 1},
        )
    ]
    write_manifest(recs, tmp_path / "r.csv")
    ds = load_manifest(tmp_path / "r.csv", verbose=False).dataset
    assert (
        ds[0]["labels"] == ["a", "b"] and json.loads(ds[0]["extra"]) == {"k": 1} and ds[0]["split"] == "test"
    )


def test_json_array_manifest(tmp_path):
    save_img(tmp_path / "x.png")
    (tmp_path / "m.json").write_text(json.dumps([dict(id="a", image="x.png"), dict(id="b", image="x.png")]))
    assert load_manifest(tmp_path / "m.json", verbose=False).dataset["id"] == ["a", "b"]


def test_manifest_root_argument(tmp_path):
    save_img(tmp_path / "data" / "images" / "a.png")
    write_manifest([dict(id="a", image="images/a.png")], tmp_path / "manifests" / "m.jsonl")
    with pytest.raises(MissingImageError):
        load_manifest(
            tmp_path / "manifests" / "m.jsonl", verbose=False
        )  # root defaults to the manifest folder
    assert len(load_manifest(tmp_path / "manifests" / "m.jsonl", root=tmp_path / "data", verbose=False)) == 1


# ----------------------------------------------------------------------------------------------- bad input
def _make_bad(case: str, root: Path, outside: Path):
    "Returns (record for line 3, reason, load kwargs, substring expected in the message)."
    img = root / "bad" / f"{case}.png"
    kw = {}
    if case == "corrupt":
        img.parent.mkdir(parents=True, exist_ok=True)
        img.write_bytes(os.urandom(300))
        reason, needle = "corrupt_image", "not a readable image"
    elif case == "truncated_png":
        save_img(img, (64, 64), noise=True)
        img.write_bytes(img.read_bytes()[:2000])
        reason, needle = "truncated_image", "bad"
    elif case == "truncated_jpeg":
        img = img.with_suffix(".jpg")
        save_img(img, (64, 64), noise=True)
        img.write_bytes(img.read_bytes()[:1500])
        reason, needle = "truncated_image", "truncated"
    elif case == "zero_byte":
        img.parent.mkdir(parents=True, exist_ok=True)
        img.write_bytes(b"")
        reason, needle = "empty_file", "zero-byte"
    elif case == "missing":
        reason, needle = "missing_file", "not found"
    elif case == "too_large":
        save_img(img, (32, 32))
        kw["max_pixels"] = 300
        reason, needle = "too_large", "1,024 pixels, above max_pixels=300"
    elif case == "bomb_header":
        png_with_header_size(img, 50_000, 50_000)
        reason, needle = "too_large", "decompression"
    elif case == "over_limit_header":
        png_with_header_size(img, 12_000, 10_000)
        reason, needle = "too_large", "120,000,000 pixels"
    elif case in ("empty_text", "missing_text"):
        save_img(img)
        kw["require_text"] = True
        reason, needle = "missing_text", "empty or missing text"
    elif case == "label_outside":
        save_img(img)
        kw["label_space"] = ["a", "b"]
        reason, needle = "label_outside_space", "'zebra'"
    elif case == "duplicate_id":
        save_img(img)
        reason, needle = "duplicate_id", "first used at"
    elif case == "dotdot":
        save_img(outside / "x.png")
        reason, needle = "path_escapes_root", "escapes the data root"
    elif case == "absolute":
        save_img(outside / "x.png")
        reason, needle = "path_escapes_root", "escapes the data root"
    elif case == "symlink":
        save_img(outside / "x.png")
        img.parent.mkdir(parents=True, exist_ok=True)
        img.symlink_to(outside / "x.png")
        reason, needle = "path_escapes_root", "symlink"
    elif case == "missing_id":
        save_img(img)
        reason, needle = "missing_field", "missing or empty id"
    elif case == "bad_split":
        save_img(img)
        reason, needle = "bad_value", "split must be one of"
    else:
        raise KeyError(case)
    rec = dict(id="bad-1", image=img.relative_to(root).as_posix(), text="some text", label="a")
    if case == "empty_text":
        rec["text"] = "   "
    if case == "missing_text":
        del rec["text"]
    if case == "label_outside":
        rec["label"] = "zebra"
    if case == "duplicate_id":
        rec["id"] = "good-0"
    if case == "dotdot":
        rec["image"] = "../outside/x.png"
    if case == "absolute":
        rec["image"] = str(outside / "x.png")
    if case == "missing_id":
        del rec["id"]
    if case == "bad_split":
        rec["split"] = "training"
    return rec, reason, kw, needle


BAD_CASES = [
    "corrupt",
    "truncated_png",
    "truncated_jpeg",
    "zero_byte",
    "missing",
    "too_large",
    "bomb_header",
    "over_limit_header",
    "empty_text",
    "missing_text",
    "label_outside",
    "duplicate_id",
    "dotdot",
    "absolute",
    "symlink",
    "missing_id",
    "bad_split",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_record_raise_and_skip(tmp_path, case):
    root, outside = tmp_path / "root", tmp_path / "outside"
    good = [dict(id=f"good-{i}", image=f"ok/{i}.png", text=f"text {i}", label="a") for i in range(3)]
    for i in range(3):
        save_img(root / "ok" / f"{i}.png")
    bad, reason, kw, needle = _make_bad(case, root, outside)
    manifest = root / "m.jsonl"  # bad record on line 3
    manifest.write_text("".join(json.dumps(r) + "\n" for r in good[:2] + [bad] + good[2:]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(BadRecordError) as ei:
            load_manifest(manifest, verbose=False, **kw)
        err = ei.value
        assert err.reason == reason and err.line == 3 and str(manifest) in str(err), str(err)
        assert needle.lower() in str(err).lower(), str(err)
        if case not in ("missing_id",):
            assert "'bad-1'" in str(err) or case == "duplicate_id"
        if reason in (
            "corrupt_image",
            "truncated_image",
            "empty_file",
            "missing_file",
            "too_large",
            "path_escapes_root",
        ):
            assert err.field == "image" and err.file is not None and Path(bad["image"]).name in str(err)
        md = load_manifest(manifest, on_bad_record="skip", verbose=False, **kw)
    assert len(md) == 3 and md.dataset["id"] == ["good-0", "good-1", "good-2"]
    assert (md.report.total, md.report.kept, md.report.by_reason()) == (4, 3, {reason: 1})
    assert md.report.skipped[0].where.endswith(":3") and reason in md.report.summary()
    if case == "missing":
        assert isinstance(err, FileNotFoundError)


def test_malformed_lines_are_reported(tmp_path):
    save_img(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text(
        '{"id": "a", "image": "a.png"}\n\n{"id": "b", "image": \n["not", "a record"]\n'
        '{"id": "c", "image": "a.png"}\n'
    )
    with pytest.raises(BadRecordError) as ei:
        load_manifest(tmp_path / "m.jsonl", verbose=False)
    assert ei.value.reason == "malformed_row" and ei.value.line == 3
    md = load_manifest(tmp_path / "m.jsonl", on_bad_record="skip", verbose=False)
    assert md.dataset["id"] == ["a", "c"] and md.report.by_reason() == {"malformed_row": 2}
    assert [s.where.rsplit(":", 1)[1] for s in md.report.skipped] == ["3", "4"]
    (tmp_path / "m.csv").write_text("id,image\na,a.png\nb,a.png,extra\nc,a.png\n")
    md = load_manifest(tmp_path / "m.csv", on_bad_record="skip", verbose=False)
    assert md.dataset["id"] == ["a", "c"] and md.report.skipped[0].where.endswith(":3")


def test_many_bad_records_counted_and_printed(tmp_path, capsys):
    recs = []
    for i in range(10):
        if i % 3:
            save_img(tmp_path / f"{i}.png")
        recs.append(dict(id=f"r{i}", image=f"{i}.png"))
    load_manifest(write_manifest(recs, tmp_path / "m.jsonl"), on_bad_record="skip")
    out = capsys.readouterr().out
    assert "10 records, 6 kept, 4 skipped" in out and "missing_file 4" in out
    assert all(f"{i}.png" in out for i in (0, 3, 6, 9))


def test_check_image_modes(tmp_path):
    p = save_img(tmp_path / "a.jpg", (64, 64), noise=True)
    p.write_bytes(p.read_bytes()[:1500])
    assert check_image(p, "header") == (64, 64)  # the header alone looks fine
    with pytest.raises(BadRecordError, match="truncated"):
        check_image(p, "verify")
    with pytest.raises(ValueError):
        check_image(p, "bogus")


# ----------------------------------------------------------------------------------------------- image modes
def test_image_modes_converted_not_rejected(tmp_path):
    cases = {}
    Image.new("L", (2, 2), 77).save(tmp_path / "gray.png")
    cases["gray.png"] = [77, 77, 77]
    Image.new("RGBA", (2, 2), (200, 100, 50, 128)).save(tmp_path / "rgba.png")
    cases["rgba.png"] = [100, 50, 25]
    pal = Image.new("P", (2, 2), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    cases["pal.png"] = [10, 200, 30]
    pt = Image.new("P", (2, 2), 1)
    pt.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pt.info["transparency"] = 1
    pt.save(tmp_path / "pal_t.png", transparency=1)
    cases["pal_t.png"] = [0, 0, 0]  # fully transparent -> black
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "cmyk.tif")
    cases["cmyk.tif"] = [255, 0, 0]
    Image.fromarray(np.full((2, 2), 65535, np.uint16)).save(tmp_path / "g16.png")
    cases["g16.png"] = [255, 255, 255]
    Image.fromarray(np.full((2, 2), 4095, np.uint16)).save(tmp_path / "g12.png")
    cases["g12.png"] = [16, 16, 16]
    Image.fromarray(np.full((2, 2), 25700, np.uint16)).save(tmp_path / "g16.tif")
    cases["g16.tif"] = [100, 100, 100]
    Image.new("1", (2, 2), 1).save(tmp_path / "bw.png")
    cases["bw.png"] = [255, 255, 255]
    for name, expected in cases.items():
        im = load_image(tmp_path / name)
        assert im.mode == "RGB" and np.asarray(im)[0, 0].tolist() == expected, (
            name,
            Image.open(tmp_path / name).mode,
        )
    # 16-bit: scaled, not clipped (PIL's own convert('L') would give 255 for 25700)
    a = np.array([[0, 25700, 32768, 65535]], np.uint16)
    Image.fromarray(a).save(tmp_path / "ramp16.png")
    assert (
        np.asarray(load_image(tmp_path / "ramp16.png"))[0, :, 1].tolist()
        == np.rint(a[0].astype(float) * 255 / 65535).astype(int).tolist()
    )
    # CMYK JPEG (lossy) close to red
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    assert np.abs(np.asarray(load_image(tmp_path / "cmyk.jpg")).astype(int)[4, 4] - [255, 0, 0]).max() <= 6
    # all of them pass load_manifest
    recs = [dict(id=n, image=n) for n in list(cases) + ["ramp16.png", "cmyk.jpg"]]
    md = load_manifest(write_manifest(recs, tmp_path / "m.jsonl"), check_images="decode", verbose=False)
    assert md.report.kept == len(recs)


def test_jpeg_draft_decode(tmp_path):
    p = save_img(tmp_path / "big.jpg", (800, 600), noise=True)
    assert load_image(p).size == (800, 600)
    assert load_image(p, draft=150).size == (200, 150)  # 1/4 scale keeps both sides >= 150


# ----------------------------------------------------------------------------------------------- decode errors at training time
def test_decode_error_after_validation(corpus):
    root, paired, *_ = corpus
    md = load_manifest(root / "paired.jsonl", verbose=False)
    L, L_raise = loader(root, on_decode_error="replace", bp=12, bu=5), loader(root, bp=12, bu=5)
    (root / "images" / "p3.png").write_bytes(b"garbage, not a png")  # changed after validation
    ds = ImageTextDataset(md, transform=eval_transform(8))
    with pytest.raises(BadRecordError) as ei:
        ds[3]
    assert "p3.png" in str(ei.value) and ei.value.record_id == "p3" and ei.value.reason == "corrupt_image"
    ds = ImageTextDataset(md, transform=eval_transform(8), on_error="replace")
    item = ds[3]
    assert item["id"] == "p4" and len(item["errors"]) == 1 and "p3.png" in item["errors"][0][0]
    with pytest.warns(UserWarning, match="p3.png"):
        run(L, 1)
    assert [Path(f).name for f, _ in L.decode_errors] == ["p3.png"]
    with pytest.raises(BadRecordError, match="p3.png"):
        run(L_raise, 1)


def test_decode_error_in_worker_names_the_file(corpus):
    root, *_ = corpus
    L = loader(root, bp=12, bu=5, num_workers=1)
    (root / "images" / "p5.png").write_bytes(b"")
    with pytest.raises(BadRecordError, match="p5.png"):
        run(L, 1)


# ----------------------------------------------------------------------------------------------- transforms
def test_fundus_border_crop_and_transforms():
    yy, xx = np.mgrid[:120, :200]
    arr = np.zeros((120, 200, 3), np.uint8)
    arr[(xx - 90) ** 2 + (yy - 60) ** 2 <= 50**2] = (200, 100, 50)
    out = fundus_border_crop(Image.fromarray(arr))
    # disc columns 40..140 and rows 10..110 are all >= 1% foreground except the single-pixel extremes
    assert out.size == (99, 99) and np.asarray(out)[49, 49].tolist() == [200, 100, 50]
    assert fundus_border_crop(Image.new("RGB", (30, 10))).size == (30, 30)  # nothing found: only squared
    x = eval_transform(16)(Image.fromarray(arr))
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    g = eval_transform(4, border_crop=False)(Image.new("RGB", (6, 6), (255, 0, 128)))
    want = (torch.tensor([255, 0, 128]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(g[:, 2, 2], want, atol=1e-6)
    tf = train_transform(16)
    torch.manual_seed(0)
    a = tf(Image.fromarray(arr))
    torch.manual_seed(0)
    b = tf(Image.fromarray(arr))
    assert a.shape == (3, 16, 16) and torch.equal(a, b)
    for bad in [dict(scale=(0.0, 1.0)), dict(scale=(0.8, 0.5)), dict(hflip=1.5)]:
        with pytest.raises(ValueError):
            train_transform(16, **bad)
    with pytest.raises(ValueError):
        eval_transform(0)


# ----------------------------------------------------------------------------------------------- datasets
def test_label_map_and_datasets(corpus):
    root, paired, *_ = corpus
    assert build_label_map(["b", None, "a", "b"]) == {"b": 0, "a": 1} and build_label_map({"b", "a"}) == {
        "a": 0,
        "b": 1,
    }
    assert label_to_id(None, {"a": 0}) == -1
    with pytest.raises(ValueError, match="'zebra'"):
        label_to_id("zebra", {"a": 0})
    md = load_manifest(root / "paired.jsonl", verbose=False)
    ds = ImageTextDataset(md, transform=eval_transform(8), label_map=["no DR", "mild DR", "glaucoma"])
    items = [ds[i] for i in range(len(ds))]
    assert [it["id"] for it in items] == [r["id"] for r in paired] and [it["text"] for it in items] == [
        r["text"] for r in paired
    ]
    assert [it["label_id"] for it in items] == [
        {"no DR": 0, "mild DR": 1, "glaucoma": 2, None: -1}[r["label"]] for r in paired
    ]
    assert ImageTextDataset(md, transform=eval_transform(8)).label_map == {
        "glaucoma": 0,
        "mild DR": 1,
        "no DR": 2,
    }
    u = ImageDataset(load_manifest(root / "unpaired.jsonl", verbose=False), transform=eval_transform(8))
    assert set(u[0]) == {"image", "id"} and u[0]["image"].shape == (3, 8, 8)
    nt = ImageTextDataset(load_manifest(root / "unpaired.jsonl", verbose=False), transform=eval_transform(8))
    with pytest.raises(BadRecordError, match="no text"):
        nt[0]


# ----------------------------------------------------------------------------------------------- the two-stream loader
def test_batches_shapes_tokens_labels(corpus):
    root, paired, unpaired, labels = corpus
    L = loader(root, bp=4, bu=5)
    assert len(L) == 6  # 30 unpaired // 5
    byid = {r["id"]: r for r in paired}
    for b, m in L.iter_with_meta():
        assert (
            isinstance(b, Batch)
            and b.paired_images.shape == (4, 3, 8, 8)
            and b.unpaired_images.shape == (5, 3, 8, 8)
        )
        assert (
            b.input_ids.shape[0] == 4
            and b.input_ids.shape == b.attention_mask.shape
            and b.input_ids.dtype == torch.long
        )
        assert b.texts == [byid[i]["text"] for i in m["paired_ids"]]
        assert torch.equal(b.input_ids, torch.tensor(tok(b.texts)["input_ids"]))
        assert b.labels.tolist() == [
            labels.index(byid[i]["label"]) if byid[i]["label"] else -1 for i in m["paired_ids"]
        ]


def test_epoch_is_one_pass_over_unpaired_and_paired_is_endless(corpus):
    root, paired, unpaired, _ = corpus
    L = loader(root, bp=5, bu=5)
    e0, e1 = run(L), run(L)
    assert L.epoch == 2 and len(e0) == len(e1) == 6
    for ep in (e0, e1):
        ids = [u for _, us, _ in ep for u in us]
        assert sorted(ids) == sorted(r["id"] for r in unpaired)  # every unpaired image exactly once
    assert [u for _, us, _ in e0 for u in us] != [u for _, us, _ in e1 for u in us]  # re-shuffled per epoch
    stream = [p for ps, _, _ in e0 + e1 for p in ps]  # 60 = 5 paired epochs of 12
    blocks = [stream[i : i + 12] for i in range(0, 60, 12)]
    assert all(sorted(b) == sorted(r["id"] for r in paired) for b in blocks)
    assert len({tuple(b) for b in blocks}) == 5  # a new permutation each paired epoch


def test_paired_only_and_unpaired_only(corpus):
    root, paired, unpaired, _ = corpus
    L = loader(root, bp=4, bu=None)
    ep = run(L)
    assert len(L) == 3 and sorted(p for ps, _, _ in ep for p in ps) == sorted(r["id"] for r in paired)
    assert all(b.unpaired_images is None and b.n_unpaired == 0 for _, _, b in ep)
    L = loader(root, bp=0, bu=7)
    ep = run(L)
    assert len(L) == 4 and all(
        b.paired_images is None and b.input_ids is None and b.n_unpaired == 7 for _, _, b in ep
    )
    L = loader(root, bp=4, bu=0)  # unpaired manifest given but Bu = 0
    assert len(L) == 3 and L.unpaired is None
    with pytest.raises(ValueError, match="both batch sizes are 0"):
        loader(root, bp=0, bu=0)
    with pytest.raises(ValueError, match="0 steps per epoch"):
        loader(root, bp=4, bu=31)
    ev = loader(root, bp=4, bu=7, train=False)  # eval: no drop_last, no shuffle
    ids = [u for _, us, _ in run(ev) for u in us]
    assert len(ev) == 5 and ids == [r["id"] for r in unpaired]


def test_distributed_shards_disjoint_and_cover(corpus):
    root, paired, unpaired, _ = corpus
    Ls = [loader(root, bp=2, bu=5, rank=r, world_size=2) for r in (0, 1)]
    assert len(Ls[0]) == len(Ls[1]) == 3  # 15 per rank // 5
    eps = [run(L) for L in Ls]
    u = [[x for _, us, _ in ep for x in us] for ep in eps]
    assert not set(u[0]) & set(u[1]) and sorted(u[0] + u[1]) == sorted(r["id"] for r in unpaired)
    p = [[x for ps, _, _ in ep for x in ps] for ep in eps]  # 6 per rank = one paired shard each
    assert not set(p[0]) & set(p[1]) and sorted(p[0] + p[1]) == sorted(r["id"] for r in paired)
    # odd size: the sampler pads, so the two shards cover the data with at most one repeat
    Ls = [loader(root, bp=None, bu=1, rank=r, world_size=4, train=False) for r in range(4)]
    ids = [x for L in Ls for _, us, _ in run(L) for x in us]
    assert len(ids) == 32 and set(ids) == {r["id"] for r in unpaired} and max(Counter(ids).values()) == 2
    with pytest.raises(ValueError, match="rank"):
        loader(root, rank=2, world_size=2)


def test_deterministic_for_a_seed(corpus):
    root, *_ = corpus
    a, b, c = run(loader(root, seed=3)), run(loader(root, seed=3)), run(loader(root, seed=4))
    assert [x[:2] for x in a] == [x[:2] for x in b] and [x[:2] for x in a] != [x[:2] for x in c]
    assert all(
        torch.equal(x[2].paired_images, y[2].paired_images)
        and torch.equal(x[2].unpaired_images, y[2].unpaired_images)
        for x, y in zip(a, b)
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_decoded_image_cache_gives_the_same_batches(corpus, workers):
    "data.cache_mb (issue 21): three epochs with hflip and crops are bit-identical with and without the cache."
    root, *_ = corpus
    kw = dict(bp=4, bu=5, seed=5, hflip=0.5, num_workers=workers)
    plain, cached = loader(root, **kw), loader(root, cache_mb=4, **kw)
    a, b = [x for _ in range(3) for x in run(plain)], [x for _ in range(3) for x in run(cached)]
    assert [x[:2] for x in a] == [x[:2] for x in b] and len(a) == 18
    for (_, _, x), (_, _, y) in zip(a, b):
        assert torch.equal(x.paired_images, y.paired_images) and torch.equal(
            x.unpaired_images, y.unpaired_images
        )
        assert x.texts == y.texts and torch.equal(x.input_ids, y.input_ids)
    # in-process, the cache holds every record (12 paired, 30 unpaired) after the first epoch
    if workers == 0:
        assert len(cached.paired._rows) == 12 and len(cached.unpaired._rows) == 30
        assert cached.unpaired._cached_bytes > 0


def test_loader_leaves_global_rng_alone(corpus):
    root, *_ = corpus
    torch.manual_seed(123)
    state = torch.get_rng_state()
    run(loader(root))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("workers", [0, 2])
def test_state_dict_resume_is_exact(corpus, workers):
    root, *_ = corpus
    kw = dict(bp=5, bu=4, seed=11, text_fn=text_from_label, num_workers=workers)
    ref = loader(root, **kw)
    full = run(ref) + run(ref)  # two epochs of 7 steps
    L = loader(root, **kw)
    run(L, 3)
    run(L, 2)  # stop mid epoch 0 (after step 5 of 7)
    st = json.loads(json.dumps(L.state_dict()))  # survives JSON (checkpoint metadata)
    assert (st["epoch"], st["step"]) == (0, 5) and st["paired_position"] == [
        2,
        1,
    ]  # 25 paired = 2 epochs of 12 + 1
    R = loader(root, **kw)
    R.load_state_dict(st)
    rest = run(R) + run(R)
    assert len(rest) == len(full) - 5
    for (p1, u1, b1), (p2, u2, b2) in zip(full[5:], rest):
        assert (p1, u1) == (p2, u2) and b1.texts == b2.texts
        assert torch.equal(b1.paired_images, b2.paired_images) and torch.equal(
            b1.unpaired_images, b2.unpaired_images
        )
        assert torch.equal(b1.input_ids, b2.input_ids) and torch.equal(b1.labels, b2.labels)
    # set_epoch(1) reproduces epoch 1 as well
    S = loader(root, **kw)
    S.set_epoch(1)
    assert [x[:2] for x in run(S)] == [x[:2] for x in full[7:]]


def test_load_state_dict_refuses_other_config(corpus):
    root, *_ = corpus
    st = loader(root, bp=4, bu=5).state_dict()
    with pytest.raises(ValueError, match="batch_size_paired saved 4 != now 3"):
        loader(root, bp=3, bu=5).load_state_dict(st)
    with pytest.raises(ValueError, match="world_size"):
        loader(root, bp=4, bu=5, rank=0, world_size=2).load_state_dict(st)
    with pytest.warns(UserWarning):
        loader(root, bp=3, bu=5).load_state_dict(st, strict=False)


def test_on_the_fly_text_changes_per_epoch_but_is_seeded(corpus):
    root, *_ = corpus
    L = loader(root, bp=12, bu=5, text_fn=text_from_label)
    e0, e1 = run(L), run(L)
    t0 = {p: t for ps, _, b in e0 for p, t in zip(ps, b.texts)}
    t1 = {p: t for ps, _, b in e1 for p, t in zip(ps, b.texts)}
    assert t0["p0"].startswith("no DR variant") and t0["p0"] != t1["p0"]
    again = run(loader(root, bp=12, bu=5, text_fn=text_from_label))
    assert [b.texts for _, _, b in again] == [b.texts for _, _, b in e0]


# ----------------------------------------------------------------------------------------------- imagefolder, records
def test_load_imagefolder_metadata_and_class_folders(tmp_path):
    root = tmp_path / "ifold"
    for split in ("train", "test"):
        save_img(root / split / "a.png")
        save_img(root / split / "sub" / "b.png")
        (root / split / "metadata.csv").write_text(
            "file_name,text,label,site\na.png,a report,glaucoma,x\nsub/b.png,,normal,y\n"
        )
    md = load_imagefolder(root, verbose=False)
    ds = md.dataset
    assert ds["image"] == ["test/a.png", "test/sub/b.png", "train/a.png", "train/sub/b.png"]
    assert ds["id"] == ["test/a", "test/sub/b", "train/a", "train/sub/b"] and ds["split"] == [
        "test",
        "test",
        "train",
        "train",
    ]
    assert (
        ds["text"] == ["a report", None] * 2
        and ds["label"] == ["glaucoma", "normal"] * 2
        and ds["site"] == ["x", "y"] * 2
    )
    L = make_loader(
        root,
        None,
        image_size=8,
        batch_size_paired=2,
        batch_size_unpaired=0,
        verbose=False,
        train=False,
        on_bad_record="skip",
    )  # a folder is read as an imagefolder; rows
    assert sorted(x for _, m in L.iter_with_meta() for x in m["paired_ids"]) == [
        "test/a",
        "train/a",
    ]  # without text skipped
    (root / "train" / "metadata.csv").write_text("file_name,text\na.png,t\nmissing.png,t\n")
    with pytest.raises(BadRecordError) as ei:
        load_imagefolder(root, verbose=False)
    assert "train/metadata.csv:3" in str(ei.value) and "missing.png" in str(ei.value)
    cf = tmp_path / "classes"
    save_img(cf / "cat_a" / "1.png")
    save_img(cf / "cat_b" / "2.jpg", fmt="JPEG")
    md = load_imagefolder(cf, verbose=False)
    assert md.dataset["label"] == ["cat_a", "cat_b"] and md.dataset["image"] == ["cat_a/1.png", "cat_b/2.jpg"]


def test_load_records_and_validate_record(tmp_path):
    save_img(tmp_path / "a.png")
    md = load_records(
        [dict(id="x", image="a.png", label="l"), dict(id="y", image="b.png")],
        tmp_path,
        on_bad_record="skip",
        verbose=False,
    )
    assert md.dataset["id"] == ["x"] and md.report.by_reason() == {"missing_file": 1}
    r = validate_record({"id": 5, "image": "a.png", "labels": '["p", "q"]', "label": 3}, tmp_path)
    assert (r["id"], r["labels"], r["label"]) == ("5", ["p", "q"], "3")
    with pytest.raises(BadRecordError, match="text must be a string"):
        validate_record({"id": "a", "image": "a.png", "text": 5}, tmp_path)


def test_rank0_loader_state_resumes_every_rank(tmp_path):
    "The trainer saves rank 0's loader state only: loaded into rank 1, it continues rank 1's own batches."
    from maskedclip.data import make_loader, write_manifest

    (tmp_path / "imgs").mkdir()
    for i in range(12):
        Image.new("RGB", (8, 8), (20 * i, 50, 90)).save(tmp_path / "imgs" / f"{i}.png")
    write_manifest([dict(id=f"u{i}", image=f"imgs/{i}.png") for i in range(12)], tmp_path / "u.jsonl")
    mk = lambda r: make_loader(
        None, tmp_path / "u.jsonl", image_size=8, batch_size_unpaired=2, rank=r, world_size=2, verbose=False
    )
    full = [m["unpaired_ids"] for _, m in mk(1).iter_with_meta()]
    r0 = mk(0)
    it = r0.iter_with_meta()
    next(it), next(it)
    r1 = mk(1)
    r1.load_state_dict(r0.state_dict())
    assert [m["unpaired_ids"] for _, m in r1.iter_with_meta()] == full[2:]
