"timm and Hugging Face entry points (maskedclip.hub): each is checked against an independent reference."

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

import maskedclip.hub as hub
from maskedclip.config import get_preset
from maskedclip.data import eval_transform
from maskedclip.evaluate import extract_features
from maskedclip.hub import (
    ENCODER_ARCHS,
    HubMaskedCLIP,
    create_model_and_transforms,
    get_model_config,
    list_models,
    register_config,
    timm_encoder,
)
from maskedclip.model import MaskedCLIP
from maskedclip.vision import ViTEncoder

pytestmark = pytest.mark.usefixtures("one_thread")
REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    "A tiny MaskedCLIP (64 px encoder), its exported encoder file and a saved model folder."
    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    m = HubMaskedCLIP(get_preset("tiny"), pretrained_text=False).eval()
    return m, m.export_encoder(d / "encoder.safetensors"), d


def hub_cache(model, cache: Path, repo_id: str, rev: str = REV) -> Path:
    "The layout the Hub client leaves in its cache after downloading `repo_id` at `rev`."
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    model.save_pretrained(repo / "snapshots" / rev)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    return repo


def test_timm_create_model_loads_exported_weights(tmp_path):
    torch.manual_seed(1)
    m = MaskedCLIP(
        get_preset("tiny").replace(vision=ENCODER_ARCHS["maskedclip_vit_tiny_patch16"]), pretrained_text=False
    )
    enc = m.encoder
    f = m.export_encoder(tmp_path / "encoder.safetensors")
    t = timm.create_model(
        "maskedclip_vit_tiny_patch16", pretrained=True, pretrained_cfg_overlay=dict(file=str(f))
    ).eval()
    ref = load_file(str(f))  # the file itself, read independently
    sd = t.state_dict()
    assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = t(x)
    np.testing.assert_allclose(out.numpy(), extract_features(enc, x, batch_size=2), atol=2e-5)
    assert t.pretrained_cfg["input_size"] == (3, 224, 224) and t.pretrained_cfg["file"] == str(f)
    # a new head: every encoder tensor still comes from the file, the head is fresh
    t5 = timm.create_model(
        "maskedclip_vit_tiny_patch16",
        pretrained=True,
        num_classes=5,
        pretrained_cfg_overlay=dict(file=str(f)),
    )
    assert t5.head.out_features == 5 and all(torch.equal(t5.state_dict()[k], ref[k]) for k in ref)


@pytest.mark.parametrize("name", sorted(ENCODER_ARCHS))
def test_registered_architectures_match_the_encoder(name):
    vc = ENCODER_ARCHS[name]
    with torch.device("meta"):
        t, ours = timm.create_model(name), ViTEncoder(vc)
    assert {k: tuple(v.shape) for k, v in t.state_dict().items()} == {
        k: tuple(v.shape) for k, v in ours.state_dict().items()
    }
    assert t.pretrained_cfg["input_size"] == (3, vc.image_size, vc.image_size) and t.pretrained_cfg[
        "mean"
    ] == (0.485, 0.456, 0.406)


def test_timm_encoder_for_an_unregistered_config_and_a_missing_file(tiny, tmp_path):
    m, f, _ = tiny
    vc = get_preset("tiny").vision.replace(depth=2, image_size=96)
    t = timm_encoder(vc)
    assert (
        len(t.blocks) == 2
        and t.patch_embed.img_size == (96, 96)
        and t.pretrained_cfg["input_size"] == (3, 96, 96)
    )
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        timm_encoder(vc, tmp_path / "nope.safetensors")


def test_config_registry():
    assert {"paper", "mlip", "tiny", "demo", *ENCODER_ARCHS} <= set(list_models())
    assert list_models("maskedclip_vit_*_patch16") == sorted(
        n for n in ENCODER_ARCHS if n.endswith("patch16")
    )
    assert get_model_config("mlip").vision == ENCODER_ARCHS["maskedclip_vit_base_patch16"]
    name = register_config("test-registry-tiny", get_preset("tiny").replace(proj_dim=64), overwrite=True)
    assert get_model_config(name).proj_dim == 64 and name in list_models()
    with pytest.raises(ValueError, match="already registered"):
        register_config(name, get_preset("tiny"))
    with pytest.raises(ValueError, match="'nope' is not registered"):
        get_model_config("nope")
    with pytest.raises(TypeError, match="MaskedCLIPConfig"):
        register_config("x", 3)
    hub._CONFIGS.pop(name)


def test_create_model_and_transforms_every_source(tiny, tmp_path):
    m, f, d = tiny
    saved = m.save_pretrained(d / "saved") or d / "saved"
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    x = eval_transform(64)(img)[None]  # the reference transform at the model's size
    with torch.no_grad():
        ref = m.image_features(x)
    hub_cache(m, tmp_path / "cache", "org/tiny")
    outs = {
        "name": create_model_and_transforms("maskedclip_vit_demo_patch8_64", pretrained=f),
        "file": create_model_and_transforms(str(f)),
        "dir": create_model_and_transforms(saved),
        "hub": create_model_and_transforms("org/tiny", cache_dir=tmp_path / "cache"),
        "hub-encoder": create_model_and_transforms(
            "org/tiny", cache_dir=tmp_path / "cache", encoder_only=True
        ),
    }
    for k, (model, tr, ev) in outs.items():
        assert torch.equal(ev(img)[None], x), k
        torch.manual_seed(0)
        assert tuple(tr(img).shape) == (3, 64, 64), k
        with torch.no_grad():
            feat = (
                model.image_features(ev(img)[None]) if isinstance(model, MaskedCLIP) else model(ev(img)[None])
            )
        torch.testing.assert_close(feat, ref, atol=1e-5, rtol=1e-5, msg=k)
        assert not model.training
    assert isinstance(outs["dir"][0], HubMaskedCLIP) and isinstance(
        outs["hub-encoder"][0], timm.models.VisionTransformer
    )
    big, tr, ev = create_model_and_transforms("maskedclip_vit_tiny_patch16")
    assert tuple(ev(img).shape) == (3, 224, 224) and len(big.blocks) == 12
    full, _, _ = create_model_and_transforms("tiny", encoder_only=False)
    assert isinstance(full, HubMaskedCLIP) and full.config == get_preset("tiny")
    with pytest.raises(FileNotFoundError, match="allow_download=True"):
        create_model_and_transforms("org/other", cache_dir=tmp_path / "cache")


def test_hub_mixin_round_trip_through_a_local_cache(tiny, tmp_path):
    m, _, _ = tiny
    repo = hub_cache(m, tmp_path / "hf", "maskedclip/tiny")
    snap = repo / "snapshots" / REV
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in snap.iterdir()}
    back = HubMaskedCLIP.from_pretrained("maskedclip/tiny", cache_dir=tmp_path / "hf")
    ref = load_file(str(snap / "model.safetensors"))
    assert set(back.state_dict()) == set(ref) and all(
        torch.equal(back.state_dict()[k], v) for k, v in ref.items()
    )
    assert back.config == m.config
    # a second revision, by its hash; refs/main still points to the first
    torch.manual_seed(5)
    other = HubMaskedCLIP(get_preset("tiny"), pretrained_text=False)
    rev2 = "f" * 40
    other.save_pretrained(repo / "snapshots" / rev2)
    b2 = HubMaskedCLIP.from_pretrained("maskedclip/tiny", cache_dir=tmp_path / "hf", revision=rev2)
    assert torch.equal(b2.encoder.cls_token, other.encoder.cls_token) and not torch.equal(
        b2.encoder.cls_token, m.encoder.cls_token
    )
    with pytest.raises(FileNotFoundError, match="allow_download=True"):
        HubMaskedCLIP.from_pretrained("maskedclip/absent", cache_dir=tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="not a Hub id"):
        HubMaskedCLIP.from_pretrained(str(tmp_path / "no" / "such" / "dir"))


def test_hub_ids_resolve_from_HF_HUB_CACHE_in_a_fresh_process(tiny, tmp_path):
    "A whole model through maskedclip, and the exported encoder through timm's own 'hf-hub:' loader, from the cache."
    from maskedclip.hub import save_timm_folder

    m, f, _ = tiny
    hub_cache(m, tmp_path / "envcache", "org/env-model")
    enc_repo = tmp_path / "envcache" / "models--org--env-encoder"
    save_timm_folder(f, enc_repo / "snapshots" / REV)
    (enc_repo / "refs").mkdir()
    (enc_repo / "refs" / "main").write_text(REV)
    code = (
        "import torch, timm, maskedclip; m, tr, ev = maskedclip.create_model_and_transforms('org/env-model'); "
        "e = timm.create_model('hf-hub:org/env-encoder', pretrained=True); x = torch.linspace(-1, 1, 2 * 3 * 64 * 64).reshape(2, 3, 64, 64); "
        "torch.save(dict(cls=m.encoder.cls_token.detach(), feat=m.eval().image_features(x).detach(), timm=e.eval()(x).detach()), 'out.pt'); "
        "print(type(m).__name__, type(e).__name__)"
    )
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(tmp_path / "envcache"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["HubMaskedCLIP", "VisionTransformer"]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    x = torch.linspace(-1, 1, 2 * 3 * 64 * 64).reshape(2, 3, 64, 64)
    with torch.no_grad():
        ref = m.image_features(x)
    assert torch.equal(got["cls"], m.encoder.cls_token.detach())
    torch.testing.assert_close(got["feat"], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["timm"], ref, atol=1e-5, rtol=1e-5)


def test_push_to_hub_refuses_without_allow_upload_or_network(tiny, monkeypatch, tmp_path):
    m, _, _ = tiny
    with pytest.raises(PermissionError, match="allow_upload=True"):
        m.push_to_hub("org/x")
    with pytest.raises(PermissionError, match="allow_upload=True"):
        m.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="org/x")
    monkeypatch.setattr(hub.hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE"):
        m.push_to_hub("org/x", allow_upload=True)


# ---- loggers (maskedclip.loggers) and the trainer's use of them -----------------------------------------------------
def test_trainer_tensorboard_events_read_back_equal_metrics_jsonl(tmp_path):
    import json
    import warnings

    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from maskedclip.config import DataConfig, ExperimentConfig, TrainConfig
    from maskedclip.train import InMemoryBatches, Trainer

    torch.manual_seed(0)
    cfg = ExperimentConfig(
        model=get_preset("tiny", "mae"),
        data=DataConfig(paired_batch_size=2, unpaired_batch_size=2, synthetic=True),
        train=TrainConfig(output_dir=str(tmp_path / "run"), steps=3, lr=1e-3, tensorboard=True, wandb=True),
    )
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(8, 3, 64, 64, generator=g)
    loader = InMemoryBatches(imgs[:4], ["a"] * 4, torch.zeros(4, dtype=torch.long), imgs[4:], 2, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(cfg, loader=loader, progress=False).fit()
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(tmp_path / "run" / "tb")).Reload()
    assert {"loss", "mim", "lr"} <= set(acc.Tags()["scalars"])
    for tag in ("loss", "mim", "lr"):
        ev = acc.Scalars(tag)
        assert [e.step for e in ev] == [r["step"] for r in rows] == [1, 2, 3]
        np.testing.assert_allclose([e.value for e in ev], [r[tag] for r in rows], rtol=1e-6)
    # the run folder through the ecosystem entry points: the whole model from final/, the encoder from encoder.safetensors
    run = tmp_path / "run"
    full, _, ev = create_model_and_transforms(run)
    enc, _, _ = create_model_and_transforms(run / "encoder.safetensors")
    ref = load_file(str(run / "final" / "model.safetensors"))
    assert isinstance(full, HubMaskedCLIP) and all(
        torch.equal(full.state_dict()[k], v) for k, v in ref.items()
    )
    assert all(torch.equal(enc.state_dict()[k], ref["encoder." + k]) for k in enc.state_dict())
    import importlib.util

    if (
        importlib.util.find_spec("wandb") is None
    ):  # enabled but not installed: one clear warning, nothing else
        wb = [w for w in caught if "wandb" in str(w.message)]
        assert len(wb) == 1 and "not installed" in str(wb[0].message), [str(w.message) for w in caught]
        assert not (tmp_path / "run" / "wandb").exists()


def test_wandb_hook_is_a_noop_unless_installed_and_enabled(tmp_path, monkeypatch):
    import builtins
    import warnings

    from maskedclip.loggers import WandbLogger, make_loggers

    real_import = builtins.__import__

    def no_wandb(name, *a, **k):  # the package absent, whatever this environment has
        if name == "wandb" or name.startswith("wandb."):
            raise ImportError("No module named 'wandb'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        off = WandbLogger(enabled=False)
        assert not off.active and not caught  # disabled: silent
        lg = make_loggers(tmp_path / "r", wandb=True)
        lg.log({"loss": 1.0}, 1)
        lg.close()
    assert not lg and not lg.sinks
    assert len(caught) == 1 and "wandb package is not installed" in str(caught[0].message)
    assert not (tmp_path / "r").exists()  # nothing written
