"""Linear-probe features under autocast (issue 21, D37): bf16 features agree with fp32 ones, are pooled in fp32,
and `evaluate_all(precision=...)` reaches the extraction."""

import numpy as np
import pandas as pd
import pytest
import torch

from maskedclip.config import VisionConfig
from maskedclip.evaluate import evaluate_all, extract_features
from maskedclip.train import native_bf16
from maskedclip.vision import ViTEncoder

pytestmark = pytest.mark.usefixtures("one_thread")

VC = VisionConfig(image_size=32, patch_size=8, width=64, depth=2, heads=2)


def _images(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [dict(image=torch.rand(3, 32, 32, generator=g)) for _ in range(n)]


def test_fp32_is_the_default_and_bf16_features_agree():
    torch.manual_seed(0)
    enc = ViTEncoder(VC)
    data = _images()
    ref = extract_features(enc, data, batch_size=8)
    np.testing.assert_array_equal(ref, extract_features(enc, data, batch_size=8, precision="fp32"))
    if not native_bf16("cpu"):
        pytest.skip("no native bf16 on this CPU: 'auto' is fp32 here")
    b = extract_features(enc, data, batch_size=8, precision="bf16")
    assert b.dtype == np.float32 and b.shape == ref.shape
    assert not np.array_equal(b, ref)  # autocast really ran
    rel = np.linalg.norm(b - ref) / np.linalg.norm(ref)
    assert rel < 2e-2, rel
    # per image, the feature vectors point the same way (what a standardised linear probe sees)
    cos = (b * ref).sum(1) / (np.linalg.norm(b, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() > 0.999
    # 'auto' = bf16 on a processor with native bf16
    np.testing.assert_array_equal(b, extract_features(enc, data, batch_size=8, precision="auto"))


def test_bad_precision_is_one_clear_error(tmp_path):
    (tmp_path / "tasks").mkdir()
    with pytest.raises(ValueError, match="precision: 'half'"):
        evaluate_all({"r": "random"}, corpus_root=tmp_path, vision_config=VC, precision="half", log=None)
    with pytest.raises(ValueError, match="precision: 'half'"):
        extract_features(ViTEncoder(VC), _images(2), precision="half")


def test_evaluate_all_probe_under_bf16_matches_fp32(tmp_path):
    from test_evaluate import _toy_corpus

    corpus = _toy_corpus(tmp_path / "c", {"glaucoma": ["no glaucoma", "glaucoma"]}, n=(16, 8, 16))
    kw = dict(
        tasks=["glaucoma"],
        fractions=[1.0],
        seeds=[0],
        corpus_root=corpus,
        vision_config=VisionConfig(image_size=32, patch_size=8, width=64, depth=2, heads=2),
        n_boot=50,
        progress=False,
        log=None,
    )
    a = evaluate_all({"random": "random"}, precision="fp32", **kw)
    pd.testing.assert_frame_equal(
        a.drop(columns="seconds"), evaluate_all({"random": "random"}, **kw).drop(columns="seconds")
    )
    b = evaluate_all({"random": "random"}, precision="auto", **kw)
    assert abs(float(a["auroc"].iloc[0]) - float(b["auroc"].iloc[0])) < 0.1
