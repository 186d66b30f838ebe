"Tests of maskedclip.viz: reconstructions, attention (recomputed vs fused), φ, prompt heatmaps, curves, explorers, report."

import json
import math

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from maskedclip import viz
from maskedclip.config import get_preset
from maskedclip.model import MaskedCLIP
from maskedclip.vision import patchify
from maskedclip.viz import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    attention_explorer,
    attention_figure,
    attention_grid_figure,
    attention_maps,
    attention_rollout,
    attention_rollout_figure,
    attention_weights,
    cls_attention,
    denormalize,
    embedding_projection_figure,
    load_mask,
    loss_keys,
    metrics_summary,
    pca_2d,
    phi_evolution_figure,
    phi_figure,
    phi_map_of,
    pointing_game,
    prompt_explorer,
    prompt_heatmap,
    prompt_heatmap_figure,
    prompt_heatmaps,
    read_metrics,
    reconstruct,
    reconstruction_explorer,
    reconstruction_figure,
    to_display,
    training_curves_figure,
    write_report,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MaskedCLIP(get_preset("tiny")).eval()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 64, 64, generator=g)
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _finite(fig):
    for t in fig.data:
        for attr in ("z", "x", "y"):
            v = getattr(t, attr, None)
            if v is not None and not isinstance(v, str):
                a = np.asarray(v, dtype=np.float64)
                assert np.isfinite(a).all(), f"{t.type}.{attr} has non-finite values"
    return True


# ---------------------------------------------------------------------------------------------- display
def test_denormalize_and_display():
    x01 = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    xn = (x01 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(denormalize(xn), x01, atol=1e-6)
    d = to_display(xn)
    assert d.shape == (2, 5, 5, 3) and d.dtype == np.uint8
    assert np.abs(d.astype(int) - np.round(x01.permute(0, 2, 3, 1).numpy() * 255)).max() <= 1
    assert np.array_equal(to_display(x01, normalized=False), d)
    assert (
        to_display(torch.full((1, 2, 2), 0.5), normalized=False)[0, 0, 0].tolist() == [128] * 3
    )  # grey channel
    with pytest.raises(ValueError, match="channels"):
        denormalize(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="expected"):
        to_display(torch.zeros(2, 2))


# ---------------------------------------------------------------------------------------------- reconstruction
class _OracleDecoder(nn.Module):
    "Predicts the (optionally per-patch normalised) target patches exactly."

    def __init__(self, imgs, p, norm):
        super().__init__()
        self.imgs, self.p, self.norm = imgs, p, norm

    def forward(self, tokens, ids_restore):
        t = patchify(self.imgs, self.p)
        return (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5 if self.norm else t


@pytest.mark.parametrize("norm_pix", [True, False])
def test_reconstruct_undoes_norm_pix_exactly(model, images, norm_pix):
    cfg0, dec0 = model.config, model.decoder
    model.config = cfg0.replace(norm_pix_loss=norm_pix)
    model.decoder = _OracleDecoder(images, 8, norm_pix)
    try:
        rec = reconstruct(model, images, mask_ratio=0.5, seed=3)
    finally:
        model.config, model.decoder = cfg0, dec0
    assert torch.allclose(rec["reconstruction"], images, atol=1e-5)
    assert torch.allclose(rec["pasted"], images, atol=1e-5)


def test_reconstruct_matches_float64_reference(model, images):
    rec = reconstruct(model, images, mask_ratio=0.75, seed=7)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        enc = model.encoder(images, mask_ratio=0.75, generator=g)
        raw = model.decoder(enc.tokens, enc.ids_restore).double()
    t = patchify(images.double(), 8)
    mu, var = t.mean(-1, keepdim=True), t.var(-1, keepdim=True)  # unbiased, as mim_loss
    ref = raw * torch.sqrt(var + 1e-6) + mu  # (B, L, p*p*3)
    got = patchify(rec["reconstruction"].double(), 8)
    assert torch.allclose(got, ref, atol=1e-4)
    assert torch.equal(rec["patch_mask"], enc.mask)
    L = model.config.vision.num_patches
    assert rec["patch_mask"].sum(1).tolist() == [L - int(L * 0.25)] * 3
    m = rec["mask"]
    assert m.shape == (3, 1, 64, 64) and torch.equal(patchify(m.expand(-1, 3, -1, -1), 8)[..., 0], enc.mask)
    assert torch.equal(rec["pasted"] * (1 - m), images * (1 - m))
    assert torch.equal(rec["pasted"] * m, rec["reconstruction"] * m)
    # determinism and seed dependence
    assert torch.equal(reconstruct(model, images, 0.75, seed=7)["patch_mask"], rec["patch_mask"])
    assert not torch.equal(reconstruct(model, images, 0.75, seed=8)["patch_mask"], rec["patch_mask"])
    assert reconstruct(model, images, 0.0)["patch_mask"].sum() == 0


def test_reconstruction_figure(model, images):
    model.train()
    fig = reconstruction_figure(model, images, n=2)
    assert model.training  # mode restored
    model.eval()
    assert len(fig.data) == 2 * 4 and all(t.type == "image" for t in fig.data) and _finite(fig)
    masked = fig.data[1].z
    grey = (masked == 128).all(-1).reshape(8, 8, 8, 8).all((1, 3))
    assert grey.sum() == 48  # 75 % of 64 patches greyed
    assert np.array_equal(fig.data[0].z, to_display(images[0])[0])
    with pytest.raises(ValueError, match="mask_ratio"):
        reconstruction_figure(model, images, mask_ratio=1.0)


def test_reconstruction_needs_pixel_decoder():
    clip = MaskedCLIP(get_preset("tiny", "clip"))
    with pytest.raises(ValueError, match="no pixel decoder"):
        reconstruction_figure(clip, torch.zeros(1, 3, 64, 64))


# ---------------------------------------------------------------------------------------------- attention
def _explicit_attention_f64(blk, x):
    "softmax(Q K^T / sqrt(d)) from the block's own parameters, in float64, for the block input x (B, T, D)."
    a = blk.attn
    x = x.double()
    h = F.layer_norm(
        x, blk.norm1.normalized_shape, blk.norm1.weight.double(), blk.norm1.bias.double(), blk.norm1.eps
    )
    qkv = F.linear(h, a.qkv.weight.double(), a.qkv.bias.double())
    B, T, _ = qkv.shape
    d = a.qkv.out_features // 3 // a.num_heads
    q, k, v = qkv.reshape(B, T, 3, a.num_heads, d).permute(2, 0, 3, 1, 4)
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1), v, d


@pytest.mark.parametrize("which", ["encoder", "bridge"])
def test_attention_maps_equal_explicit_softmax_and_fused_output(model, images, which):
    blocks = list((model.encoder if which == "encoder" else model.bridge).blocks)
    assert all(b.attn.fused_attn for b in blocks)  # the fused SDPA path is the one under test
    A = attention_maps(model, images[:2], which)
    n_heads = blocks[0].attn.num_heads
    assert A.shape == (len(blocks), 2, n_heads, 65, 65)
    ins, outs = {}, {}
    hs = [
        b.register_forward_pre_hook(lambda m, a, i=i: ins.__setitem__(i, a[0])) for i, b in enumerate(blocks)
    ]
    hs += [
        b.attn.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o))
        for i, b in enumerate(blocks)
    ]
    with torch.no_grad():
        tok = model.encoder(images[:2]).tokens
        if which == "bridge":
            model.bridge(tok)
    for h in hs:
        h.remove()
    for i, b in enumerate(blocks):
        ref, v, d = _explicit_attention_f64(b, ins[i])
        assert torch.allclose(A[i].double(), ref, atol=1e-5), f"layer {i}"
        # the weights mix V into exactly what the fused block computed
        mixed = (A[i].double() @ v).transpose(1, 2).reshape(2, 65, -1)
        out = F.linear(mixed, b.attn.proj.weight.double(), b.attn.proj.bias.double())
        assert torch.allclose(out, outs[i].double(), atol=1e-5), f"layer {i}"


def test_attention_weights_match_timm_unfused_path_with_qk_norm():
    "Independent reference: timm's own non-fused path, weights captured at attn_drop (qk_norm on, random norms)."
    torch.manual_seed(0)
    blk = Block(32, 4, qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm).eval()
    with torch.no_grad():
        for n in (blk.attn.q_norm, blk.attn.k_norm):
            n.weight.uniform_(0.5, 2.0)
            n.bias.normal_()
    x = torch.randn(2, 10, 32)
    h = blk.norm1(x)
    ours = attention_weights(blk.attn, h)
    blk.attn.fused_attn = False
    cap = {}
    hd = blk.attn.attn_drop.register_forward_hook(lambda m, a, o: cap.__setitem__("w", o))
    with torch.no_grad():
        blk(x)
    hd.remove()
    assert torch.allclose(ours, cap["w"], atol=1e-6)
    assert not torch.allclose(
        ours, attention_weights(_no_qk_norm(blk.attn), h), atol=1e-3
    )  # q_norm/k_norm matter here


def _no_qk_norm(attn):
    import copy

    a = copy.deepcopy(attn)
    a.q_norm = a.k_norm = nn.Identity()
    return a


def test_attention_maps_errors(images):
    mae = MaskedCLIP(get_preset("tiny", "mae"))
    with pytest.raises(ValueError, match="no bridge"):
        attention_maps(mae, images[:1], "bridge")
    with pytest.raises(ValueError, match="which"):
        attention_maps(mae, images[:1], "decoder")


def test_cls_attention_and_figures(model, images):
    A = attention_maps(model, images[:1])
    m = cls_attention(A[-1], (8, 8), head=1)
    assert torch.equal(m[0].flatten(), A[-1, 0, 1, 0, 1:])
    assert torch.allclose(cls_attention(A[-1], (8, 8))[0].flatten(), A[-1, 0, :, 0, 1:].mean(0))
    with pytest.raises(ValueError, match="head"):
        cls_attention(A[-1], (8, 8), head=3)
    fig = attention_figure(model, images[0], which="bridge", layer=0, head=2)
    assert [t.type for t in fig.data] == ["image", "heatmap"] and _finite(fig)
    Ab = attention_maps(model, images[:1], "bridge")
    assert np.allclose(
        np.asarray(fig.data[1].z)[::8, ::8], Ab[0, 0, 2, 0, 1:].reshape(8, 8).numpy(), atol=1e-6
    )
    with pytest.raises(ValueError, match="layer"):
        attention_figure(model, images[0], layer=4)
    g = attention_grid_figure(model, images[0])
    assert len(g.data) == 4 * 3 and _finite(g)
    assert all(
        np.nanmax(np.asarray(t.z)) == pytest.approx(1.0) for t in g.data
    )  # each panel scaled to its max
    r = attention_rollout_figure(model, images[0], which=["encoder", "bridge"])
    assert len(r.data) == 2 and _finite(r)


def _rollout_numpy(stacks):
    mats = []
    for s in stacks:
        s = s.double().numpy().mean(2)
        mats += list(s)
    out = None
    for a in mats:  # a: (B, T, T)
        a = 0.5 * a + 0.5 * np.eye(a.shape[-1])
        a = a / a.sum(-1, keepdims=True)
        out = a if out is None else np.einsum("bij,bjk->bik", a, out)
    return out


def test_attention_rollout_reference(model, images):
    g = torch.Generator().manual_seed(0)
    raw = torch.rand(3, 2, 4, 6, 6, generator=g)
    A = raw / raw.sum(-1, keepdim=True)
    R = attention_rollout(A)
    assert torch.allclose(R.double(), torch.from_numpy(_rollout_numpy([A])), atol=1e-6)
    assert torch.allclose(R.sum(-1), torch.ones(2, 6), atol=1e-6)
    # one layer, one head: R = (A + I) / 2
    assert torch.allclose(attention_rollout(A[:1, :, :1]), (A[0, :, 0] + torch.eye(6)) / 2, atol=1e-6)
    # through encoder + bridge (different stacks concatenated in order)
    enc, br = attention_maps(model, images[:1]), attention_maps(model, images[:1], "bridge")
    assert torch.allclose(
        attention_rollout([enc, br]).double(), torch.from_numpy(_rollout_numpy([enc, br])), atol=1e-5
    )
    with pytest.raises(ValueError):
        attention_rollout(A[0])
    with pytest.raises(ValueError, match="head_fusion"):
        attention_rollout(A, head_fusion="median")


# ---------------------------------------------------------------------------------------------- φ
def test_phi_figures(model, images):
    from maskedclip.mlip import SemanticIntegrityEstimator

    phi = torch.arange(64.0).reshape(8, 8) / 64
    f = phi_figure(phi)
    assert len(f.data) == 1 and np.allclose(f.data[0].z, phi.numpy()) and _finite(f)
    est = SemanticIntegrityEstimator(64, 8, init="pyramid")
    f2 = phi_figure(est, image=images[0])
    assert len(f2.data) == 3 and np.allclose(f2.data[0].z, est.phi_map().numpy())
    with pytest.raises(ValueError, match="integrity is None"):
        phi_figure(model)
    assert model.integrity is None
    model.integrity = est  # what an MLIP model will carry
    try:
        assert torch.equal(phi_map_of(model), est.phi_map())
    finally:
        model.integrity = None
    content = SemanticIntegrityEstimator(64, 8, mode="content", embed_dim=192)
    model.integrity = content
    try:
        with pytest.raises(ValueError, match="image"):
            phi_map_of(model)
        pm = phi_map_of(model, images[0])
        assert pm.shape == (8, 8) and torch.allclose(pm, torch.full((8, 8), 0.5))  # content φ ≡ 1/2 at init
        with torch.no_grad():
            content.mlp[-1].weight.normal_()
            content.mlp[-1].bias.fill_(0.1)
        with torch.no_grad():  # the tokens MaskedCLIP feeds it: patch_embed + pos
            conv = model.encoder.patch_embed.proj
            tok = (
                F.conv2d(images[:1], conv.weight, conv.bias, stride=8).flatten(2).transpose(1, 2)
                + model.encoder.pos_embed[:, 1:]
            )
            ref = torch.sigmoid(content.mlp(tok))[0, :, 0].reshape(8, 8)
        assert torch.allclose(phi_map_of(model, images[0]), ref, atol=1e-5) and ref.std() > 0.01
    finally:
        model.integrity = None
    with pytest.raises(ValueError, match="grid_h"):
        phi_figure(torch.zeros(64))
    hist = [(s, phi * (1 + s)) for s in (0, 10, 20)]
    evo = phi_evolution_figure(hist)
    assert [fr.name for fr in evo.frames] == ["0", "10", "20"] and len(evo.layout.sliders[0].steps) == 3
    assert evo.data[0].zmin == 0 and evo.data[0].zmax == pytest.approx(float(phi.max()) * 21)
    assert np.allclose(evo.frames[2].data[0].z, (phi * 21).numpy())
    with pytest.raises(ValueError, match="empty"):
        phi_evolution_figure([])
    with pytest.raises(ValueError, match="shape"):
        phi_evolution_figure([(0, phi), (1, torch.zeros(4, 4))])


# ---------------------------------------------------------------------------------------------- prompt heatmaps
def test_prompt_heatmap_reference(model, images):
    text = "hard exudates near the macula"
    hm = prompt_heatmap(model, images[0], text)
    with torch.no_grad():
        z = model.bridge(model.encoder(images[:1]).tokens)[0, 1:].double()
        p = z @ model.image_proj.weight.double().t()
        p = p / p.norm(dim=-1, keepdim=True)
        pooled, _ = model.text(**{k: v for k, v in model.tokenize([text]).items() if k != "sentence_ids"})
        u = (pooled.double() @ model.text_proj.weight.double().t())[0]
        u = u / u.norm()
    assert hm.shape == (8, 8)
    assert torch.allclose(hm.double().flatten(), p @ u, atol=1e-5)
    many = prompt_heatmaps(model, images[0], [text, "a normal optic disc"])
    assert many.shape == (2, 8, 8) and torch.allclose(many[0], hm)


def test_prompt_heatmap_without_bridge_and_errors(images):
    torch.manual_seed(1)
    m = MaskedCLIP(get_preset("tiny", "mae_clip")).eval()
    assert m.bridge is None
    with torch.no_grad():
        tok = m.encoder(images[:1]).tokens[0, 1:]
        ref = F.normalize(m.image_proj(tok), dim=-1) @ m.encode_text(["drusen"])[0]
    assert torch.allclose(prompt_heatmap(m, images[0], "drusen").flatten(), ref, atol=1e-5)
    with pytest.raises(ValueError, match="no patch_proj"):
        prompt_heatmap(m, images[0], "drusen", projection="patch")
    mae = MaskedCLIP(get_preset("tiny", "mae"))
    with pytest.raises(ValueError, match="no image"):
        prompt_heatmap(mae, images[0], "drusen")


def test_mlip_model_phi_and_patch_projection(images):
    torch.manual_seed(2)
    m = MaskedCLIP(get_preset("tiny", "mlip")).eval()
    assert m.integrity is not None and m.patch_proj is not None and m.bridge is None
    f = phi_figure(m)
    assert len(f.data) == 1 and np.allclose(f.data[0].z, 0.0)  # MaCo init: φ = 0
    with torch.no_grad():
        tok = m.encoder(images[:1]).tokens[0, 1:]
        u = m.encode_text(["drusen"])[0]
        ref_patch = F.normalize(m.patch_proj(tok), dim=-1) @ u
        ref_image = F.normalize(m.image_proj(tok), dim=-1) @ u
    assert torch.allclose(
        prompt_heatmap(m, images[0], "drusen", projection="patch").flatten(), ref_patch, atol=1e-5
    )
    assert torch.allclose(
        prompt_heatmap(m, images[0], "drusen", projection="auto").flatten(), ref_patch, atol=1e-5
    )
    assert torch.allclose(prompt_heatmap(m, images[0], "drusen").flatten(), ref_image, atol=1e-5)
    assert len(prompt_heatmap_figure(m, images[0], ["drusen"], projection="patch").data) == 2
    with pytest.raises(ValueError, match="projection"):
        prompt_heatmap(m, images[0], "drusen", projection="joint")


def test_pointing_game(tmp_path):
    from PIL import Image

    peak = torch.zeros(8, 8)
    peak[2, 5] = 1.0
    box = np.zeros((64, 64), bool)
    box[16:24, 40:48] = True
    assert pointing_game(peak, box) and not pointing_game(peak, ~box)
    # a mask at another resolution: the heatmap is upsampled to the mask's size
    big = np.zeros((128, 128), np.uint8)
    big[32:48, 80:96] = 255
    assert pointing_game(peak, big)
    Image.fromarray(big).save(tmp_path / "haemorrhage.png")
    assert pointing_game(peak, tmp_path / "haemorrhage.png")
    assert load_mask(tmp_path / "haemorrhage.png", (64, 64)).sum() == 64
    # smooth map: argmax of the bilinear upsampling stays in the peak cell's neighbourhood
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    smooth = -((yy - 6) ** 2 + (xx - 1) ** 2)
    near = np.zeros((64, 64), bool)
    near[44:60, 0:16] = True
    assert pointing_game(smooth, near) and not pointing_game(smooth, box)
    with pytest.raises(ValueError, match="empty"):
        pointing_game(peak, np.zeros((64, 64)))
    with pytest.raises(FileNotFoundError):
        pointing_game(peak, tmp_path / "missing.png")


def test_prompt_heatmap_figure(model, images):
    lesion = np.zeros((64, 64), np.uint8)
    lesion[8:24, 8:24] = 255
    texts = ["microaneurysms", "cotton wool spots", "a normal optic disc"]
    fig = prompt_heatmap_figure(model, images[0], texts, lesion_mask=lesion)
    assert (
        len(fig.data) == 3 * 3
        and [t.type for t in fig.data[:3]] == ["image", "heatmap", "contour"]
        and _finite(fig)
    )
    maps = prompt_heatmaps(model, images[0], texts)
    hits = [pointing_game(m, lesion) for m in maps]
    titles = [a.text for a in fig.layout.annotations][:3]
    assert [t.endswith("hit") for t in titles] == hits
    assert fig.layout.coloraxis.cmin == pytest.approx(
        float(maps.min())
    ) and fig.layout.coloraxis.cmax == pytest.approx(float(maps.max()))
    fig2 = prompt_heatmap_figure(model, images[0], "drusen")
    assert len(fig2.data) == 2
    fig3 = prompt_heatmap_figure(model, images[0], texts[:2], lesion_mask=[lesion, None])
    assert len(fig3.data) == 3 + 2
    with pytest.raises(ValueError, match="masks"):
        prompt_heatmap_figure(model, images[0], texts, lesion_mask=[lesion])


# ---------------------------------------------------------------------------------------------- curves and embeddings
def _rows():
    return [
        dict(
            step=s,
            epoch=0,
            lr=1e-3 * s / 5,
            loss=3.0 / s,
            mim=1.0 / s,
            lg_clip=2.0 / s,
            mfd=-0.1 * s,
            ot_local=0.5 / s,
            tau=14.0,
            images_per_s=10.0,
            step_s=0.2,
            memory_mb=50.0,
            grad_norm=1.0,
        )
        for s in range(1, 6)
    ]


def test_training_curves_from_jsonl(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text(
        "\n".join(json.dumps(r) for r in _rows()[:3])
        + "\n\n"
        + "\n".join(json.dumps(r) for r in _rows()[3:])
        + "\n"
    )
    rows = read_metrics(p)
    assert len(rows) == 5 and loss_keys(rows) == ["loss", "mim", "lg_clip", "mfd", "ot_local"]
    fig = training_curves_figure(p)
    assert [t.name for t in fig.data] == ["loss", "mim", "lg_clip", "mfd", "ot_local", "lr"] and _finite(fig)
    assert list(fig.data[2].y) == [2.0 / s for s in range(1, 6)] and list(fig.data[2].x) == [1, 2, 3, 4, 5]
    assert fig.data[-1].yaxis == "y2" and all(t.yaxis == "y" for t in fig.data[:-1])
    only = training_curves_figure(rows, keys=["mim"])
    assert [t.name for t in only.data] == ["mim", "lr"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_metrics(bad)
    with pytest.raises(FileNotFoundError):
        training_curves_figure(tmp_path / "none.jsonl")
    with pytest.raises(ValueError, match="no metric rows"):
        training_curves_figure([])
    # rows with gaps (e.g. a key logged only sometimes) and None values
    gappy = [dict(step=1, loss=1.0, lr=0.1), dict(step=2, loss=None, val_loss=0.5), dict(step=3, loss=0.5)]
    g = training_curves_figure(gappy)
    assert [t.name for t in g.data] == ["loss", "val_loss", "lr"] and list(g.data[0].x) == [1, 3]


def test_read_metrics_is_the_trainers_reader_and_tolerates_only_a_cut_last_line(tmp_path):
    import maskedclip.train as T

    assert read_metrics is T.read_metrics  # one reader for viz, the demo and the trainer
    run = tmp_path / "run"
    run.mkdir()
    good = "\n".join(json.dumps(r) for r in _rows()[:2]) + "\n"
    (run / "metrics.jsonl").write_text(good + '{"step": 3, "lo')  # killed while writing line 3
    with pytest.warns(UserWarning, match=r"metrics.jsonl:3: ignored a truncated last line"):
        rows = read_metrics(run)  # a run directory is accepted too
    assert [r["step"] for r in rows] == [1, 2]
    with pytest.raises(ValueError, match="metrics.jsonl:3"):
        read_metrics(run, partial_tail=False)
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"st\n{"step": 3}\n')  # damage in the middle is an error
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(run)
    with pytest.raises(ValueError, match="row 1 is int"):
        read_metrics([{"step": 1}, 2])


def test_embedding_projection_matches_sklearn():
    from sklearn.decomposition import PCA

    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(10, 6, generator=g), torch.randn(10, 6, generator=g) + 1
    xy, ratio = pca_2d(torch.cat([img, txt]))
    sk = PCA(2).fit(torch.cat([img, txt]).double().numpy())
    ref = sk.transform(torch.cat([img, txt]).double().numpy())
    assert np.allclose(np.abs(xy), np.abs(ref), atol=1e-8)
    assert np.allclose(ratio, sk.explained_variance_ratio_)
    labels = ["dr", "normal"] * 5
    fig = embedding_projection_figure(img, txt, labels)
    assert len(fig.data) == 4 and _finite(fig)
    assert {t.marker.symbol for t in fig.data} == {"circle", "diamond"}
    assert sum(len(t.x) for t in fig.data) == 20
    # same colour for a label in both modalities
    col = {t.name: t.marker.color for t in fig.data}
    assert col["dr (image)"] == col["dr (text)"] != col["normal (image)"]
    assert len(embedding_projection_figure(img, None, labels).data) == 2
    with pytest.raises(ValueError, match="labels"):
        embedding_projection_figure(img, txt, labels[:3])


# ---------------------------------------------------------------------------------------------- explorers
def test_reconstruction_explorer_updates(model, images):
    import ipywidgets as widgets

    w = reconstruction_explorer(model, images)
    assert isinstance(w, widgets.VBox) and isinstance(w.figure, go.FigureWidget) and w.figure in w.children
    before = [np.array(t.z) for t in w.figure.data]
    w.controls["mask_ratio"].value = 0.25
    grey = (np.asarray(w.figure.data[1].z) == 128).all(-1).reshape(8, 8, 8, 8).all((1, 3))
    assert grey.sum() == 16 and not np.array_equal(before[2], w.figure.data[2].z)
    w.controls["sample"].value = 2
    assert np.array_equal(w.figure.data[0].z, to_display(images[2])[0])


def test_attention_explorer_updates(model, images):
    w = attention_explorer(model, images)
    c = w.controls
    z0 = np.array(w.figure.data[1].z)
    c["head"].value = 1
    z1 = np.array(w.figure.data[1].z)
    A = attention_maps(model, images[:1])
    assert not np.array_equal(z0, z1) and np.allclose(
        z1[::8, ::8], A[-1, 0, 1, 0, 1:].reshape(8, 8).numpy(), atol=1e-6
    )
    c["layer"].value = 0
    assert np.allclose(
        np.asarray(w.figure.data[1].z)[::8, ::8], A[0, 0, 1, 0, 1:].reshape(8, 8).numpy(), atol=1e-6
    )
    c["stack"].value = "bridge"
    assert c["layer"].max == 1 and c["head"].value == "mean"
    Ab = attention_maps(model, images[:1], "bridge")
    assert np.allclose(
        np.asarray(w.figure.data[1].z)[::8, ::8], Ab[0, 0, :, 0, 1:].mean(0).reshape(8, 8).numpy(), atol=1e-6
    )
    c["sample"].value = 1
    assert np.array_equal(w.figure.data[0].z, to_display(images[1])[0])
    assert "sample 1" in w.figure.layout.title.text


def test_prompt_explorer_updates(model, images):
    lesion = np.zeros((64, 64), np.uint8)
    lesion[0:32, 0:32] = 255
    w = prompt_explorer(model, images, masks=[lesion] * 3, text="drusen")
    z0 = np.array(w.figure.data[1].z)
    w.controls["text"].value = "a large cup-to-disc ratio"
    z1 = np.array(w.figure.data[1].z)
    assert not np.array_equal(z0, z1)
    ref = viz._upsample(prompt_heatmap(model, images[0], "a large cup-to-disc ratio"), (64, 64)).numpy()
    assert np.allclose(z1, ref, atol=1e-6)
    assert w.figure.layout.annotations[0].text.startswith("a large cup-to-disc ratio")
    w.controls["sample"].value = 2
    assert np.array_equal(w.figure.data[0].z, to_display(images[2])[0])
    with pytest.raises(ValueError, match="masks"):
        prompt_explorer(model, images, masks=[lesion])


# ---------------------------------------------------------------------------------------------- report
def test_write_report_structure(model, images, tmp_path):
    import re

    from plotly.offline import get_plotlyjs

    mp = tmp_path / "metrics.jsonl"
    mp.write_text("\n".join(json.dumps(r) for r in _rows()) + "\n")
    figs = {"curves <1>": training_curves_figure(mp), "rollout": attention_rollout_figure(model, images[0])}
    out = write_report(tmp_path / "sub" / "report.html", figs, config=model.config, metrics=mp, title="a & b")
    page = out.read_text(encoding="utf-8")
    js = get_plotlyjs()
    assert page.count(js[:2000]) == 1 and len(page) > len(js)  # plotly.js inlined exactly once
    assert page.count("Plotly.newPlot(") == 2
    assert not re.findall(r"<(?:script|link|img|iframe)[^>]*\b(?:src|href)=", page)
    assert "<title>a &amp; b</title>" in page and "curves &lt;1&gt;" in page
    cfg = json.loads(re.search(r'<h2 id="config">config</h2><pre>(.*?)</pre>', page, re.S).group(1))
    assert cfg == json.loads(json.dumps(model.config.to_dict()))
    summ = {s["key"]: s for s in metrics_summary(read_metrics(mp))}
    assert (
        summ["lr"]["max"] == pytest.approx(1e-3)
        and summ["mim"]["first"] == 1.0
        and summ["mim"]["last"] == 0.2
    )
    assert "<td>mim</td><td>5</td><td>1</td><td>0.2</td><td>0.2</td><td>1</td>" in page
    assert "5 rows, steps 1–5" in page
    with pytest.raises(ValueError, match="figures"):
        write_report(tmp_path / "x.html", {"bad": "not a figure"})
