"Patchify, masking and timm compatibility of the image encoder."

import math

import pytest
import timm
import torch

from maskedclip.config import VisionConfig, get_preset
from maskedclip.vision import (
    ViTEncoder,
    load_timm_weights,
    patchify,
    random_masking,
    sincos_pos_embed,
    timm_vit,
    unpatchify,
)


@pytest.mark.parametrize("c,size,p", [(3, 32, 8), (1, 48, 16), (3, 64, 4)])
def test_patchify_roundtrip_and_order(c, size, p):
    imgs = torch.randn(2, c, size, size)
    x = patchify(imgs, p)
    assert x.shape == (2, (size // p) ** 2, p * p * c)
    assert torch.equal(unpatchify(x, p, c), imgs)
    # independent reference: patch (i, j) is imgs[:, :, i*p:(i+1)*p, j*p:(j+1)*p] flattened channel-last
    g = size // p
    for idx in (0, 1, g, g * g - 1):
        i, j = divmod(idx, g)
        ref = imgs[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p].permute(0, 2, 3, 1).reshape(2, -1)
        assert torch.equal(x[:, idx], ref)


def test_patchify_rejects_bad_size():
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 3, 30, 30), 8)


@pytest.mark.parametrize("L,r", [(196, 0.75), (64, 0.75), (49, 0.5), (10, 0.33)])
def test_random_masking_semantics(L, r):
    n, d = 5, 3
    x = torch.randn(n, L, d)
    xv, mask, ids_restore = random_masking(x, r, torch.Generator().manual_seed(1))
    keep = int(L * (1 - r))
    assert xv.shape == (n, keep, d)
    assert (mask.sum(1) == L - keep).all() and set(mask.unique().tolist()) <= {0.0, 1.0}
    # masks differ between samples
    assert len({tuple(m.tolist()) for m in mask}) == n
    # ids_restore inverts the shuffle: the kept tokens sit exactly where mask == 0
    for i in range(n):
        kept_rows = {tuple(v.tolist()) for v in xv[i]}
        assert kept_rows == {tuple(x[i, l].tolist()) for l in range(L) if mask[i, l] == 0}
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(L).expand(n, L))


def test_masking_is_uniform_over_positions():
    # every position is removed with probability r (chi-square-free check with a wide tolerance)
    x = torch.zeros(4000, 16, 1)
    _, mask, _ = random_masking(x, 0.75, torch.Generator().manual_seed(0))
    freq = mask.mean(0)
    assert torch.allclose(freq, torch.full((16,), 0.75), atol=0.03)


def test_sincos_matches_float64_formula():
    dim, g = 16, 3
    pe = sincos_pos_embed(dim, g).double()
    for idx in range(g * g):
        row, col = divmod(idx, g)
        ref = []
        for pos in (col, row):  # first half encodes the column (w), second half the row (h)
            omega = [1.0 / 10000 ** (i / (dim / 4)) for i in range(dim // 4)]
            ref += [math.sin(pos * w) for w in omega] + [math.cos(pos * w) for w in omega]
        assert torch.allclose(pe[1 + idx], torch.tensor(ref, dtype=torch.float64), atol=1e-6)


def test_encoder_state_dict_loads_strictly_into_timm_and_back():
    cfg = get_preset("tiny").vision
    enc = ViTEncoder(cfg).eval()
    tv = timm_vit(cfg).eval()
    tv.load_state_dict(enc.state_dict(), strict=True)
    back = ViTEncoder(cfg).eval()
    back.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(tv.forward_features(x), enc(x).tokens, atol=1e-5)
        assert torch.allclose(back(x).tokens, enc(x).tokens, atol=1e-6)


def test_load_timm_checkpoint_file_with_resampling(tmp_path):
    # a timm ViT at 32 px (4x4 grid) with a head and fc_norm, saved the way MAE/RETFound ship weights
    src_cfg = VisionConfig(image_size=32, patch_size=8, width=64, depth=2, heads=2)
    src = timm_vit(src_cfg, global_pool="avg")  # RETFound-style: fc_norm + head
    src.reset_classifier(5)
    torch.save({"model": src.state_dict()}, tmp_path / "ckpt.pth")
    enc = ViTEncoder(VisionConfig(image_size=64, patch_size=8, width=64, depth=2, heads=2))
    rep = load_timm_weights(enc, tmp_path / "ckpt.pth")
    assert rep.resampled and "4x4 -> 8x8" in rep.resampled[0]
    assert (
        set(rep.unexpected) == {"head"}
        and "head.weight" in rep.unexpected["head"]
        and "fc_norm.weight" in rep.unexpected["head"]
    )
    # a fine-tuned (global-pool) checkpoint has fc_norm instead of the encoder's final norm: reported, not hidden
    assert rep.missing == ["norm.bias", "norm.weight"]
    assert torch.equal(enc.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_timm_weights(enc, tmp_path / "nope.pth")


def test_paper_encoder_has_vit_large_parameter_count():
    from maskedclip.model import MaskedCLIP

    with torch.device("meta"):
        model = MaskedCLIP(get_preset("paper"), pretrained_text=False)
        ref = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0)
    n = sum(p.numel() for p in model.encoder.parameters())
    assert n == sum(p.numel() for p in ref.parameters())
    assert 300e6 < n < 310e6
    # the text tower has Bio_ClinicalBERT's architecture (BERT-base cased, vocab 28,996), built without files
    assert model.text.model.config.vocab_size == 28996 and model.text.model.config.num_hidden_layers == 12
