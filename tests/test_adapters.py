"""Adapters: tiny fixture trees with the published file names / CSV headers -> records with the right labels."""

import os
import warnings
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from PIL import Image

from maskedclip.data import (
    ADAPTERS,
    DR_GRADES,
    JSIEC_CLASSES,
    JSIEC_FOLDERS,
    LABEL_SPACES,
    assign_splits,
    load_manifest,
    read_airogs,
    read_aptos2019,
    read_eyepacs,
    read_glaucoma_fundus,
    read_idrid_grading,
    read_jsiec,
    read_messidor2,
    read_odir5k,
    read_origa,
    read_retina_cataract,
    write_manifest,
)


def img(path: Path, fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (140, 70, 30)).save(
        path, fmt or ("JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else None)
    )
    return path


def text(path: Path, s: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(s, encoding="utf-8")
    return path


def roundtrip(recs, root, name):
    "Every record of an adapter passes load_manifest with the adapter's label space."
    md = load_manifest(
        write_manifest(recs, root / f"{name}.jsonl"), label_space=LABEL_SPACES[name], verbose=False
    )
    assert md.report.kept == len(recs) and md.report.n_skipped == 0
    return md


def test_registry():
    assert (
        set(ADAPTERS)
        == {
            "eyepacs",
            "aptos2019",
            "idrid_grading",
            "messidor2",
            "odir5k",
            "airogs",
            "origa",
            "glaucoma_fundus",
            "jsiec",
            "retina_cataract",
        }
        == set(LABEL_SPACES)
    )
    assert all(f.__name__ == f"read_{k}" for k, f in ADAPTERS.items())
    assert DR_GRADES == ("no DR", "mild DR", "moderate DR", "severe DR", "proliferative DR")
    assert len(JSIEC_FOLDERS) == len(set(JSIEC_CLASSES)) == 39


def test_eyepacs(tmp_path):
    r = tmp_path / "eyepacs"
    text(r / "trainLabels.csv", "image,level\n10_left,0\n10_right,4\n13_left,2\n15_right,1\n16_left,3\n")
    text(r / "retinopathy_solution.csv", "image,level,Usage\n1_left,1,Private\n")
    for n in ("10_left", "10_right", "13_left", "15_right", "16_left"):
        img(r / "train" / f"{n}.jpeg")
    img(r / "test" / "1_left.jpeg")
    recs = read_eyepacs(r)
    assert [(x["id"], x["image"], x["label"], x["split"]) for x in recs[:3]] == [
        ("eyepacs/10_left", "train/10_left.jpeg", "no DR", "train"),
        ("eyepacs/10_right", "train/10_right.jpeg", "proliferative DR", "train"),
        ("eyepacs/13_left", "train/13_left.jpeg", "moderate DR", "train"),
    ]
    assert [x["label"] for x in recs] == ["no DR", "proliferative DR", "moderate DR", "mild DR", "severe DR"]
    recs = read_eyepacs(r, include_test=True)
    assert recs[-1] == dict(
        id="eyepacs/1_left",
        image="test/1_left.jpeg",
        text=None,
        label="mild DR",
        labels=None,
        source="eyepacs",
        split="test",
        usage="Private",
    )
    roundtrip(recs, r, "eyepacs")
    text(r / "trainLabels.csv", "image,level\n10_left,7\n")
    with pytest.raises(ValueError, match=r"trainLabels.csv:2: level .7. is not a DR grade"):
        read_eyepacs(r)
    text(r / "trainLabels.csv", "img,grade\n10_left,1\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['image', 'level'\]"):
        read_eyepacs(r)


def test_aptos2019(tmp_path):
    r = tmp_path / "aptos"
    text(r / "train.csv", "id_code,diagnosis\n000c1434d8d7,2\n001639a390f0,4\n0024cdab0c1e,1\n")
    text(r / "test.csv", "id_code\n0005cfc8afb6\n")
    for n in ("000c1434d8d7", "001639a390f0", "0024cdab0c1e"):
        img(r / "train_images" / f"{n}.png")
    recs = read_aptos2019(r)
    assert [(x["image"], x["label"]) for x in recs] == [
        ("train_images/000c1434d8d7.png", "moderate DR"),
        ("train_images/001639a390f0.png", "proliferative DR"),
        ("train_images/0024cdab0c1e.png", "mild DR"),
    ]
    roundtrip(recs, r, "aptos2019")


def test_idrid_grading(tmp_path):
    r = tmp_path / "IDRiD"
    g = r / "B. Disease Grading"
    # the published csv: trailing space in the last header and many empty trailing columns / rows
    text(
        g / "2. Groundtruths" / "a. IDRiD_Training Set.csv",
        "Image name,Retinopathy grade,Risk of macular edema ,,,,\nIDRiD_001,3,2,,,,\nIDRiD_002,0,0,,,,\n,,,,,,\n",
    )
    text(
        g / "2. Groundtruths" / "b. IDRiD_Testing Set.csv",
        "Image name,Retinopathy grade,Risk of macular edema \nIDRiD_001,4,1\n",
    )
    img(g / "1. Original Images" / "a. Training Set" / "IDRiD_001.jpg")
    img(g / "1. Original Images" / "a. Training Set" / "IDRiD_002.jpg")
    img(g / "1. Original Images" / "b. Testing Set" / "IDRiD_001.jpg")
    recs = read_idrid_grading(r)
    assert [(x["image"], x["label"], x["split"], x["dme_risk"]) for x in recs] == [
        ("B. Disease Grading/1. Original Images/a. Training Set/IDRiD_001.jpg", "severe DR", "train", 2),
        ("B. Disease Grading/1. Original Images/a. Training Set/IDRiD_002.jpg", "no DR", "train", 0),
        ("B. Disease Grading/1. Original Images/b. Testing Set/IDRiD_001.jpg", "proliferative DR", "test", 1),
    ]
    # the test set reuses the names IDRiD_001.. of the training set: ids carry the split
    assert [x["id"] for x in recs] == [
        "idrid/train/IDRiD_001",
        "idrid/train/IDRiD_002",
        "idrid/test/IDRiD_001",
    ]
    roundtrip(recs, r, "idrid_grading")
    assert [x["image"] for x in read_idrid_grading(g, relative_to=r)] == [
        x["image"] for x in recs
    ]  # root = part B itself


def test_messidor2(tmp_path):
    r = tmp_path / "messidor2"
    text(
        r / "messidor_data.csv",
        "image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable\n"
        "20051020_43808_0100_PP.png,0.0,0.0,1\nIM002385.JPG,3,1,1\n20051020_55701_0100_PP.png,2,0,1\n20051205_33025_0400_PP.png,,,0\n",
    )
    img(r / "messidor-2" / "preprocess" / "20051020_43808_0100_PP.png")
    img(r / "IMAGES" / "IM002385.jpg")  # case differs from the csv
    img(r / "IMAGES" / "20051020_55701_0100_PP.tif")  # original .tif, csv says .png: matched by stem
    img(r / "IMAGES" / "20051205_33025_0400_PP.png")
    with pytest.warns(UserWarning, match="left out 1 ungradable"):
        recs = read_messidor2(r)
    assert [(x["id"], x["image"], x["label"], x["dme"]) for x in recs] == [
        ("messidor2/20051020_43808_0100_PP", "messidor-2/preprocess/20051020_43808_0100_PP.png", "no DR", 0),
        ("messidor2/IM002385", "IMAGES/IM002385.jpg", "severe DR", 1),
        ("messidor2/20051020_55701_0100_PP", "IMAGES/20051020_55701_0100_PP.tif", "moderate DR", 0),
    ]
    roundtrip(recs, r, "messidor2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recs = read_messidor2(r, include_ungradable=True)
    assert (recs[-1]["label"], recs[-1]["gradable"]) == (None, False) and len(recs) == 4


def test_odir5k(tmp_path):
    r = tmp_path / "odir"
    header = (
        "ID,Patient Age,Patient Sex,Left-Fundus,Right-Fundus,Left-Diagnostic Keywords,Right-Diagnostic Keywords,"
        "N,D,G,C,A,H,M,O,filepath,labels,target,filename\n"
    )
    rows = [
        "0,69,Female,0_left.jpg,0_right.jpg,cataract,normal fundus,0,0,0,1,0,0,0,0,x,['N'],\"[1, 0]\",0_right.jpg\n",
        "0,69,Female,0_left.jpg,0_right.jpg,cataract,normal fundus,0,0,0,1,0,0,0,0,x,['C'],\"[0, 1]\",0_left.jpg\n",
        '1,57,Male,1_left.jpg,1_right.jpg,"moderate non proliferative retinopathy，hypertensive retinopathy",'
        '"laser spot，moderate non proliferative retinopathy",0,1,0,0,0,1,0,1,x,[\'D\'],"[0, 1]",1_left.jpg\n',
    ]
    text(r / "full_df.csv", header + "".join(rows))
    for n in ("0_left", "0_right", "1_left", "1_right"):
        img(r / "ODIR-5K" / "ODIR-5K" / "Training Images" / f"{n}.jpg")
        img(r / "preprocessed_images" / f"{n}.jpg")
    recs = read_odir5k(r)
    assert len(recs) == 4  # one record per fundus image, duplicates merged
    by = {x["id"]: x for x in recs}
    assert by["odir5k/0_left"]["text"] == "cataract" and by["odir5k/0_right"]["labels"] == ["normal fundus"]
    one = by["odir5k/1_left"]
    assert (
        one["text"] == "moderate non proliferative retinopathy, hypertensive retinopathy"
        and one["label"] is None
    )
    assert one["labels"] == ["moderate non proliferative retinopathy", "hypertensive retinopathy"]
    assert (one["eye"], one["patient_id"], one["patient_labels"]) == ("left", "1", ["D", "H", "O"])
    assert (
        one["image"] == "ODIR-5K/ODIR-5K/Training Images/1_left.jpg"
    )  # original preferred over preprocessed
    assert by["odir5k/1_right"]["text"] == "laser spot, moderate non proliferative retinopathy"
    md = roundtrip(recs, r, "odir5k")
    assert md.dataset["text"] == [x["text"] for x in recs]
    text(r / "full_df.csv", header + rows[0] + rows[0].replace("cataract", "glaucoma"))
    with pytest.raises(ValueError, match="0_left.jpg has keywords"):
        read_odir5k(r)


def test_airogs(tmp_path):
    r = tmp_path / "airogs"
    text(r / "train_labels.csv", "challenge_id,class\nTRAIN000000,NRG\nTRAIN000001,RG\nTRAIN000002,NRG\n")
    img(r / "0" / "TRAIN000000.jpg")
    img(r / "0" / "TRAIN000001.jpg")
    img(r / "1" / "TRAIN000002.jpg")
    recs = read_airogs(r)
    assert [(x["id"], x["image"], x["label"]) for x in recs] == [
        ("airogs/TRAIN000000", "0/TRAIN000000.jpg", "no referable glaucoma"),
        ("airogs/TRAIN000001", "0/TRAIN000001.jpg", "referable glaucoma"),
        ("airogs/TRAIN000002", "1/TRAIN000002.jpg", "no referable glaucoma"),
    ]
    roundtrip(recs, r, "airogs")
    text(
        r / "train_labels.csv", "challenge_id,class\nTRAIN000009,NRG\n"
    )  # image not on disk: still emitted ...
    recs = read_airogs(r)
    with pytest.raises(FileNotFoundError, match="TRAIN000009.jpg"):  # ... so that loading reports it
        load_manifest(write_manifest(recs, r / "m.jsonl"), verbose=False)
    text(r / "train_labels.csv", "challenge_id,class\nTRAIN000000,maybe\n")
    with pytest.raises(ValueError, match="not RG or NRG"):
        read_airogs(r)


def test_origa(tmp_path):
    r = tmp_path / "ORIGA"
    text(
        r / "OrigaList.csv",
        "Filename,ExpCDR,Eye,Set,Glaucoma\n001.jpg,0.7097,OD,A,0\n002.jpg,0.6953,OS,A,1\n003.jpg,0.9629,OS,B,1\n",
    )
    for n in ("001", "002", "003"):
        img(r / "Images" / f"{n}.jpg")
    recs = read_origa(r)
    assert [(x["image"], x["label"], x["cdr"], x["eye"], x["origa_set"]) for x in recs] == [
        ("Images/001.jpg", "no glaucoma", 0.7097, "OD", "A"),
        ("Images/002.jpg", "glaucoma", 0.6953, "OS", "A"),
        ("Images/003.jpg", "glaucoma", 0.9629, "OS", "B"),
    ]
    roundtrip(recs, r, "origa")


def test_glaucoma_fundus(tmp_path):
    r = tmp_path / "GF"
    img(r / "normal_control" / "n1.jpg")
    img(r / "early_glaucoma" / "e1.jpg")
    img(r / "advanced_glaucoma" / "a1.jpg")
    img(r / "advanced_glaucoma" / "a2.JPG")
    recs = read_glaucoma_fundus(r)
    assert [(x["image"], x["label"], x["split"]) for x in recs] == [
        ("advanced_glaucoma/a1.jpg", "advanced glaucoma", None),
        ("advanced_glaucoma/a2.JPG", "advanced glaucoma", None),
        ("early_glaucoma/e1.jpg", "early glaucoma", None),
        ("normal_control/n1.jpg", "no glaucoma", None),
    ]
    roundtrip(recs, r, "glaucoma_fundus")
    # RETFound-style copy with split folders, one level down, and a stray folder (warned, not silently ignored)
    s = tmp_path / "retfound" / "Glaucoma_fundus"
    img(s / "train" / "normal_control" / "n1.png")
    img(s / "test" / "early_glaucoma" / "e1.png")
    img(s / "train" / "misc" / "x.png")
    with pytest.warns(UserWarning, match="misc"):
        recs = read_glaucoma_fundus(tmp_path / "retfound")
    assert [(x["id"], x["image"], x["split"]) for x in recs] == [
        ("glaucoma_fundus/test/early_glaucoma/e1", "Glaucoma_fundus/test/early_glaucoma/e1.png", "test"),
        ("glaucoma_fundus/train/normal_control/n1", "Glaucoma_fundus/train/normal_control/n1.png", "train"),
    ]


def test_jsiec(tmp_path):
    r = tmp_path / "fundusimage1000"
    base = r / "1000images"
    for folder in (
        "0.0.Normal",
        "0.3.DR1",
        "10.0.Possible glaucoma",
        "29.1.Blur fundus with suspected PDR",
        "3.RAO",
    ):
        img(base / folder / f"{folder[:4]}x.jpg")
    img(base / ".hidden" / "junk.jpg")
    recs = read_jsiec(r)
    assert sorted((x["image"], x["label"]) for x in recs) == sorted(
        [
            ("1000images/0.0.Normal/0.0.x.jpg", "Normal"),
            ("1000images/0.3.DR1/0.3.x.jpg", "DR1"),
            ("1000images/10.0.Possible glaucoma/10.0x.jpg", "Possible glaucoma"),
            ("1000images/29.1.Blur fundus with suspected PDR/29.1x.jpg", "Blur fundus with suspected PDR"),
            ("1000images/3.RAO/3.RAx.jpg", "RAO"),
        ]
    )
    roundtrip(recs, r, "jsiec")


def test_retina_cataract(tmp_path):
    r = tmp_path / "cataractdataset"
    for folder, name in [
        ("1_normal", "NL_001.png"),
        ("2_cataract", "cataract_001.png"),
        ("2_glaucoma", "Glaucoma_001.png"),
        ("3_retina_disease", "Retina_001.png"),
    ]:
        img(r / "dataset" / folder / name)
    recs = read_retina_cataract(r)
    assert [(x["image"], x["label"]) for x in recs] == [
        ("dataset/1_normal/NL_001.png", "normal"),
        ("dataset/2_cataract/cataract_001.png", "cataract"),
        ("dataset/2_glaucoma/Glaucoma_001.png", "glaucoma"),
        ("dataset/3_retina_disease/Retina_001.png", "retina disease"),
    ]
    roundtrip(recs, r, "retina_cataract")
    with pytest.raises(FileNotFoundError, match="no class folders"):
        read_retina_cataract(tmp_path / "cataractdataset" / "dataset" / "1_normal")


def test_shared_root_manifest_and_splits(tmp_path):
    "Several datasets under one data root, one paired manifest (relative_to), then a stratified split."
    data = tmp_path / "data"
    text(
        data / "aptos" / "train.csv",
        "id_code,diagnosis\n" + "".join(f"a{i:03d},{i % 5}\n" for i in range(20)),
    )
    for i in range(20):
        img(data / "aptos" / "train_images" / f"a{i:03d}.png")
    text(data / "airogs" / "train_labels.csv", "challenge_id,class\nTRAIN000000,RG\n")
    img(data / "airogs" / "0" / "TRAIN000000.jpg")
    recs = read_aptos2019(data / "aptos", relative_to=data) + read_airogs(data / "airogs", relative_to=data)
    assert (
        recs[0]["image"] == "aptos/train_images/a000.png" and recs[-1]["image"] == "airogs/0/TRAIN000000.jpg"
    )
    md = load_manifest(write_manifest(recs, data / "paired.jsonl"), verbose=False)
    assert len(md) == 21
    with pytest.raises(ValueError, match="not inside relative_to"):
        read_airogs(data / "airogs", relative_to=data / "aptos")
    split = assign_splits(read_aptos2019(data / "aptos"), val=0.25, test=0.25, seed=1, overwrite=True)
    from collections import Counter

    assert Counter(x["split"] for x in split) == {"train": 10, "val": 5, "test": 5}
    assert all(
        Counter(x["split"] for x in split if x["label"] == g) == {"train": 2, "val": 1, "test": 1}
        for g in DR_GRADES
    )
    assert (
        split
        == assign_splits(
            list(reversed(read_aptos2019(data / "aptos"))), val=0.25, test=0.25, seed=1, overwrite=True
        )[::-1]
    )
