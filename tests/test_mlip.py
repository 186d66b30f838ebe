"""Tests for maskedclip.mlip against independent references (POT, float64 loops, hand-written losses)."""

import math

import ot
import pytest
import torch
import torch.nn.functional as F

from maskedclip.mlip import (
    SemanticIntegrityEstimator,
    integrity_weighted_contrastive_loss,
    ot_local_loss,
    ot_local_plan,
    ot_local_similarity,
    pyramid_weights,
    sample_mask_from_phi,
    sentence_pool,
    sinkhorn,
)

torch.set_num_threads(2)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand_marginal(n, g, dtype=torch.float64):
    x = torch.rand(n, generator=g, dtype=dtype) + 0.05
    return x / x.sum()


def _pot_plan(cost, a, b, eps):
    "float64 reference plan from POT's log-domain Sinkhorn, run to tight convergence."
    a, b = a.double(), b.double()
    a, b = (a / a.sum()).numpy(), (b / b.sum()).numpy()  # exactly equal masses in float64
    return torch.from_numpy(
        ot.sinkhorn(
            a, b, cost.double().numpy(), reg=eps, method="sinkhorn_log", numItermax=20000, stopThr=1e-13
        )
    )


# ----------------------------------------------------------------------------------------------- sinkhorn


@pytest.mark.parametrize("eps", [0.1, 0.05, 0.5])
@pytest.mark.parametrize("shape", [(7, 5), (12, 3)])
def test_sinkhorn_matches_pot_float64(eps, shape):
    g = _gen(0)
    K, M = shape
    cost = 2 * torch.rand(K, M, generator=g, dtype=torch.float64)
    a, b = _rand_marginal(K, g), _rand_marginal(M, g)
    T = sinkhorn(cost, a, b, eps=eps, n_iters=20000, tol=1e-12)
    ref = _pot_plan(cost, a, b, eps)
    assert T.dtype == torch.float64
    assert torch.allclose(T.sum(-1), a, atol=1e-10) and torch.allclose(T.sum(-2), b, atol=1e-10)
    assert torch.allclose(T, ref, atol=1e-9, rtol=1e-6)


def test_sinkhorn_float32_default_settings():
    g = _gen(1)
    cost = 1 - torch.rand(64, 9, 6, generator=g)  # cosine-like cost in [0, 1]
    a = torch.full((64, 9), 1 / 9)
    b = torch.full((64, 6), 1 / 6)
    T = sinkhorn(cost, a, b)  # eps 0.1, <= 100 iters, tol 1e-6
    assert T.dtype == torch.float32
    assert (T.sum(-1) - a).abs().max() < 1e-4 and (T.sum(-2) - b).abs().max() < 1e-4
    for i in (0, 17, 63):
        ref = _pot_plan(cost[i], a[i], b[i], 0.1)
        assert torch.allclose(T[i].double(), ref, atol=2e-5)


def test_sinkhorn_zero_mass_padding_matches_unpadded_pot():
    g = _gen(2)
    K, M = 8, 6
    cost = 2 * torch.rand(K, M, generator=g, dtype=torch.float64)
    rows, cols = torch.tensor([0, 2, 3, 6, 7]), torch.tensor([1, 2, 4])
    a = torch.zeros(K, dtype=torch.float64)
    a[rows] = _rand_marginal(len(rows), g)
    b = torch.zeros(M, dtype=torch.float64)
    b[cols] = _rand_marginal(len(cols), g)
    T = sinkhorn(cost, a, b, eps=0.1, n_iters=20000, tol=1e-12)
    ref = _pot_plan(cost[rows][:, cols], a[rows], b[cols], 0.1)
    assert torch.isfinite(T).all()
    assert torch.allclose(T[rows][:, cols], ref, atol=1e-9, rtol=1e-6)
    pad = torch.ones(K, M, dtype=torch.bool)
    pad[rows.view(-1, 1), cols.view(1, -1)] = False
    assert T[pad].abs().max().item() == 0.0
    assert torch.allclose(T.sum(-1), a, atol=1e-10) and torch.allclose(T.sum(-2), b, atol=1e-10)


def test_sinkhorn_batched_equals_per_item_with_padding():
    g = _gen(3)
    B1, B2, K, M = 3, 4, 10, 5
    cost = 2 * torch.rand(B1, B2, K, M, generator=g, dtype=torch.float64)
    a = torch.rand(B1, B2, K, generator=g, dtype=torch.float64) * (torch.rand(B1, B2, K, generator=g) > 0.3)
    b = torch.rand(B1, B2, M, generator=g, dtype=torch.float64) * (torch.rand(B1, B2, M, generator=g) > 0.3)
    a[..., 0] += 0.1
    b[..., 0] += 0.1  # at least one non-empty row/col per item
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    # fixed number of iterations (tol=0): batched is exactly the per-item computation
    Tb = sinkhorn(cost, a, b, eps=0.1, n_iters=50, tol=0)
    # converged: batched equals per-item up to the tolerance. The on-device check (D29) runs all `n_iters` and freezes
    # the potentials once converged, so the cap costs time, not accuracy: every run here converges in < 300
    # iterations, and each asserts that it converged before the cap.
    cap = 2000
    Tc, it = sinkhorn(cost, a, b, eps=0.1, n_iters=cap, tol=1e-12, return_iters=True)
    assert it < cap, it
    for i in range(B1):
        for j in range(B2):
            assert torch.allclose(
                Tb[i, j], sinkhorn(cost[i, j], a[i, j], b[i, j], eps=0.1, n_iters=50, tol=0), atol=1e-14
            )
            Ti, it = sinkhorn(
                cost[i, j], a[i, j], b[i, j], eps=0.1, n_iters=cap, tol=1e-12, return_iters=True
            )
            assert it < cap and torch.allclose(Tc[i, j], Ti, atol=1e-10), (i, j, it)
    # broadcasting marginals across a leading dim gives the same result as expanding them
    Tbr = sinkhorn(cost, a[:, :1], b[:1], eps=0.1, n_iters=50, tol=0)
    assert torch.allclose(
        Tbr, sinkhorn(cost, a[:, :1].expand_as(a), b[:1].expand_as(b), eps=0.1, n_iters=50, tol=0)
    )


def test_sinkhorn_early_stop_and_edge_cases():
    g = _gen(4)
    cost = torch.rand(5, 4, generator=g, dtype=torch.float64)
    a, b = _rand_marginal(5, g), _rand_marginal(4, g)
    _, n_loose = sinkhorn(cost, a, b, eps=0.5, n_iters=1000, tol=1e-3, return_iters=True)
    _, n_tight = sinkhorn(cost, a, b, eps=0.5, n_iters=1000, tol=1e-12, return_iters=True)
    _, n_none = sinkhorn(cost, a, b, eps=0.5, n_iters=37, tol=0, return_iters=True)
    assert 1 <= n_loose < n_tight < 1000 and n_none == 37
    # an all-padding item (zero total mass) gives a zero plan and finite gradients
    c2 = torch.rand(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    a2 = torch.stack([torch.zeros(3, dtype=torch.float64), _rand_marginal(3, g)])
    b2 = torch.stack([torch.zeros(4, dtype=torch.float64), _rand_marginal(4, g)])
    T2 = sinkhorn(c2, a2, b2, n_iters=30)
    (T2 * torch.randn(2, 3, 4, generator=g, dtype=torch.float64)).sum().backward()
    assert T2[0].abs().max() == 0 and torch.isfinite(T2).all() and torch.isfinite(c2.grad).all()
    with pytest.raises(ValueError, match="total mass"):
        sinkhorn(cost, a, 2 * b)
    with pytest.raises(ValueError, match=">= 0"):
        sinkhorn(cost, a - 0.5, b)
    with pytest.raises(ValueError, match="eps"):
        sinkhorn(cost, a, b, eps=0)
    with pytest.raises(ValueError, match="marginals"):
        sinkhorn(cost, b, a)


def test_sinkhorn_differentiable_unrolled():
    "Called with grad, the (fixed-iteration) Sinkhorn is differentiable: gradcheck w.r.t. the cost."
    g = _gen(5)
    cost = torch.rand(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.tensor([0.3, 0.0, 0.2, 0.5], dtype=torch.float64)  # includes a padded row
    b = _rand_marginal(3, g)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda c: (sinkhorn(c, a, b, eps=0.2, n_iters=20, tol=0) * w).sum(), (cost,)
    )


# ------------------------------------------------------------------------------------------ sentence pool


def test_sentence_pool_matches_loop_reference():
    g = _gen(6)
    B, T, D, S = 4, 20, 6, 3
    emb = torch.randn(B, T, D, generator=g)
    att = torch.ones(B, T, dtype=torch.long)
    att[1, 15:] = 0
    att[3, 8:] = 0
    sid = torch.randint(-1, 5, (B, T), generator=g)  # ids 3, 4 exceed S=3 and must be dropped
    sid[2] = -1  # report 2 has no sentence token -> fallback
    sid[1, 16] = 0  # a padded token inside a sentence id must not count
    out, mask = sentence_pool(emb, att, sid, max_sentences=S)
    assert out.shape == (B, S, D) and mask.dtype == torch.bool
    for i in range(B):
        for m in range(S):
            idx = [t for t in range(T) if sid[i, t] == m and att[i, t] == 1]
            if i == 2 and m == 0:
                idx = [t for t in range(T) if att[i, t] == 1]
            assert mask[i, m].item() == bool(idx)
            ref = emb[i, idx].mean(0) if idx else torch.zeros(D)
            assert torch.allclose(out[i, m], ref, atol=1e-6)
    _, mask_nofb = sentence_pool(emb, att, sid, max_sentences=S, fallback_to_all_tokens=False)
    assert not mask_nofb[2].any() and torch.equal(mask_nofb[[0, 1, 3]], mask[[0, 1, 3]])
    with pytest.raises(ValueError, match="sentence_ids"):
        sentence_pool(emb, att, sid[:, :5], S)


# -------------------------------------------------------------------------------------- OT similarity/loss


def _random_ot_batch(seed, dtype=torch.float64, B=3, K=7, M=4, D=5):
    g = _gen(seed)
    p = torch.randn(B, K, D, generator=g, dtype=dtype)
    q = torch.randn(B, M, D, generator=g, dtype=dtype)
    pm = torch.ones(B, K, dtype=torch.bool)
    pm[1, 5:] = False
    pm[2, 0] = False
    sm = torch.ones(B, M, dtype=torch.bool)
    sm[0, 2:] = False
    sm[2, 3] = False
    return p, pm, q, sm


def test_ot_local_similarity_matches_per_pair_pot_reference():
    p, pm, q, sm = _random_ot_batch(7)
    w = torch.rand(3, 7, generator=_gen(8), dtype=torch.float64) + 0.1
    for weights in (None, w):
        s = ot_local_similarity(p, pm, q, sm, eps=0.1, n_iters=5000, tol=1e-12, patch_weights=weights)
        assert s.shape == (3, 3)
        for i in range(3):
            for j in range(3):
                P = F.normalize(p[i][pm[i]], dim=-1)
                Q = F.normalize(q[j][sm[j]], dim=-1)
                cos = P @ Q.T
                mu = (
                    torch.full((len(P),), 1 / len(P), dtype=torch.float64)
                    if weights is None
                    else weights[i][pm[i]] / weights[i][pm[i]].sum()
                )
                nu = torch.full((len(Q),), 1 / len(Q), dtype=torch.float64)
                T = _pot_plan(1 - cos, mu, nu, 0.1)
                assert abs(s[i, j].item() - (T * cos).sum().item()) < 1e-9
    # rectangular (Bi != Bt) similarity for retrieval-style use
    assert ot_local_similarity(p[:2], pm[:2], q, sm).shape == (2, 3)


def test_ot_padding_content_is_ignored():
    "Whatever sits in padded slots (zeros, garbage, NaN) changes neither s nor the valid gradients."
    p, pm, q, sm = _random_ot_batch(16)
    outs = []
    for fill in (0.0, 1e3, float("nan")):
        pp, qq = p.clone(), q.clone()
        pp[~pm] = fill
        qq[~sm] = fill
        pp.requires_grad_(True)
        qq.requires_grad_(True)
        loss = ot_local_loss(pp, pm, qq, sm, logit_scale=5.0)
        loss.backward()
        outs.append((loss.detach(), pp.grad[pm], qq.grad[sm]))
    for loss, gp, gq in outs[1:]:
        assert torch.isfinite(loss) and torch.allclose(loss, outs[0][0], atol=1e-12)
        assert torch.allclose(gp, outs[0][1], atol=1e-12) and torch.allclose(gq, outs[0][2], atol=1e-12)


def test_ot_plan_marginals_follow_patch_weights():
    p, pm, q, sm = _random_ot_batch(9, dtype=torch.float32)
    w = torch.rand(3, 7, generator=_gen(10)) + 0.1
    T = ot_local_plan(p, pm, q, sm, patch_weights=w)  # (3, 3, K, M)
    mu = w * pm
    mu = mu / mu.sum(-1, keepdim=True)
    nu = sm.float() / sm.sum(-1, keepdim=True)
    assert (T.sum(-1) - mu[:, None]).abs().max() < 1e-4
    assert (T.sum(-2) - nu[None]).abs().max() < 1e-4
    assert not T.requires_grad


def test_ot_local_loss_gradcheck_fixed_plan():
    p, pm, q, sm = _random_ot_batch(11)
    p.requires_grad_(True)
    q.requires_grad_(True)
    plan = ot_local_plan(p, pm, q, sm, eps=0.1, n_iters=200)
    fn = lambda pe, qe: ot_local_loss(pe, pm, qe, sm, logit_scale=5.0, plan=plan)
    assert torch.autograd.gradcheck(fn, (p, q))
    # the loss with its own (no-grad) plan has exactly the fixed-plan gradient
    (gp,) = torch.autograd.grad(ot_local_loss(p, pm, q, sm, 5.0, n_iters=200), p)
    (gp_fixed,) = torch.autograd.grad(fn(p, q), p)
    assert torch.allclose(gp, gp_fixed, atol=1e-12)
    # padded patches get no gradient
    assert gp[~pm].abs().max() == 0
    # a caller-supplied plan is treated as a constant
    plan_rg = plan.clone().requires_grad_(True)
    ot_local_loss(p, pm, q, sm, 5.0, plan=plan_rg).backward()
    assert plan_rg.grad is None


def _grouped_batch(seed, B=6, K=16, M=4, D=32, noise=0.05):
    g = _gen(seed)
    patches = torch.randn(B, K, D, generator=g)
    groups = torch.randperm(K, generator=g).view(M, K // M)  # sentence m = mean of a subset of patches
    sents = patches[:, groups].mean(2) + noise * torch.randn(B, M, D, generator=g)
    return patches, sents


def test_ot_similarity_own_sentences_beat_shuffled():
    patches, sents = _grouped_batch(12)
    B = patches.shape[0]
    s = ot_local_similarity(patches, None, sents, None)
    off = s - 10 * torch.eye(B)
    assert (s.diagonal() > off.max(1).values).all() and (s.diagonal() > off.max(0).values).all()
    perm = torch.roll(torch.arange(B), 1)
    s_shuf = ot_local_similarity(patches, None, sents[perm], None)
    assert (s.diagonal() > s_shuf.diagonal() + 0.1).all()
    own = ot_local_loss(patches, None, sents, None, logit_scale=1 / 0.07)
    shuffled = ot_local_loss(patches, None, sents[perm], None, logit_scale=1 / 0.07)
    assert own < 0.5 < math.log(B) < shuffled
    # OT is invariant to the order of patches within an image and of sentences within a report
    s_perm = ot_local_similarity(
        patches[:, torch.randperm(16, generator=_gen(13))],
        None,
        sents[:, torch.randperm(4, generator=_gen(14))],
        None,
    )
    assert torch.allclose(s, s_perm, atol=1e-5)


def test_ot_inputs_validated():
    p, pm, q, sm = _random_ot_batch(15)
    with pytest.raises(ValueError, match="bool"):
        ot_local_similarity(p, pm.double(), q, sm)
    bad = sm.clone()
    bad[1] = False
    with pytest.raises(ValueError, match="report"):
        ot_local_similarity(p, pm, q, bad)
    with pytest.raises(ValueError, match="as many"):
        ot_local_loss(p[:2], pm[:2], q, sm, 1.0)


# ------------------------------------------------------------------------------------ integrity estimator


def test_estimator_starts_at_ln2_for_any_visibility():
    est = SemanticIntegrityEstimator(196, 14)
    vis = torch.stack(
        [
            torch.zeros(196),
            torch.ones(196),
            (torch.rand(196, generator=_gen(16)) > 0.5).float(),
            (torch.rand(196, generator=_gen(17)) > 0.9).float(),
        ]
    )
    rho = est(vis)
    assert rho.shape == (4,) and torch.allclose(rho, torch.full((4,), math.log(2)))
    assert est.phi.shape == (196,) and est.phi_map().shape == (14, 14)
    assert est.phi.abs().max() == 0 and est.proj.bias.item() == 0


def test_pyramid_init_matches_maco_construction():
    w = torch.cat([torch.linspace(0.5, 1, 7), torch.linspace(1, 0.5, 7)]).unsqueeze(-1)
    ref = (w @ w.t()).view(-1).softmax(-1)
    assert torch.allclose(pyramid_weights(14, 14), ref)
    est = SemanticIntegrityEstimator(196, (14, 14), init="pyramid")
    assert torch.allclose(est.phi, ref)
    vis = (torch.rand(3, 196, generator=_gen(18)) > 0.5).float()
    assert torch.allclose(est(vis), F.softplus(vis @ ref))
    rect = SemanticIntegrityEstimator(6, (2, 3), init="pyramid")
    assert rect.phi_map().shape == (2, 3)


def test_integrity_gradient_reaches_phi_through_loss():
    torch.manual_seed(0)
    est = SemanticIntegrityEstimator(16, 4).double()
    with torch.no_grad():
        est.proj.weight.normal_(0, 0.3)
    g = _gen(19)
    vis = (torch.rand(6, 16, generator=g) > 0.5).double()
    vis[:, 3] = 0  # position 3 is never visible -> its weight gets no gradient
    img = torch.randn(6, 8, generator=g, dtype=torch.float64)
    txt = torch.randn(6, 8, generator=g, dtype=torch.float64)
    loss = integrity_weighted_contrastive_loss(img, txt, est(vis), 7.0)
    loss.backward()
    grad = est.proj.weight.grad[0].clone()
    assert grad.abs().sum() > 1e-6 and grad[3] == 0
    # finite differences on the weights (the WCE weights are ρ̄ = stopgrad(ρ): hold them fixed)
    w0 = est.proj.weight.detach().clone()
    rho_bar = est(vis).detach()

    def loss_at(wt):
        rho = F.softplus(vis @ wt[0] + est.proj.bias.detach())
        S = 7.0 * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
        nll = lambda x: -(x.diagonal() - x.logsumexp(1))
        return (
            nll(rho[:, None] * S).mean()
            + nll(rho[:, None] * S.T).mean()
            + (rho_bar * nll(S)).sum() / rho_bar.sum()
            + (rho_bar * nll(S.T)).sum() / rho_bar.sum()
        ) / 4

    h = 1e-6
    for l in (0, 5, 11):
        e = torch.zeros_like(w0)
        e[0, l] = h
        fd = (loss_at(w0 + e) - loss_at(w0 - e)) / (2 * h)
        assert abs(fd.item() - grad[l].item()) < 1e-7


def test_content_mode_estimator():
    est = SemanticIntegrityEstimator(9, 3, mode="content", embed_dim=4, hidden_dim=5)
    g = _gen(20)
    tok = torch.randn(2, 9, 4, generator=g)
    vis = (torch.rand(2, 9, generator=g) > 0.4).float()
    assert torch.allclose(est(vis, tok), vis.mean(-1))  # φ ≡ 1/2 at init
    with torch.no_grad():
        est.mlp[-1].weight.normal_()
        est.mlp[-1].bias.fill_(0.3)
    phi = est.phi_tokens(tok)
    assert torch.allclose(est(vis, tok), (phi * vis).sum(-1) / phi.sum(-1))
    assert est.phi_map(tok).shape == (2, 3, 3)
    est(vis, tok).sum().backward()
    assert est.mlp[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="patch_tokens"):
        est(vis)
    with pytest.raises(ValueError, match="embed_dim"):
        SemanticIntegrityEstimator(9, 3, mode="content")
    with pytest.raises(ValueError, match="visibility"):
        SemanticIntegrityEstimator(9, 3)(torch.ones(2, 8))


# --------------------------------------------------------------------------------------- phi mask sampler


@pytest.mark.parametrize("L,r", [(196, 0.75), (196, 0.5), (10, 0.33), (49, 0.0)])
def test_sample_mask_from_phi_exact_count_and_mae_contract(L, r):
    phi = torch.randn(L, generator=_gen(21))
    mask, ids_shuffle, ids_restore = sample_mask_from_phi(phi, 8, r, _gen(22))
    keep = int(L * (1 - r))
    assert mask.shape == (8, L) and ((1 - mask).sum(1) == keep).all()
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (torch.gather(mask, 1, ids_shuffle)[:, :keep] == 0).all()
    assert (torch.gather(mask, 1, ids_shuffle)[:, keep:] == 1).all()
    assert (torch.gather(ids_shuffle, 1, ids_restore) == torch.arange(L)).all()
    again = sample_mask_from_phi(phi, 8, r, _gen(22))[0]
    assert torch.equal(mask, again)


def test_sample_mask_from_phi_follows_phi():
    L = 16
    phi = torch.zeros(L)
    peaked = [2, 7, 11]
    phi[peaked] = 5.0
    mask, _, _ = sample_mask_from_phi(phi, 4000, 0.75, _gen(23))  # keep 4 of 16
    freq = (1 - mask).mean(0)
    others = [l for l in range(L) if l not in peaked]
    assert freq[peaked].min() > 0.9 and freq[others].max() < 0.2
    assert freq[peaked].min() > 5 * freq[others].max()
    # keeping one patch: the kept position is distributed exactly as softmax(φ / t)
    phi2 = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5, 1.5])
    m2, _, _ = sample_mask_from_phi(phi2, 30000, 1 - 1 / 6 - 1e-9, _gen(24), temperature=2.0)
    assert ((1 - m2).sum(1) == 1).all()
    assert torch.allclose((1 - m2).mean(0), (phi2 / 2.0).softmax(0), atol=0.012)
    # φ ≡ 0 (the zero init) is uniform random masking
    m3, _, _ = sample_mask_from_phi(torch.zeros(L), 4000, 0.5, _gen(25))
    assert ((1 - m3).mean(0) - 0.5).abs().max() < 0.04
    with pytest.raises(ValueError, match="mask_ratio"):
        sample_mask_from_phi(phi, 2, 1.0)


# ---------------------------------------------------------------------------- integrity-weighted loss


def _unit_rows(x):
    return [[e / math.sqrt(sum(f * f for f in v)) for e in v] for v in x.tolist()]


def _clip_loss_reference(img, txt, scale):
    "Plain CLIP loss, written with explicit float64 loops."
    img, txt = _unit_rows(img), _unit_rows(txt)
    B = len(img)
    S = [[scale * sum(x * y for x, y in zip(img[i], txt[j])) for j in range(B)] for i in range(B)]
    i2t = sum(-S[i][i] + math.log(sum(math.exp(S[i][j]) for j in range(B))) for i in range(B)) / B
    t2i = sum(-S[j][j] + math.log(sum(math.exp(S[i][j]) for i in range(B))) for j in range(B)) / B
    return (i2t + t2i) / 2


def _iw_loss_reference(img, txt, rho, scale):
    "MaCo's four-term loss, written with explicit float64 loops."
    img, txt = _unit_rows(img), _unit_rows(txt)
    r = rho.tolist()
    B = len(img)
    S = [[scale * sum(x * y for x, y in zip(img[i], txt[j])) for j in range(B)] for i in range(B)]
    St = [[S[j][i] for j in range(B)] for i in range(B)]

    def ce_row(row, i, f=1.0):
        return -f * row[i] + math.log(sum(math.exp(f * x) for x in row))

    t1 = sum(ce_row(S[i], i, r[i]) for i in range(B)) / B
    t2 = sum(ce_row(St[i], i, r[i]) for i in range(B)) / B
    t3 = sum(r[i] * ce_row(S[i], i) for i in range(B)) / sum(r)
    t4 = sum(r[i] * ce_row(St[i], i) for i in range(B)) / sum(r)
    return (t1 + t2 + t3 + t4) / 4


def test_integrity_loss_equals_clip_for_unit_rho():
    g = _gen(26)
    img, txt = torch.randn(7, 12, generator=g), torch.randn(7, 12, generator=g)
    loss = integrity_weighted_contrastive_loss(img, txt, torch.ones(7), 1 / 0.07)
    assert abs(loss.item() - _clip_loss_reference(img, txt, 1 / 0.07)) < 1e-4
    img64, txt64 = img.double(), txt.double()
    loss64 = integrity_weighted_contrastive_loss(img64, txt64, torch.ones(7, 1, dtype=torch.float64), 3.0)
    assert abs(loss64.item() - _clip_loss_reference(img64, txt64, 3.0)) < 1e-12


def test_integrity_loss_matches_hand_reference_and_stopgrad():
    g = _gen(27)
    img = torch.randn(6, 10, generator=g, dtype=torch.float64)
    txt = torch.randn(6, 10, generator=g, dtype=torch.float64)
    rho = (torch.rand(6, generator=g, dtype=torch.float64) * 2 + 0.1).requires_grad_(True)
    loss = integrity_weighted_contrastive_loss(img, txt, rho, 4.0)
    assert abs(loss.item() - _iw_loss_reference(img, txt, rho.detach(), 4.0)) < 1e-12
    # ρ gets gradient only through the two ρ-scaled CE terms (the WCE weights are stopgrad(ρ))
    loss.backward()
    S = 4.0 * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    r = rho.detach().clone().requires_grad_(True)
    nll = lambda x: -(x.diagonal() - x.logsumexp(1))
    ((nll(r[:, None] * S).mean() + nll(r[:, None] * S.T).mean()) / 4).backward()
    assert torch.allclose(rho.grad, r.grad, atol=1e-12)
    with pytest.raises(ValueError, match="rho"):
        integrity_weighted_contrastive_loss(img, txt, rho[:3], 4.0)
