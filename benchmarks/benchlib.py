"""Measurement primitives for `benchmarks/run.py` (a benchmark harness, not a test module).

Every public `task_*` function runs inside a child process started by `run.py` (a fork of a pre-imported server, or
a fresh interpreter), measures one thing and returns a JSON-able dict. Nothing here asserts on timings.

Definitions used throughout (see benchmarks/README.md):
  training step   forward (`MaskedCLIP.forward(batch, mask_noise=...)`) + backward + AdamW step (fused when the
                  device supports it) + `zero_grad(set_to_none=True)` + `clamp_logit_scale` + teacher EMA update.
                  The batch lives on the device already (data loading is measured separately); the masking noise is
                  precomputed on the device with the trainer's `mask_noise_for_step`.
  step time       median over repeats of the wall time of one step; warm-up steps excluded. CPU: `time.perf_counter`;
                  CUDA: `torch.cuda.Event(enable_timing=True)` around the step, then `synchronize`.
  FLOPs per step  `torch.utils.flop_counter.FlopCounterMode` over forward + backward with the math SDPA backend (the
                  fused kernels count as zero); matmul / conv / attention only (element-wise ops are not counted).
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import statistics
import time
import traceback
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from maskedclip.config import METHODS, MaskedCLIPConfig, get_preset
from maskedclip.data import Batch
from maskedclip.losses import label_guided_clip_loss, masked_feature_distillation_loss, mim_loss
from maskedclip.model import MaskedCLIP
from maskedclip.train import _resolve_precision, mask_noise_for_step, param_groups, sdpa_backend_context
from maskedclip.vision import ViTEncoder

ALL_METHODS = tuple(METHODS) + ("mlip",)
SIZES = {  # name -> how the model config is made (see `model_config`)
    "tiny": "preset 'tiny' (ViT 64 px, patch 8, width 192, depth 4; tiny text tower)",
    "vitb": "ViT-B/16 at 224 px = preset 'mlip' vision/decoders + the tiny text tower (no download)",
}

# ------------------------------------------------------------------------------------------------ configs and batches


def model_config(
    size: str,
    method: str,
    clip_view: str | None = None,
    image_size: int | None = None,
    mask_ratio: float | None = None,
) -> MaskedCLIPConfig:
    "Config of `method` at `size` ('tiny' | 'vitb'); `clip_view` only applies to methods with a CLIP loss."
    if size == "tiny":
        cfg = get_preset("tiny", method)
    elif size == "vitb":
        cfg = get_preset("mlip", method).replace(text=get_preset("tiny").text)
    else:
        raise ValueError(f"size: {size!r} is not one of {list(SIZES)}")
    if clip_view is not None and cfg.use_clip and cfg.clip_view != clip_view:
        cfg = cfg.replace(clip_view=clip_view)
    if image_size is not None and image_size != cfg.vision.image_size:
        cfg = cfg.replace(vision=cfg.vision.replace(image_size=image_size))
    if mask_ratio is not None:
        cfg = cfg.replace(mask_ratio=mask_ratio)
    if cfg.use_supervised and not cfg.supervised_classes:
        cfg = cfg.replace(supervised_classes=5)  # the synthetic corpus's labels
    return cfg


def synthetic_reports(n: int, seed: int = 0) -> list[str]:
    "`n` free-text reports from the synthetic corpus generator (realistic token counts for the text tower)."
    from maskedclip.synthetic import sample_findings, write_report

    rng = np.random.default_rng(seed)
    return [write_report(sample_findings(rng), rng) for _ in range(n)]


def make_batch(model: MaskedCLIP, bp: int, bu: int, device, seed: int = 0) -> Batch:
    "An in-memory `Batch` of `bp` paired (image, report, label) + `bu` unpaired images for `model`, on `device`."
    c = model.config
    g = torch.Generator().manual_seed(seed)
    H = c.vision.image_size
    kw = dict(
        paired_images=torch.randn(bp, 3, H, H, generator=g),
        unpaired_images=torch.randn(bu, 3, H, H, generator=g) if bu else None,
    )
    if bp:
        texts = synthetic_reports(bp, seed)
        kw.update(texts=texts, labels=torch.randint(0, 5, (bp,), generator=g))
        if model.text is not None:
            tok = model.tokenize(texts, with_sentences=bool(c.mlip.use_ot))
            kw.update({k: v for k, v in tok.items() if k in ("input_ids", "attention_mask", "sentence_ids")})
    return Batch(**kw).to(device)


def fused_adamw_ok(device) -> bool:
    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1, device=device))], fused=True)
        return True
    except (RuntimeError, TypeError, ValueError):
        return False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available here")
    return torch.device(name)


def autocast(device: torch.device, precision: str, trainer_attention: bool = True):
    "The trainer's autocast; `trainer_attention`: with its attention precision (under bf16 on CPU: no bf16 SDPA kernel, D27)."
    if precision not in ("bf16", "fp16"):
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(
        torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    )
    if trainer_attention:
        stack.enter_context(sdpa_backend_context(device, precision))
    return stack


def resolve_precision(precision: str, device: torch.device) -> str:
    "'auto' -> what the trainer uses: bf16 where the device has native bf16, else fp32 (D27)."
    return _resolve_precision(precision, device)


# ------------------------------------------------------------------------------------------------ the training step


class TrainStep:
    "One model + fused AdamW + a fixed device-resident batch; `step()` is one training step as the Trainer does it."

    def __init__(
        self,
        cfg: MaskedCLIPConfig,
        bp: int,
        bu: int,
        device,
        precision: str = "fp32",
        seed: int = 0,
        n_noise: int = 4,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.cfg, self.device, self.precision, self.bp, self.bu = cfg, torch.device(device), precision, bp, bu
        torch.manual_seed(seed)
        self.model = MaskedCLIP(cfg).to(self.device).train()
        groups = param_groups(self.model, 0.05, 0.1)
        self.fused = fused_adamw_ok(self.device)
        self.opt = torch.optim.AdamW(
            [{k: v for k, v in g.items() if k != "names"} for g in groups],
            lr=1e-4,
            betas=(0.9, 0.95),
            **(dict(fused=True) if self.fused else {}),
        )
        self.net = self.model  # what the forward calls (a DDP wrapper in benchmarks/dist_worker.py)
        self.batch = make_batch(self.model, bp, bu, self.device, seed + 1000 * rank)
        m = self.model
        if m.uses_masked_pass:  # the trainer's rule for which images go through the masked pass
            np_, nu_ = (bp, bu) if (cfg.use_mim or cfg.use_mfd) else (bp, 0)
            self.noises = [
                mask_noise_for_step(seed, i, np_, nu_, cfg.vision.num_patches, rank, world_size).to(
                    self.device
                )
                for i in range(n_noise)
            ]
        else:
            self.noises = [None]
        self.i = 0
        self.last_loss = None
        self.trainer_attention = (
            True  # False: torch's own SDPA choice under autocast (benchmarks/profile_step.py)
        )

    @property
    def images(self) -> int:
        return self.bp + self.bu

    def noise(self):
        n = self.noises[self.i % len(self.noises)]
        self.i += 1
        return n

    def forward_backward(self):
        with autocast(self.device, self.precision, self.trainer_attention):
            out = self.net(self.batch, mask_noise=self.noise())
        out.loss.backward()
        self.last_loss = out.loss.detach()

    def finish(self, ema: bool = True):
        "AdamW step (params without a gradient are skipped), zero_grad, clamp log τ, teacher EMA."
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.model.clamp_logit_scale()
        if ema:
            self.model.update_teacher()

    def step(self):
        self.forward_backward()
        self.finish()

    def forward(self):
        with autocast(self.device, self.precision, self.trainer_attention):
            return self.model(self.batch, mask_noise=self.noise())

    def flops(self) -> dict:
        "FLOPs of forward + backward (math SDPA backend); forward FLOPs per top-level sub-module of the model."
        return count_flops(self.forward_backward, self.opt, self.forward)

    def loss_finite(self) -> bool:
        return self.last_loss is None or bool(torch.isfinite(self.last_loss).all())

    def n_params(self) -> dict:
        tr = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return dict(trainable=tr, total=sum(p.numel() for p in self.model.parameters()))


def count_flops(fn: Callable[[], None], opt=None, per_module_fn: Callable[[], None] | None = None) -> dict:
    """Run `fn` (forward + backward) under FlopCounterMode with the math SDPA backend -> total FLOPs. FlopCounterMode
    attributes backward FLOPs to modules unreliably, so the per-module split (top-level sub-modules) comes from a
    forward-only run of `per_module_fn` (under no_grad) when given."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, depth=2) as fc:
        fn()
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    out = dict(total=int(fc.get_total_flops()))
    if per_module_fn is not None:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, depth=2) as fc2:
            per_module_fn()
        per = {}
        for name, ops in fc2.get_flop_counts().items():
            parts = name.split(".")
            if len(parts) == 2:
                per[parts[1]] = int(sum(ops.values()))
        out.update(forward_total=int(fc2.get_total_flops()), forward_per_module=per)
    return out


def set_fused_attn(model: torch.nn.Module, flag: bool) -> int:
    "Set timm `Attention.fused_attn` on every attention module (not the transformers text tower); returns how many."
    n = 0
    for mod in model.modules():
        if isinstance(getattr(mod, "fused_attn", None), bool):
            mod.fused_attn = flag
            n += 1
    return n


# ------------------------------------------------------------------------------------------------ timing and memory


class Timer:
    "Seconds per call of `fn`: CUDA events + synchronize on CUDA, `time.perf_counter` on CPU."

    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def __call__(self, fn: Callable[[], None], n: int = 1) -> float:
        if self.cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            s.record()
            for _ in range(n):
                fn()
            e.record()
            e.synchronize()
            return s.elapsed_time(e) / 1e3 / n
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n


def _proc_status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])  # kB
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of what runs after `reset()`. CUDA: `torch.cuda.max_memory_allocated` (absolute, this process).
    CPU: RSS high-water mark minus the RSS at `reset()` — the high-water mark is reset through /proc/self/clear_refs
    ('5') when the kernel allows it, else `getrusage` ru_maxrss is used (then the delta is a lower bound if the
    process had peaked higher before)."""

    def __init__(self, device):
        self.device = torch.device(device)

    def reset(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method, self.base_kb = "VmHWM-VmRSS (clear_refs reset)", _proc_status("VmRSS")
        except OSError:
            self.method, self.base_kb = "ru_maxrss delta", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if self.base_kb is None:
            self.method, self.base_kb = "ru_maxrss delta", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        hwm = (
            _proc_status("VmHWM")
            if self.method.startswith("VmHWM")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        )
        return max(0, hwm - self.base_kb) / 1024


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def alternate(
    fns: dict[str, Callable[[], None]], timer: Timer, warmup: int, repeats: int, inner: int = 1
) -> dict[str, list[float]]:
    """Warm every variant up (`warmup` calls each), then `repeats` rounds; in each round every variant is timed
    once (`inner` calls, per-call seconds), the order rotating by one each round so that no variant always runs
    first or right after the same neighbour. Returns name -> per-round seconds per call."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    out = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            out[name].append(timer(fns[name], inner))
    return out


def summary(samples: list[float]) -> dict:
    "Median and spread of per-step seconds."
    s = sorted(samples)
    q = lambda p: s[min(len(s) - 1, max(0, int(round(p * (len(s) - 1)))))]
    med = statistics.median(s)
    return dict(
        median_s=med,
        min_s=s[0],
        max_s=s[-1],
        p25_s=q(0.25),
        p75_s=q(0.75),
        n=len(s),
        spread_pct=100 * (q(0.75) - q(0.25)) / med if med > 0 else None,
        samples_s=[round(x, 6) for x in samples],
    )


# ------------------------------------------------------------------------------------------------ tasks (child side)


def task_method(
    device: str,
    size: str,
    method: str,
    clip_view: str | None,
    bp: int,
    bu: int,
    warmup: int,
    repeats: int,
    precision: str = "fp32",
    flops: bool = True,
    seed: int = 0,
    threads: int | None = None,
) -> dict:
    "Training-step time, peak memory, page faults and FLOPs of one (size, method, clip_view) variant."
    dev = _setup(device, threads)
    cfg = model_config(size, method, clip_view)
    mem = PeakMemory(dev)
    mem.reset()
    ts = TrainStep(cfg, bp, bu, dev, precision, seed)
    timer = Timer(dev)
    for _ in range(warmup):
        ts.step()
    f0 = minor_faults()
    samples = [timer(ts.step) for _ in range(repeats)]
    faults = (minor_faults() - f0) / max(1, repeats)
    peak = mem.peak_mb()
    row = dict(
        size=size,
        method=method,
        clip_view=cfg.clip_view if cfg.use_clip else None,
        bp=bp,
        bu=bu,
        images=ts.images,
        image_size=cfg.vision.image_size,
        num_patches=cfg.vision.num_patches,
        mask_ratio=cfg.mask_ratio,
        precision=precision,
        fused_adamw=ts.fused,
        params=ts.n_params(),
        text_tokens=int(ts.batch.input_ids.shape[1]) if ts.batch.input_ids is not None else None,
        peak_mem_mb=round(peak, 1),
        memory_method=mem.method,
        minor_faults_per_step=round(faults),
        loss_finite=ts.loss_finite(),
        **summary(samples),
    )
    if flops:
        row["flops"] = ts.flops()
    return row


def task_masking(
    device: str,
    size: str,
    n_images: int,
    ratios: list[float],
    warmup: int,
    repeats: int,
    precision: str = "fp32",
    seed: int = 0,
    threads: int | None = None,
) -> dict:
    "Encoder alone (forward + backward of a scalar of its tokens), same images, mask ratios alternating."
    dev = _setup(device, threads)
    cfg = model_config(size, "mae")
    torch.manual_seed(seed)
    enc = ViTEncoder(cfg.vision).to(dev).train()
    g = torch.Generator().manual_seed(seed)
    H = cfg.vision.image_size
    x = torch.randn(n_images, 3, H, H, generator=g).to(dev)
    L = cfg.vision.num_patches
    noise = torch.rand(n_images, L, generator=g).to(dev)

    def make(r):
        def fb():
            with autocast(dev, precision):
                out = enc(x, mask_ratio=r, noise=noise if r > 0 else None)
                loss = out.tokens.float().pow(2).mean()
            loss.backward()
            for p in enc.parameters():
                p.grad = None

        return fb

    fns = {f"mask={r:g}": make(r) for r in ratios}
    res = alternate(fns, Timer(dev), warmup, repeats)
    rows = []
    for r in ratios:
        fl = count_flops(make(r))
        kept = int(L * (1 - r)) if r > 0 else L
        rows.append(dict(mask_ratio=r, tokens=kept + 1, flops=fl["total"], **summary(res[f"mask={r:g}"])))
    base = rows[0]
    for row in rows:
        row["speedup_vs_first"] = base["median_s"] / row["median_s"]
        row["flop_ratio_vs_first"] = base["flops"] / row["flops"]
    return dict(
        size=size,
        n_images=n_images,
        image_size=H,
        num_patches=L,
        precision=precision,
        analytic_check=_encoder_flops_check(cfg, enc, dev),
        rows=rows,
    )


def _encoder_flops_check(cfg, enc, dev) -> dict:
    "FlopCounterMode vs the analytic ViT forward count 2·N·(12·D²)·depth + 4·N²·D·depth + patch embedding (one image)."
    v = cfg.vision
    N, D, L = v.num_patches + 1, v.width, v.num_patches
    hid = int(D * v.mlp_ratio)
    per_block = 2 * N * D * (3 * D + D + 2 * hid) + 4 * N * N * D
    analytic = v.depth * per_block + 2 * L * (v.in_chans * v.patch_size**2) * D
    x = torch.zeros(1, 3, v.image_size, v.image_size, device=dev)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        enc(x)
    counted_math = fc.get_total_flops()
    with torch.no_grad(), FlopCounterMode(display=False) as fc2:
        enc(x)  # default (fused) backend: attention counts 0
    return dict(
        analytic=analytic,
        counted_math_sdpa=counted_math,
        ratio=counted_math / analytic,
        counted_default_backend=fc2.get_total_flops(),
    )


def task_parts(
    device: str,
    size: str,
    bp: int,
    bu: int,
    warmup: int,
    repeats: int,
    precision: str = "fp32",
    clip_view: str = "full",
    seed: int = 0,
    threads: int | None = None,
) -> dict:
    """The full MaskedCLIP step against its three parts, each a complete training step on the SAME model and batch:
      mae  = masked encoder pass over the Bp+Bu images -> pixel decoder -> MIM loss; backward; AdamW; zero_grad
      clip = encoder over the Bp paired images (full view, or the masked pass when clip_view='masked') -> bridge ->
             image projection; text tower -> text projection; label-guided CLIP loss; backward; AdamW; zero_grad; clamp τ
      mfd  = masked encoder pass over the Bp+Bu images -> feature decoder; EMA teacher on the original images ->
             MFD loss; backward; AdamW; zero_grad; teacher EMA update
    AdamW skips parameters without a gradient, so each part updates only the parameters it uses."""
    dev = _setup(device, threads)
    cfg = model_config(size, "maskedclip", clip_view)
    ts = TrainStep(cfg, bp, bu, dev, precision, seed)
    m, b, c = ts.model, ts.batch, cfg
    x = torch.cat([b.paired_images, b.unpaired_images]) if b.unpaired_images is not None else b.paired_images
    ac = lambda: autocast(dev, precision)

    def fb_mae():
        with ac():
            enc = m.encoder(x, mask_ratio=c.mask_ratio, noise=ts.noise())
            loss = mim_loss(
                x, m.decoder(enc.tokens, enc.ids_restore), enc.mask, c.vision.patch_size, c.norm_pix_loss
            )
        loss.backward()

    def fb_clip():
        with ac():
            if c.clip_view == "full":
                ptoks = m.encoder(b.paired_images).tokens
            else:
                ptoks = m.encoder(b.paired_images, mask_ratio=c.mask_ratio, noise=ts.noise()[:bp]).tokens
            _, v = m._clip_image_features(ptoks)
            pooled, _ = m.text(b.input_ids, b.attention_mask)
            loss = label_guided_clip_loss(v, m.text_proj(pooled), b.labels, m.logit_scale.exp())
        loss.backward()

    def fb_mfd():
        with ac():
            enc = m.encoder(x, mask_ratio=c.mask_ratio, noise=ts.noise())
            loss = masked_feature_distillation_loss(
                m.feature_decoder(enc.tokens, enc.ids_restore), m.teacher(x)
            )
        loss.backward()

    fns = dict(
        combined=ts.step,
        mae=lambda: (fb_mae(), ts.finish(ema=False)),
        clip=lambda: (fb_clip(), ts.finish(ema=False)),
        mfd=lambda: (fb_mfd(), ts.finish(ema=True)),
    )
    res = alternate(fns, Timer(dev), warmup, repeats)
    fl = dict(
        combined=ts.flops()["total"],
        mae=count_flops(fb_mae, ts.opt)["total"],
        clip=count_flops(fb_clip, ts.opt)["total"],
        mfd=count_flops(fb_mfd, ts.opt)["total"],
    )
    rows = {k: dict(flops=fl[k], **summary(v)) for k, v in res.items()}
    parts_sum = sum(rows[k]["median_s"] for k in ("mae", "clip", "mfd"))
    flops_sum = sum(fl[k] for k in ("mae", "clip", "mfd"))
    return dict(
        size=size,
        bp=bp,
        bu=bu,
        clip_view=c.clip_view,
        precision=precision,
        mask_ratio=c.mask_ratio,
        rows=rows,
        parts_sum_s=parts_sum,
        overhead=rows["combined"]["median_s"] / parts_sum - 1,
        parts_flops_sum=flops_sum,
        flop_overhead=fl["combined"] / flops_sum - 1,
    )


def task_pair(
    device: str,
    size: str,
    kind: str,
    bp: int,
    bu: int,
    warmup: int,
    repeats: int,
    method: str = "maskedclip",
    clip_view: str = "full",
    precision: str = "fp32",
    seed: int = 0,
    threads: int | None = None,
) -> dict:
    """Two variants of the same training step on the same model, alternating: kind='attention' (timm fused_attn
    True/False), 'precision' (fp32 vs bf16 autocast). 'compile' is in `task_compile`."""
    dev = _setup(device, threads)
    cfg = model_config(size, method, clip_view)
    ts = TrainStep(cfg, bp, bu, dev, precision, seed)
    info = {}
    if kind == "attention":
        info["attention_modules"] = set_fused_attn(ts.model, True)

        def variant(flag):
            def run():
                set_fused_attn(ts.model, flag)
                ts.step()

            return run

        fns = {"fused": variant(True), "explicit": variant(False)}
    elif kind == "precision":

        def variant(p):
            def run():
                ts.precision = p
                ts.step()

            return run

        fns = {"fp32": variant("fp32"), "bf16": variant("bf16")}
    else:
        raise ValueError(f"kind: {kind!r}")
    res = alternate(fns, Timer(dev), warmup, repeats)
    rows = {k: summary(v) for k, v in res.items()}
    a, b = list(rows)
    fl = ts.flops()["total"]
    for k, r in rows.items():
        r["precision"] = k if kind == "precision" else precision
    return dict(
        size=size,
        kind=kind,
        method=method,
        bp=bp,
        bu=bu,
        images=ts.images,
        flops=fl,
        rows=rows,
        speedup=rows[b]["median_s"] and rows[a]["median_s"] / rows[b]["median_s"],
        first=a,
        second=b,
        **info,
    )


def task_compile(
    device: str,
    size: str,
    bp: int,
    bu: int,
    warmup: int,
    repeats: int,
    method: str = "maskedclip",
    clip_view: str = "full",
    precision: str = "fp32",
    seed: int = 0,
    threads: int | None = None,
    compile_warmup: int = 3,
) -> dict:
    """Eager vs `torch.compile` of the sub-modules the Trainer compiles (encoder, pixel decoder, bridge, feature decoder)
    on the same parameters, alternating after the compile warm-up. compile_s = time of the first `compile_warmup`
    compiled steps minus that many eager steps (median)."""
    dev = _setup(device, threads)
    cfg = model_config(size, method, clip_view)
    ts = TrainStep(cfg, bp, bu, dev, precision, seed)
    m = ts.model
    names = [n for n in ("encoder", "decoder", "bridge", "feature_decoder") if getattr(m, n) is not None]
    eager = {n: getattr(m, n) for n in names}
    timer = Timer(dev)
    for _ in range(warmup):
        ts.step()
    eager_first = [timer(ts.step) for _ in range(max(3, compile_warmup))]
    try:
        compiled = {n: torch.compile(eager[n]) for n in names}

        def use(which):
            for n in names:
                m._modules[n] = which[n]

        use(compiled)
        t0 = time.perf_counter()
        first = [timer(ts.step) for _ in range(compile_warmup)]
        wall = time.perf_counter() - t0
    except Exception as e:  # no compiler, unsupported op, ...: report why and move on
        for n in names:
            m._modules[n] = eager[n]
        return dict(
            size=size,
            method=method,
            skipped=True,
            reason=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}",
        )
    fns = {"eager": lambda: (use(eager), ts.step()), "compiled": lambda: (use(compiled), ts.step())}
    res = alternate(fns, timer, 1, repeats)
    use(eager)
    rows = {k: summary(v) for k, v in res.items()}
    eager_med = rows["eager"]["median_s"]
    return dict(
        size=size,
        method=method,
        bp=bp,
        bu=bu,
        images=ts.images,
        modules=names,
        rows=rows,
        skipped=False,
        first_compiled_steps_s=first,
        compile_s=max(0.0, wall - compile_warmup * statistics.median(eager_first)),
        speedup=eager_med / rows["compiled"]["median_s"],
    )


def task_scaling(
    device: str,
    size: str,
    method: str,
    points: list[list[int]],
    warmup: int,
    repeats: int,
    precision: str = "fp32",
    clip_view: str = "full",
    seed: int = 0,
    threads: int | None = None,
) -> dict:
    "Step time for each point (bp, bu, image_size) of one method, alternating; models are shared per image size."
    dev = _setup(device, threads)
    models: dict[int, TrainStep] = {}
    fns, meta = {}, {}
    for bp, bu, img in points:
        if img not in models:
            models[img] = TrainStep(
                model_config(size, method, clip_view, image_size=img), bp, bu, dev, precision, seed
            )
        base = models[img]
        key = f"{bp}+{bu}@{img}"
        batch = make_batch(base.model, bp, bu, dev, seed)
        c = base.cfg
        if base.model.uses_masked_pass:
            np_, nu_ = (bp, bu) if (c.use_mim or c.use_mfd) else (bp, 0)
            noises = [mask_noise_for_step(seed, i, np_, nu_, c.vision.num_patches).to(dev) for i in range(4)]
        else:
            noises = [None]

        def run(ts=base, batch=batch, noises=noises):
            ts.batch, ts.noises, ts.bp, ts.bu = batch, noises, batch.n_paired, batch.n_unpaired
            ts.step()

        fns[key] = run
        meta[key] = dict(bp=bp, bu=bu, image_size=img, images=bp + bu, tokens=c.vision.num_patches)
    res = alternate(fns, Timer(dev), warmup, repeats)
    rows = []
    for key, samples in res.items():
        r = dict(meta[key], **summary(samples))
        r["images_per_s"] = r["images"] / r["median_s"]
        rows.append(r)
    return dict(size=size, method=method, precision=precision, rows=rows)


def task_peak(device: str, quick: bool, threads: int | None = None) -> dict:
    """Matrix-multiply ceilings on this device, best of several repeats: fp32 `torch.mm` of large square matrices;
    fp32 `F.linear` with a ViT-B MLP shape (the oneDNN path `nn.Linear` takes on CPU); the same two in bf16."""
    dev = _setup(device, threads)
    timer = Timer(dev)
    cuda = dev.type == "cuda"
    n = 8192 if cuda else (1536 if quick else 2048)
    M, K, N = (8 * 197 * (8 if cuda else 1), 768, 3072)
    reps = 5 if quick else 10
    out = {}
    for dt_name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for kind in ("mm", "linear"):
            key = f"{kind}_{dt_name}"
            try:
                if kind == "mm":
                    a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
                    fn, fl, shape = (lambda a=a, b=b: torch.mm(a, b)), 2 * n**3, [n, n, n]
                else:
                    x, w, bias = (
                        torch.randn(M, K, device=dev, dtype=dt),
                        torch.randn(N, K, device=dev, dtype=dt),
                        torch.randn(N, device=dev, dtype=dt),
                    )
                    fn, fl, shape = (
                        (lambda x=x, w=w, bias=bias: F.linear(x, w, bias)),
                        2 * M * K * N,
                        [M, K, N],
                    )
                fn()  # library / kernel selection warm-up
                inner = max(1, int(0.05 / max(1e-6, timer(fn))))  # ~50 ms per sample
                ts = [timer(fn, inner) for _ in range(reps)]
                out[key] = dict(
                    gflops=fl / min(ts) / 1e9, median_gflops=fl / statistics.median(ts) / 1e9, shape=shape
                )
            except Exception as e:
                out[key] = dict(gflops=None, error=f"{type(e).__name__}: {str(e)[:200]}")
    g = lambda k: out.get(k, {}).get("gflops") or 0.0
    out["fp32_peak_gflops"] = max(g("mm_fp32"), g("linear_fp32"))
    out["fp32_peak_source"] = "mm_fp32" if g("mm_fp32") >= g("linear_fp32") else "linear_fp32"
    out["bf16_peak_gflops"] = max(g("mm_bf16"), g("linear_bf16")) or None
    out["bf16_peak_source"] = (
        ("mm_bf16" if g("mm_bf16") >= g("linear_bf16") else "linear_bf16")
        if out["bf16_peak_gflops"]
        else None
    )
    return out


def task_loader(
    device: str,
    image_size: int,
    n_paired: int,
    n_unpaired: int,
    bp: int,
    bu: int,
    workers: list[int],
    min_seconds: float,
    corpus_dir: str,
    threads: int | None = None,
) -> dict:
    """Images/s of `maskedclip.data.make_loader` (MAE train transform, tiny-tower tokenizer in the collate) on a
    synthetic corpus written by `maskedclip.synthetic.build_corpus` at `image_size`. One warm-up epoch (worker
    start-up, caches) excluded; then whole epochs are timed until at least `min_seconds` have passed."""
    _setup(device, threads)
    from maskedclip.data import make_loader
    from maskedclip.synthetic import build_corpus
    from maskedclip.text import TextTower

    root = Path(corpus_dir) / f"corpus-{image_size}px"
    t0 = time.perf_counter()
    if not (root / "corpus.json").is_file():
        build_corpus(
            root,
            n_paired=n_paired,
            n_unpaired=n_unpaired,
            n_task_per_split=0,
            size=image_size,
            seed=0,
            progress=False,
        )
    build_s = time.perf_counter() - t0
    tok = TextTower(get_preset("tiny").text).tokenize
    rows = []
    for w in workers:
        L = make_loader(
            root / "pretrain" / "paired.jsonl",
            root / "pretrain" / "unpaired.jsonl",
            root=root,
            tokenize=tok,
            image_size=image_size,
            batch_size_paired=bp,
            batch_size_unpaired=bu,
            num_workers=w,
            check_images=False,
            verbose=False,
        )
        with L:
            for _ in L:
                pass  # warm-up epoch
            n, e, t = 0, 0, time.perf_counter()
            while e == 0 or time.perf_counter() - t < min_seconds:
                for b in L:
                    n += b.n_paired + b.n_unpaired
                e += 1
            dt = time.perf_counter() - t
        rows.append(
            dict(
                workers=w,
                images=n,
                epochs=e,
                seconds=dt,
                images_per_s=n / dt,
                images_per_s_per_worker=n / dt / max(1, w),
            )
        )
    return dict(
        image_size=image_size,
        n_paired=n_paired,
        n_unpaired=n_unpaired,
        bp=bp,
        bu=bu,
        corpus_build_s=build_s,
        steps_per_epoch=len(L),
        rows=rows,
    )


# ------------------------------------------------------------------------------------------------ child plumbing


def _setup(device: str, threads: int | None) -> torch.device:
    if threads:
        torch.set_num_threads(int(threads))
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.init()
    return dev


TASKS = dict(
    method=task_method,
    masking=task_masking,
    parts=task_parts,
    pair=task_pair,
    compile=task_compile,
    scaling=task_scaling,
    peak=task_peak,
    loader=task_loader,
)


def child_main(task: str, kwargs: dict, conn) -> None:
    "Entry point of a measurement child: run one task, send ('ok', result) or ('error', traceback) through `conn`."
    try:
        t0 = time.perf_counter()
        res = TASKS[task](**kwargs)
        res["task_wall_s"] = time.perf_counter() - t0
        res["threads"] = torch.get_num_threads()
        conn.send(("ok", res))
    except BaseException as e:
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"))
    finally:
        conn.close()
