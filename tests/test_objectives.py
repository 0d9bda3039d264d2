"""GRPO and DPO objectives against their formulas (DeepSeekMath §4.1, DAPO, Dr. GRPO, DPO eq. 7)."""
import math

import pytest
import torch
import torch.nn.functional as F

from posttrain.objectives import (aggregate, dpo_loss, group_advantages, grpo_token_terms, k3_kl,
                                  offpolicy_sequence_keep, truncated_is_weights)


def test_group_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    a = group_advantages(r)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64).std()
    torch.testing.assert_close(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=torch.float64) / (std + 1e-6))
    assert torch.equal(a[1], torch.zeros(4, dtype=torch.float64))        # no signal in a uniform group
    torch.testing.assert_close(group_advantages(r, std_normalize=False)[0],
                               torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=torch.float64))   # Dr. GRPO
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(3, 1))


def test_k3_is_nonnegative_unbiased_and_clamped():
    logp = torch.randn(1000, dtype=torch.float64)
    ref = torch.randn(1000, dtype=torch.float64)
    kl = k3_kl(logp, ref)
    d = ref - logp
    torch.testing.assert_close(kl, d.exp() - d - 1)
    assert (kl >= 0).all() and k3_kl(logp, logp).abs().max() == 0
    # unbiased: E_{x~p}[k3] = KL(p || q) for categorical p, q
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    exact = (p * (p / q).log()).sum()
    est = (p * k3_kl(p.log(), q.log())).sum()
    torch.testing.assert_close(est, exact)
    # a reference far likelier than the policy: exp(200) overflows fp32 without the clamp
    x = torch.tensor([-200.0], requires_grad=True)
    out = k3_kl(x, torch.tensor([0.0]), clamp=10.0)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert not torch.isfinite(k3_kl(x.detach(), torch.tensor([0.0]), clamp=1e9)).all()


def test_clipped_surrogate_low_and_high():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[0.5, 0.9, 1.2, 1.5]])).requires_grad_()
    for adv, eps_low, eps_high in ((1.0, 0.2, 0.28), (-1.0, 0.2, 0.28)):
        loss, clipped, kl = grpo_token_terms(logp, old, torch.tensor([adv]), eps_low=eps_low, eps_high=eps_high)
        r = logp.detach().exp()[0]
        want = -torch.minimum(r * adv, r.clamp(1 - eps_low, 1 + eps_high) * adv)
        torch.testing.assert_close(loss[0], want)
        assert kl is None
        # positive advantage: ratios above 1 + eps_high stop pulling; negative: ratios below 1 - eps_low
        expect = [False, False, False, True] if adv > 0 else [True, False, False, False]
        assert clipped[0].tolist() == expect
        (g,) = torch.autograd.grad(loss.sum(), logp)
        assert (g[0][torch.tensor(expect)] == 0).all() and (g[0][~torch.tensor(expect)] != 0).all()


def test_on_policy_gradient_is_the_policy_gradient():
    """At ratio 1 (first inner step) with beta 0, d loss / d logp = -A per token."""
    logp = torch.randn(3, 5, requires_grad=True)
    adv = torch.tensor([0.5, -1.0, 2.0])
    loss, _, _ = grpo_token_terms(logp, logp.detach(), adv)
    (g,) = torch.autograd.grad(loss.sum(), logp)
    torch.testing.assert_close(g, -adv[:, None].expand(3, 5))


def test_kl_term_and_its_gradient():
    logp = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(2, 3, dtype=torch.float64)
    loss, _, kl = grpo_token_terms(logp, logp.detach(), torch.zeros(2, dtype=torch.float64), ref_logp=ref, beta=0.04)
    torch.testing.assert_close(loss, 0.04 * kl)
    (g,) = torch.autograd.grad(loss.sum(), logp)
    torch.testing.assert_close(g, 0.04 * (1 - (ref - logp.detach()).exp()))   # d/dx [e^(r-x) - (r-x) - 1]


def test_truncated_importance_weights_scale_the_surrogate_not_the_kl():
    old = torch.log(torch.tensor([[0.2, 0.5, 0.9]], dtype=torch.float64))
    rollout = torch.log(torch.tensor([[0.1, 0.5, 0.3]], dtype=torch.float64))
    w = truncated_is_weights(old, rollout, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 1.0, 2.0]], dtype=torch.float64))  # 2, 1, 3 -> capped at 2
    w = truncated_is_weights(old, rollout, cap=5.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 1.0, 3.0]], dtype=torch.float64))
    logp = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(1, 3, dtype=torch.float64)
    adv = torch.tensor([0.7], dtype=torch.float64)
    plain, _, kl = grpo_token_terms(logp, old, adv, ref_logp=ref, beta=0.1)
    weighted, _, _ = grpo_token_terms(logp, old, adv, ref_logp=ref, beta=0.1, is_weight=w)
    torch.testing.assert_close(weighted, (plain - 0.1 * kl) * w + 0.1 * kl)
    (g,) = torch.autograd.grad(weighted.sum(), logp)
    (g_pg,) = torch.autograd.grad(((plain - 0.1 * kl) * w).sum(), logp, retain_graph=True)
    (g_kl,) = torch.autograd.grad((0.1 * kl).sum(), logp)
    torch.testing.assert_close(g, g_pg + g_kl)   # the weight is a constant: no gradient through it
    assert not truncated_is_weights(old, rollout.requires_grad_(), 2.0).requires_grad


def test_offpolicy_sequence_mask_drops_only_drifted_negative_sequences():
    rollout = torch.tensor([[-1.0, -1.0, 0.0], [-1.0, -1.0, 0.0], [-1.0, -1.0, 0.0], [-1.0, -1.0, 0.0]])
    logp = torch.tensor([[-3.0, -3.0, 0.0], [-3.0, -3.0, 0.0], [-1.1, -1.1, 0.0], [-1.0, -9.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([-1.0, 1.0, -1.0, -1.0])
    # mean log(pi_rollout / pi_theta) over counted tokens: 2, 2, 0.1, 0 (the unmasked -9 does not count)
    keep = offpolicy_sequence_keep(rollout, logp, adv, mask, delta=0.5)
    assert keep.tolist() == [0.0, 1.0, 1.0, 1.0]
    assert offpolicy_sequence_keep(rollout, logp, adv, mask, delta=2.5).tolist() == [1.0, 1.0, 1.0, 1.0]


def test_aggregations():
    per = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert aggregate(per, mask, "token_mean", 4) == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert aggregate(per, mask, "seq_mean", 2) == pytest.approx((6 / 3 + 4 / 1) / 2)
    assert aggregate(per, mask, "constant", 2 * 8) == pytest.approx(10 / 16)
    with pytest.raises(ValueError, match="valid"):
        aggregate(per, mask, "mean", 1)


def test_dpo_loss():
    c, r = torch.tensor([-3.0, -5.0], requires_grad=True), torch.tensor([-4.0, -2.0], requires_grad=True)
    rc, rr = torch.tensor([-3.5, -5.0]), torch.tensor([-3.5, -2.5])
    loss, margin = dpo_loss(c, r, rc, rr, beta=0.1)
    m = (c - rc) - (r - rr)
    torch.testing.assert_close(loss, -F.logsigmoid(0.1 * m))
    torch.testing.assert_close(margin, 0.1 * m.detach())
    loss.sum().backward()
    assert (c.grad < 0).all() and (r.grad > 0).all()      # descent raises chosen, lowers rejected
    ls, _ = dpo_loss(c.detach(), r.detach(), rc, rr, beta=0.1, label_smoothing=0.1)
    torch.testing.assert_close(ls, -0.9 * F.logsigmoid(0.1 * m.detach()) - 0.1 * F.logsigmoid(-0.1 * m.detach()))
    assert math.isclose(float(dpo_loss(c, c, c, c)[0][0]), math.log(2), rel_tol=1e-6)
