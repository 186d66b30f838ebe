"The composed model: losses, gradients per method, the EMA teacher, save/load."

import pytest
import torch

from maskedclip.config import METHODS, get_preset
from maskedclip.data import Batch
from maskedclip.losses import label_guided_clip_loss, mim_loss
from maskedclip.model import MaskedCLIP

TEXTS = [
    "no diabetic retinopathy",
    "moderate DR with hard exudates",
    "glaucoma with a large optic cup",
    "healthy fundus",
]


def make_batch(model, n_p=4, n_u=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = model.tokenize(TEXTS[:n_p]) if model.text is not None else {}
    return Batch(
        paired_images=torch.randn(n_p, 3, 64, 64, generator=g),
        labels=torch.tensor([0, 1, 2, 0])[:n_p],
        unpaired_images=torch.randn(n_u, 3, 64, 64, generator=g),
        texts=TEXTS[:n_p],
        input_ids=tok.get("input_ids"),
        attention_mask=tok.get("attention_mask"),
    )


# which top-level parts each method must train
USED = {
    "supervised": {"encoder", "classifier"},
    "mae": {"encoder", "decoder"},
    "clip": {"encoder", "text", "image_proj", "text_proj", "logit_scale"},
    "mae_clip": {"encoder", "decoder", "text", "image_proj", "text_proj", "logit_scale"},
    "mae_clip_bridge": {"encoder", "decoder", "bridge", "text", "image_proj", "text_proj", "logit_scale"},
    "maskedclip": {
        "encoder",
        "decoder",
        "bridge",
        "feature_decoder",
        "text",
        "image_proj",
        "text_proj",
        "logit_scale",
    },
}
PARTS = {
    "encoder",
    "decoder",
    "bridge",
    "feature_decoder",
    "teacher",
    "text",
    "image_proj",
    "text_proj",
    "logit_scale",
    "classifier",
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("clip_view", ["full", "masked"])
def test_backward_reaches_exactly_the_parts_in_use(method, clip_view):
    torch.manual_seed(0)
    cfg = get_preset("tiny", method).replace(clip_view=clip_view, supervised_classes=3)
    model = MaskedCLIP(cfg)
    out = model(make_batch(model))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for part in PARTS:
        mod = getattr(model, part)
        if part not in USED[method]:
            # switched off: no parameters at all (the teacher is frozen and never gets gradients)
            assert mod is None or part == "teacher", f"{method}: {part} was built but is unused"
            if part == "teacher" and mod is not None:
                assert all(p.grad is None and not p.requires_grad for p in mod.parameters())
            continue
        params = (
            [mod] if isinstance(mod, torch.nn.Parameter) else [p for p in mod.parameters() if p.requires_grad]
        )
        assert params, f"{method}: {part} has no trainable parameters"
        got = [p.grad is not None and p.grad.abs().sum() > 0 for p in params]
        # every trainable tensor of a used part receives a gradient (BERT's token-type table included)
        assert all(got), f"{method}/{clip_view}: {sum(not g for g in got)} tensors of {part} got no gradient"


def test_parts_match_independent_recomputation():
    torch.manual_seed(0)
    model = MaskedCLIP(get_preset("tiny"))
    model.eval()  # no drop path; masking still applies in forward
    b = make_batch(model)
    out = model(b, generator=torch.Generator().manual_seed(1))
    # MIM recomputed from the returned mask/prediction on the concatenated paired+unpaired images
    imgs = torch.cat([b.paired_images, b.unpaired_images])
    assert torch.equal(out.images, imgs)
    assert torch.allclose(out.parts["mim"], mim_loss(imgs, out.pred, out.mask, 8, True))
    # label-guided CLIP recomputed from encode_image / encode_text (full view) with the model's scale
    with torch.no_grad():
        v, u = model.encode_image(b.paired_images), model.encode_text(TEXTS)
    ref = label_guided_clip_loss(v, u, b.labels, model.logit_scale.exp())
    assert torch.allclose(out.parts["lg_clip"], ref, atol=1e-5)
    assert torch.allclose(
        out.loss, out.parts["mim"] + 0.01 * out.parts["lg_clip"] + 0.01 * out.parts["mfd"], atol=1e-6
    )


def test_masked_view_reuses_the_masked_pass():
    torch.manual_seed(0)
    model = MaskedCLIP(get_preset("tiny").replace(clip_view="masked")).eval()
    b = make_batch(model)
    calls = []
    h = model.encoder.register_forward_hook(lambda m, i, o: calls.append(o.tokens.shape))
    model(b)
    h.remove()
    assert calls == [(7, 1 + 16, 192)]  # one masked pass over 4 paired + 3 unpaired images only
    model.config = model.config.replace(clip_view="full")
    calls.clear()
    h = model.encoder.register_forward_hook(lambda m, i, o: calls.append(o.tokens.shape))
    model(b)
    h.remove()
    assert calls == [(7, 17, 192), (4, 65, 192)]  # + the full paired images


def test_teacher_ema_formula_and_no_gradients():
    torch.manual_seed(0)
    model = MaskedCLIP(get_preset("tiny"))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = [p.detach().double().clone() for p in model.teacher.parameters()]
    out = model(make_batch(model))
    out.loss.backward()
    opt.step()
    assert all(p.grad is None for p in model.teacher.parameters())
    model.update_teacher()
    student = [
        p.detach().double() for p in list(model.encoder.parameters()) + list(model.bridge.parameters())
    ]
    for t, b, s in zip(model.teacher.parameters(), before, student):
        assert torch.allclose(t.double(), 0.999 * b + 0.001 * s, atol=1e-7, rtol=0)
    assert not any(
        id(p) in {id(q) for q in model.teacher.parameters()} for p in opt.param_groups[0]["params"]
    )


def test_logit_scale_init_and_clamp():
    model = MaskedCLIP(get_preset("tiny", "clip"))
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(9.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(torch.log(torch.tensor(100.0)).item(), rel=1e-6)


def test_save_load_roundtrip_and_encoder_export(tmp_path):
    from safetensors.torch import load_file

    from maskedclip.vision import timm_vit

    torch.manual_seed(0)
    model = MaskedCLIP(get_preset("tiny")).eval()
    model.save_pretrained(tmp_path / "ckpt")
    again = MaskedCLIP.from_pretrained(tmp_path / "ckpt").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), again.encode_image(x))
        assert torch.equal(model.encode_text(TEXTS[:2]), again.encode_text(TEXTS[:2]))
    tv = timm_vit(model.config.vision).eval()
    tv.load_state_dict(load_file(str(model.export_encoder(tmp_path / "enc.safetensors"))), strict=True)
    with torch.no_grad():
        assert torch.allclose(tv.forward_features(x), model.encoder(x).tokens, atol=1e-5)


def test_demo_preset_uses_the_pretrained_offline_text_tower(tmp_path):
    model = MaskedCLIP(get_preset("demo"))
    assert model.text.width == 384 and sum(p.numel() for p in model.text.parameters()) > 22e6
    model.save_pretrained(tmp_path / "d")
    again = MaskedCLIP.from_pretrained(tmp_path / "d").eval()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.encode_text(["glaucoma"]), again.encode_text(["glaucoma"]))


def test_hub_id_is_not_downloaded_without_permission():
    with pytest.raises(ValueError, match="text.name_or_path"):
        MaskedCLIP(
            get_preset("paper").replace(
                vision=get_preset("tiny").vision,
                pixel_decoder=get_preset("tiny").pixel_decoder,
                bridge=get_preset("tiny").bridge,
                feature_decoder=get_preset("tiny").feature_decoder,
            )
        )


def test_mlip_switches_build_and_train_their_parts():
    torch.manual_seed(0)
    model = MaskedCLIP(get_preset("tiny", "mlip"))
    assert model.bridge is None and model.teacher is None and model.feature_decoder is None
    texts = [
        "No haemorrhages are seen. The cup-to-disc ratio is 0.7.",
        "Scattered microaneurysms. Hard exudates near the macula.",
        "Healthy fundus.",
        "Drusen around the macula. No exudates.",
    ]
    b = Batch(
        paired_images=torch.randn(4, 3, 64, 64),
        unpaired_images=torch.randn(3, 3, 64, 64),
        texts=texts,
        **model.tokenize(texts, with_sentences=True),
    )
    out = model(b)
    assert set(out.parts) == {"mim", "mcl", "ot"}
    c = model.config
    assert torch.allclose(
        out.loss, out.parts["mim"] + c.lambda_lg_clip * out.parts["mcl"] + c.mlip.lambda_ot * out.parts["ot"]
    )
    out.loss.backward()
    for part in ("encoder", "decoder", "text", "image_proj", "text_proj", "integrity", "patch_proj"):
        assert all(p.grad is not None for p in getattr(model, part).parameters() if p.requires_grad), part
    assert model.ot_logit_scale.grad is not None and model.logit_scale.grad is not None
    # without sentence ids the OT loss cannot run and says why
    with pytest.raises(ValueError, match="sentence_ids"):
        model(Batch(paired_images=b.paired_images, texts=texts, **model.tokenize(texts)))


def test_phi_mask_sampler_keeps_high_phi_patches():
    cfg = get_preset("tiny", "mlip")
    cfg = cfg.replace(mlip=cfg.mlip.replace(mask_sampler="phi", use_ot=False))
    model = MaskedCLIP(cfg).eval()
    with torch.no_grad():
        model.integrity.proj.weight.zero_()
        model.integrity.proj.weight[0, :8] = 20.0  # first grid row is "important"
    texts = ["healthy fundus"] * 8
    out = model(Batch(paired_images=torch.randn(8, 3, 64, 64), texts=texts, **model.tokenize(texts)))
    kept = 1 - out.mask
    assert kept[:, :8].mean() > 0.95 and kept[:, 8:].mean() < 0.15
