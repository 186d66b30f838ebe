"""The supervised reference row (D24) and the distillation-target switch (D25) against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskedclip.config import METHODS, ConfigError, DataConfig, ExperimentConfig, TrainConfig, get_preset
from maskedclip.data import Batch
from maskedclip.model import MaskedCLIP, normalize_targets


def test_supervised_config_takes_its_classes_from_the_data():
    cfg = ExperimentConfig(
        model=get_preset("tiny", "supervised"), data=DataConfig(synthetic=True), train=TrainConfig(steps=1)
    )
    assert cfg.model.use_supervised and cfg.model.supervised_classes == 5
    assert not (cfg.model.use_mim or cfg.model.use_clip or cfg.model.use_bridge or cfg.model.use_mfd)
    cfg = ExperimentConfig(
        model=get_preset("tiny", "supervised"), data=DataConfig(paired="p.jsonl", label_space=["a", "b", "c"])
    )
    assert cfg.model.supervised_classes == 3
    with pytest.raises(ConfigError, match="data.label_space"):
        ExperimentConfig(model=get_preset("tiny", "supervised"), data=DataConfig(paired="p.jsonl"))
    # leaving 'supervised' for another method switches the head off
    assert not get_preset("tiny", "supervised").with_method("mae").use_supervised
    assert all("use_supervised" in sw for sw in METHODS.values())


def test_supervised_loss_is_cross_entropy_of_the_mean_patch_token():
    torch.manual_seed(0)
    m = MaskedCLIP(get_preset("tiny", "supervised").replace(supervised_classes=4), pretrained_text=False)
    assert m.decoder is None and m.text is None and m.bridge is None and m.classifier is not None
    x = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 3, -1, 2, 1, -1])
    m.eval()  # no drop path: the reference below sees the same encoder
    out = m(Batch(paired_images=x, labels=y, unpaired_images=torch.randn(2, 3, 64, 64)))
    feats = m.encoder(x).tokens[:, 1:].mean(1)
    logits = m.classifier[1](
        F.layer_norm(feats, feats.shape[-1:], m.classifier[0].weight, m.classifier[0].bias)
    )
    keep = y >= 0
    logp = torch.log_softmax(logits[keep], -1)
    k = logits.shape[1]
    ref = -(
        0.9 * logp.gather(1, y[keep, None]).squeeze(1) + 0.1 / k * logp.sum(1)
    ).mean()  # label smoothing 0.1
    assert set(out.parts) == {"sup"} and torch.allclose(out.loss, ref, atol=1e-5)
    out.loss.backward()
    assert m.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="outside the head"):
        m(Batch(paired_images=x[:1], labels=torch.tensor([4])))


def test_normalize_targets_against_numpy():
    t = torch.randn(3, 16, 8, generator=torch.Generator().manual_seed(0)) * 3 + 1
    a = t.numpy().astype(np.float64)
    ln = (a - a.mean(-1, keepdims=True)) / np.sqrt(a.var(-1, keepdims=True) + 1e-6)
    inorm = (a - a.mean(1, keepdims=True)) / np.sqrt(a.var(1, keepdims=True) + 1e-6)
    assert np.allclose(normalize_targets(t, "teacher_ln").numpy(), ln, atol=1e-4)
    assert np.allclose(normalize_targets(t, "teacher_in").numpy(), inorm, atol=1e-4)
    assert normalize_targets(t, "teacher") is t and normalize_targets(t, "encoder") is t
    with pytest.raises(ValueError, match="mfd_target"):
        normalize_targets(t, "bogus")
    with pytest.raises(ConfigError, match="mfd_target"):
        get_preset("tiny").replace(mfd_target="bogus")


def test_mfd_loss_uses_the_chosen_target():
    torch.manual_seed(0)
    m = MaskedCLIP(get_preset("tiny", "maskedclip").replace(mfd_target="teacher_in"), pretrained_text=False)
    m.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    noise = torch.rand(2, m.config.vision.num_patches, generator=torch.Generator().manual_seed(3))
    tok = m.tokenize(["a normal fundus.", "drusen."])
    b = Batch(
        paired_images=x,
        input_ids=torch.as_tensor(tok["input_ids"]),
        attention_mask=torch.as_tensor(tok["attention_mask"]),
        labels=torch.tensor([0, 1]),
    )
    out = m(b, mask_noise=noise)
    enc = m.encoder(x, mask_ratio=m.config.mask_ratio, noise=noise)
    pred = m.feature_decoder(enc.tokens, enc.ids_restore)
    t = m.teacher(x)
    t = (t - t.mean(1, keepdim=True)) / (t.var(1, keepdim=True, unbiased=False) + 1e-6).sqrt()
    assert torch.allclose(out.parts["mfd"], -F.cosine_similarity(pred, t, dim=-1).mean(), atol=1e-5)


def test_encoder_target_teacher_is_ema_of_the_encoder_alone():
    torch.manual_seed(0)
    m = MaskedCLIP(get_preset("tiny", "maskedclip").replace(mfd_target="encoder"), pretrained_text=False)
    assert m.teacher.bridge is None and m.feature_decoder.head.out_features == m.config.vision.width
    x = torch.randn(2, 3, 64, 64)
    assert m.teacher(x).shape == (2, m.config.vision.num_patches, m.config.vision.width)
    before = [p.clone() for p in m.teacher.parameters()]
    with torch.no_grad():
        for p in m.encoder.parameters():
            p.add_(1.0)
    m.update_teacher(0.9)
    for b0, t, s in zip(before, m.teacher.parameters(), m.encoder.parameters()):
        assert torch.allclose(t, 0.9 * b0 + 0.1 * s, atol=1e-6)
    assert len(before) == len(list(m.encoder.parameters()))
    m.reset_teacher()
    assert all(torch.equal(t, s) for t, s in zip(m.teacher.parameters(), m.encoder.parameters()))
