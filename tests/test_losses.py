"Each loss against an independent float64 re-computation, identities and gradcheck."

import itertools

import pytest
import torch
import torch.nn.functional as F

from maskedclip.losses import label_guided_clip_loss, masked_feature_distillation_loss, mim_loss


def ref_mim(imgs, pred, mask, p, norm_pix):
    "Plain-loop float64 reference of MAE's loss."
    imgs, pred, mask = imgs.double(), pred.double(), mask.double()
    n, c, h, w = imgs.shape
    g = h // p
    num = den = 0.0
    for b in range(n):
        for l in range(g * g):
            if mask[b, l] == 0:
                continue
            i, j = divmod(l, g)
            t = imgs[b, :, i * p : (i + 1) * p, j * p : (j + 1) * p].permute(1, 2, 0).reshape(-1)
            if norm_pix:
                mu = t.mean()
                var = ((t - mu) ** 2).sum() / (t.numel() - 1)
                t = (t - mu) / torch.sqrt(var + 1e-6)
            num += ((pred[b, l] - t) ** 2).mean().item()
            den += 1
    return num / den


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mim_loss_matches_reference(norm_pix):
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(3, 3, 16, 16, generator=g)
    pred = torch.randn(3, 16, 48, generator=g)
    mask = (torch.rand(3, 16, generator=g) > 0.4).float()
    assert mim_loss(imgs, pred, mask, 4, norm_pix).item() == pytest.approx(
        ref_mim(imgs, pred, mask, 4, norm_pix), rel=1e-5
    )


def test_mim_loss_ignores_kept_patches():
    imgs = torch.randn(2, 3, 16, 16)
    pred = torch.randn(2, 16, 48)
    mask = torch.zeros(2, 16)
    mask[:, ::3] = 1
    pred2 = pred.clone()
    pred2[mask == 0] = 1e3  # garbage where patches were kept
    assert torch.equal(mim_loss(imgs, pred, mask, 4), mim_loss(imgs, pred2, mask, 4))
    pred.requires_grad_(True)
    mim_loss(imgs, pred, mask, 4).backward()
    assert (pred.grad[mask == 0] == 0).all() and (pred.grad[mask == 1] != 0).any()


def ref_lg_clip(v, u, labels, scale):
    "UniCL written with explicit loops in float64."
    v = F.normalize(v.double(), dim=-1)
    u = F.normalize(u.double(), dim=-1)
    B = len(v)
    S = scale * v @ u.t()

    def direction(S):
        total = 0.0
        for i in range(B):
            pos = [k for k in range(B) if k == i or (labels[k] == labels[i] and labels[i] >= 0)]
            lse = torch.logsumexp(S[i], 0)
            total += -sum((S[i, k] - lse).item() for k in pos) / len(pos)
        return total / B

    return 0.5 * direction(S) + 0.5 * direction(S.t())


@pytest.mark.parametrize("seed", range(4))
def test_label_guided_clip_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B = 7
    v, u = torch.randn(B, 5, generator=g), torch.randn(B, 5, generator=g)
    labels = torch.randint(-1, 3, (B,), generator=g)
    got = label_guided_clip_loss(v, u, labels, 7.5).item()
    assert got == pytest.approx(ref_lg_clip(v, u, labels.tolist(), 7.5), rel=1e-5)


def test_label_guided_equals_clip_when_labels_distinct():
    g = torch.Generator().manual_seed(3)
    v, u = torch.randn(9, 8, generator=g), torch.randn(9, 8, generator=g)
    s = 1 / 0.07
    logits = s * F.normalize(v, dim=-1) @ F.normalize(u, dim=-1).t()
    clip = 0.5 * (F.cross_entropy(logits, torch.arange(9)) + F.cross_entropy(logits.t(), torch.arange(9)))
    assert torch.allclose(
        label_guided_clip_loss(v, u, torch.randperm(9, generator=g) * 3, s), clip, atol=1e-5
    )
    assert torch.allclose(label_guided_clip_loss(v, u, None, s), clip, atol=1e-5)


def test_label_guided_clip_is_permutation_invariant():
    g = torch.Generator().manual_seed(5)
    v, u = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    labels = torch.tensor([0, 1, 0, 2, 1, 1, -1, 2])
    perm = torch.randperm(8, generator=g)
    a = label_guided_clip_loss(v, u, labels, 3.0)
    b = label_guided_clip_loss(v[perm], u[perm], labels[perm], 3.0)
    assert torch.allclose(a, b, atol=1e-6)


def test_label_guided_clip_shared_label_changes_targets():
    # two pairs with the same label: the loss must differ from plain CLIP (targets are spread over both)
    v = torch.eye(3)
    u = torch.eye(3)
    assert not torch.allclose(
        label_guided_clip_loss(v, u, torch.tensor([0, 0, 1]), 5.0),
        label_guided_clip_loss(v, u, torch.tensor([0, 1, 2]), 5.0),
    )


def test_mfd_matches_reference_and_range():
    g = torch.Generator().manual_seed(0)
    p, t = torch.randn(2, 6, 4, generator=g), torch.randn(2, 6, 4, generator=g)
    ref = (
        -sum(
            (p[n, l].double() @ t[n, l].double() / (p[n, l].double().norm() * t[n, l].double().norm())).item()
            for n, l in itertools.product(range(2), range(6))
        )
        / 12
    )
    assert masked_feature_distillation_loss(p, t).item() == pytest.approx(ref, rel=1e-5)
    assert -1 <= masked_feature_distillation_loss(p, t).item() <= 1
    mask = torch.zeros(2, 6)
    mask[0, 1] = 1
    assert masked_feature_distillation_loss(p, t, mask).item() == pytest.approx(
        -F.cosine_similarity(p[0, 1], t[0, 1], dim=0).item(), rel=1e-5
    )
    # the target receives no gradient
    t.requires_grad_(True)
    p.requires_grad_(True)
    masked_feature_distillation_loss(p, t).backward()
    assert t.grad is None and p.grad is not None


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    pred = torch.randn(2, 4, 48, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 1]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: _mim64(imgs, p, mask), (pred,))
    v = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    u = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, -1, 1])
    assert torch.autograd.gradcheck(lambda a, b, c: label_guided_clip_loss(a, b, labels, c), (v, u, s))
    f = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: masked_feature_distillation_loss(a, t), (f,))


def _mim64(imgs, pred, mask):
    return mim_loss(imgs, pred, mask, 4, True)
