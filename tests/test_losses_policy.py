"""Advantages, the clipped surrogate, aggregations, KDRL and rehearsal objectives, and the
chunked log-prob helpers, against float64 references. The combined objective is the learner's
own `micro_batch_loss` (the code every update runs)."""
import math

import pytest
import torch

from rayskd.batch import LearnerShare
from rayskd.config import AlgorithmConfig, KDConfig
from rayskd.learner import MicroBatch, micro_batch_loss
from rayskd.losses import (
    coef_at, group_advantages, hidden_logprobs, kd_sequence_mask, kl_estimator, policy_loss, rehearsal_loss,
    token_logprobs, truncated_is_weights,
)

torch.set_default_dtype(torch.float64)


def kdrl_loss(logp, sampler_logp, advantages, mask, teacher_logp, coef, *, kd_seq_mask=None, kd_values=None,
              norm_len=None, pg_denominator=None, kd_denominator=None, kd=None, **algo):
    """The learner's objective on one micro-batch (`micro_batch_loss`): `algo` and `kd` are
    AlgorithmConfig / KDConfig fields; `sampler_logp` the sampler's log-probs mu."""
    cfg = AlgorithmConfig(kd=KDConfig(**(kd or {})), **algo)
    seq = torch.ones(mask.shape[0]) if kd_seq_mask is None else kd_seq_mask
    mb = MicroBatch(fields=(), mask_NR=mask, advantages_N=advantages, sampler_logp_NR=sampler_logp,
                    teacher_logp_NR=teacher_logp, kd_mask_N=seq)
    share = LearnerShare(kd_coef=coef, rehearsal_start=0, pg_denominator=pg_denominator, kd_denominator=kd_denominator,
                         kd_mask=[], shards=[], scores=[])
    loss, metrics = micro_batch_loss(logp, None, kd_values, mb, share, cfg, norm_len)
    return loss, vars(metrics)


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    a = group_advantages(r, 4, "grpo")
    g = r[:4]
    torch.testing.assert_close(a[:4], (g - g.mean()) / (g.std() + 1e-6))
    assert (a[4:] == 0).all()  # all-equal group: zero advantage, no NaN
    torch.testing.assert_close(group_advantages(r, 4, "dr_grpo")[:4], g - g.mean())
    assert not group_advantages(r.requires_grad_(True), 4).requires_grad
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)


def batch(seed=0, B=5, T=7):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g) * 3).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(B, T, generator=g)
    lengths = torch.tensor([7, 3, 0, 5, 1])[:B]
    mask = (torch.arange(T)[None] < lengths[:, None]).double()
    adv = torch.randn(B, generator=g)
    return logp, old, adv, mask, lengths


def naive_surrogate(lp, old, a, cl, ch):
    r = math.exp(lp - old)
    return -min(r * a, min(max(r, 1 - cl), 1 + ch) * a)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_policy_loss_matches_loops(aggregation):
    logp, old, adv, mask, lengths = batch()
    got = policy_loss(logp, old, adv, mask, 0.2, 0.28, aggregation, norm_len=10)
    per = [[naive_surrogate(logp[i, t].item(), old[i, t].item(), adv[i].item(), 0.2, 0.28) for t in range(lengths[i])]
           for i in range(len(lengths))]
    if aggregation == "token_mean":
        ref = sum(map(sum, per)) / sum(map(len, per))
    elif aggregation == "seq_mean_token_mean":
        ne = [sum(p) / len(p) for p in per if p]
        ref = sum(ne) / len(ne)
    else:
        ref = sum(map(sum, per)) / (len(per) * 10)
    assert math.isclose(got.item(), ref, rel_tol=1e-12)


def test_clipped_tokens_have_no_gradient_and_unclipped_have_rho_A():
    logp = torch.log(torch.tensor([[1.5, 1.0, 0.5]])).requires_grad_(True)
    old = torch.zeros(1, 3)
    mask = torch.ones(1, 3)
    policy_loss(logp, old, torch.tensor([1.0]), mask, 0.2, 0.2, "token_mean").backward()
    # rho=1.5 > 1.2 with A>0: clipped, zero grad; rho=1.0: grad -rho*A/3; rho=0.5 with A>0: not clipped
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -1.0 / 3, -0.5 / 3]]))


def test_empty_responses_never_nan():
    logp = torch.zeros(2, 4, requires_grad=True)
    mask = torch.zeros(2, 4)
    for agg in ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]:
        loss = policy_loss(logp, logp.detach(), torch.ones(2), mask, aggregation=agg)
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(logp.grad).all()


def test_truncated_is_weights():
    w = truncated_is_weights(torch.log(torch.tensor([0.5, 0.9])), torch.log(torch.tensor([0.1, 0.9])), cap=2.0)
    torch.testing.assert_close(w, torch.tensor([2.0, 1.0]))
    logp, old, adv, mask, _ = batch(1)
    w = torch.rand_like(old)
    got = policy_loss(logp, old, adv, mask, is_weights=w)
    from rayskd.losses import clipped_surrogate
    ref = (clipped_surrogate(logp, old, adv, 0.2, 0.2)[0] * w * mask).sum() / mask.sum()
    torch.testing.assert_close(got, ref)


def test_coef_schedules():
    assert coef_at(100, "constant", 0.1) == 0.1
    assert math.isclose(coef_at(10, "linear", 5e-3, 1e-3, 5e-5), 4.5e-3)
    assert coef_at(10_000, "linear", 5e-3, 1e-3, 5e-5) == 1e-3


def test_kd_sequence_masks():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert kd_sequence_mask(r, 3, "all").tolist() == [1] * 6
    assert kd_sequence_mask(r, 3, "incorrect_only").tolist() == [0, 1, 1, 1, 1, 1]
    assert kd_sequence_mask(r, 3, "group_unsolved").tolist() == [0, 0, 0, 1, 1, 1]


def test_kdrl_k2_equals_grpo_plus_coef_k2_and_masks_and_norms():
    logp, old, adv, mask, _ = batch(2)
    teacher = old - 0.5
    on_old = logp.detach()  # on-policy: rho = 1
    loss, m = kdrl_loss(logp, on_old, adv, mask, teacher, 0.3, kd={"estimator": "k2"})
    ref = policy_loss(logp, on_old, adv, mask) + 0.3 * (kl_estimator(logp, teacher, "k2") * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, ref)
    seq = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    k2 = kl_estimator(logp, teacher, "k2") * mask * seq[:, None]
    l_masked, _ = kdrl_loss(logp, on_old, adv, mask, teacher, 1.0, kd_seq_mask=seq, kd={"norm": "masked"})
    l_all, _ = kdrl_loss(logp, on_old, adv, mask, teacher, 1.0, kd_seq_mask=seq, kd={"norm": "all"})
    pg = policy_loss(logp, on_old, adv, mask)
    torch.testing.assert_close(l_masked, pg + k2.sum() / (mask * seq[:, None]).sum())
    torch.testing.assert_close(l_all, pg + k2.sum() / mask.sum())
    assert set(m) >= {"policy_loss", "kd_loss", "clip_sum", "kd_k1_sum", "kd_tokens"}


def test_kd_divergence_metric_is_the_masked_mean_over_slices():
    """Issue 8.3: the logged divergence is the k1 mean over the KD-masked tokens of the whole
    batch, also when it is accumulated over micro-batches (sum and count kept apart)."""
    B, T = 4, 3
    logp = torch.zeros(B, T, requires_grad=True)
    mask = torch.ones(B, T)
    teacher = torch.tensor([-1.0, -1.0, 0.0, 0.0])[:, None].expand(B, T)  # k1 = 1 on rows 0-1, 0 on rows 2-3
    seq = torch.tensor([1.0, 1.0, 0.0, 0.0])  # the KD mask selects rows 0-1
    total_sum = total_n = 0.0
    for sl in (slice(0, 2), slice(2, 4)):
        _, m = kdrl_loss(logp[sl], logp[sl].detach(), torch.zeros(2), mask[sl], teacher[sl], 1.0, kd_seq_mask=seq[sl])
        total_sum, total_n = total_sum + float(m["kd_k1_sum"]), total_n + float(m["kd_tokens"])
    assert total_n == 6 and total_sum / total_n == 1.0  # the masked mean, not 0.5


K1_CONFIGS = [
    dict(pg_coef=0.0),
    dict(pg_coef=0.0, kd={"norm": "masked"}, kd_seq_mask=torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])),
    dict(pg_coef=1.0, kd={"norm": "all"}, kd_seq_mask=torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])),
    dict(pg_coef=2.0, tis_cap=2.0, aggregation="seq_mean_token_mean"),
    dict(pg_coef=0.5, aggregation="seq_mean_token_sum_norm", norm_len=9, kd_denominator=11.0, pg_denominator=3.0),
]


@pytest.mark.parametrize("kw", K1_CONFIGS)
@pytest.mark.parametrize("on_policy", [True, False])
def test_k1_reward_gradient_equals_k2_in_every_configuration(kw, on_policy):
    """Issue 8.1: k1_reward is scaled like k2 (coef, sg(rho), the KD mask and normaliser),
    not like the GRPO term (pg_coef, its normaliser, TIS weights), so its gradient equals
    k2's whatever the configuration: with pg_coef = 0 it still trains."""
    logp, old, adv, mask, _ = batch(6)
    old = logp.detach() if on_policy else old
    teacher = old - 0.7
    kw = dict(kw)
    kd = kw.pop("kd", {})

    def grad_for(estimator):
        loss, m = kdrl_loss(logp, old, adv, mask, teacher, 0.3, kd={**kd, "estimator": estimator}, **kw)
        return torch.autograd.grad(loss, logp)[0], m

    (g_k1r, m_k1r), (g_k2, _) = grad_for("k1_reward"), grad_for("k2")
    torch.testing.assert_close(g_k1r, g_k2, rtol=1e-12, atol=1e-14)
    if kw.get("pg_coef") == 0.0:
        assert g_k1r.abs().max() > 1e-3  # the teacher term trains on its own
    assert float(m_k1r["kd_loss"]) != 0.0  # its value is k1 (weighted by rho), reported as kd_loss


def test_kdrl_offpolicy_weights_teacher_term_by_rho():
    """Off the student's policy (samples from mu), a sampled-token teacher estimator is weighted
    by sg(rho), rho = pi_theta / mu, truncated at algorithm.kd.is_cap (here above every rho)."""
    logp, old, adv, mask, _ = batch(3)
    teacher = old - 0.5
    loss, _ = kdrl_loss(logp, old, torch.zeros(5), mask, teacher, 1.0, kd={"estimator": "k3", "is_cap": 1e9})
    rho = torch.exp(logp.detach() - old)
    ref = (rho * kl_estimator(logp, teacher, "k3") * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, ref)


def test_k1_in_reward_gives_same_gradient_as_k2_on_policy_and_mc_converges_to_reverse_kl():
    """On-policy, A = 0: k1-in-reward and k2-as-loss give identical per-sample gradients,
    and their sample mean converges to grad KL(pi_theta || pi_T)."""
    V, n = 7, 40_000
    g = torch.Generator().manual_seed(4)
    z = torch.randn(V, generator=g).requires_grad_(True)
    teacher = torch.log_softmax(torch.randn(V, generator=g), -1)
    x = torch.multinomial(torch.softmax(z, -1).detach(), n, replacement=True, generator=g)

    def grad_for(estimator):
        logp = torch.log_softmax(z, -1)[x][:, None]
        loss, _ = kdrl_loss(logp, logp.detach(), torch.zeros(n), torch.ones(n, 1), teacher[x][:, None], 1.0,
                            kd={"estimator": estimator})
        return torch.autograd.grad(loss, z)[0]

    g_k1r, g_k2 = grad_for("k1_reward"), grad_for("k2")
    torch.testing.assert_close(g_k1r, g_k2, rtol=1e-10, atol=1e-13)
    lq = torch.log_softmax(z, -1)
    (exact,) = torch.autograd.grad((lq.exp() * (lq - teacher)).sum(), z)
    # per-sample gradients for the tolerance
    pi = lq.exp().detach()
    per = (lq.detach() - teacher)[x][:, None] * (torch.nn.functional.one_hot(x, V).double() - pi)
    tol = 6 * per.std(0) / math.sqrt(n)
    assert ((g_k2 - exact).abs() <= tol).all()


@pytest.mark.parametrize("kind", ["forward_kl", "js", "reverse_kl", "alpha"])
def test_rehearsal_loss_mc_gradient_is_divergence_gradient(kind):
    V, n = 6, 40_000
    g = torch.Generator().manual_seed(5)
    z = torch.randn(V, generator=g).requires_grad_(True)
    ref = torch.log_softmax(torch.randn(V, generator=g), -1)
    x = torch.multinomial(ref.exp(), n, replacement=True, generator=g)
    lq = torch.log_softmax(z, -1)
    (g_mc,) = torch.autograd.grad(rehearsal_loss(lq[x][:, None], ref[x][:, None], torch.ones(n, 1), kind, 0.5), z)
    lq = torch.log_softmax(z, -1)
    p, q = lq.exp(), ref.exp()
    exact = {
        "forward_kl": (q * (ref - lq)).sum(),
        "reverse_kl": (p * (lq - ref)).sum(),
        "js": (p * (lq - torch.log((p + q) / 2))).sum() + (q * (ref - torch.log((p + q) / 2))).sum(),
        "alpha": ((p ** 0.5 * q ** 0.5).sum() - 1) / (0.5 * -0.5),
    }[kind]
    (g_exact,) = torch.autograd.grad(exact, z)
    # tolerance from the per-sample gradients f'(s_x) (e_x - pi_theta)
    s_x = (lq.detach() - ref)[x].requires_grad_(True)
    from rayskd.losses import f_divergence
    (df,) = torch.autograd.grad(f_divergence(s_x, kind, 0.5).sum(), s_x)
    per = df[:, None] * (torch.nn.functional.one_hot(x, V).double() - p.detach())
    torch.testing.assert_close(per.mean(0), g_mc)
    assert ((g_mc - g_exact).abs() <= 6 * per.std(0) / math.sqrt(n) + 1e-12).all()


# ---- chunked log-probs ----

@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_token_logprobs_chunked_equals_full(chunk):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 13, generator=g).requires_grad_(True)
    ids = torch.randint(0, 13, (3, 7), generator=g)
    lp, ent = token_logprobs(logits, ids, temperature=0.8, chunk_size=chunk, with_entropy=True)
    full = torch.log_softmax(logits / 0.8, -1)
    torch.testing.assert_close(lp, full.gather(-1, ids[..., None]).squeeze(-1))
    torch.testing.assert_close(ent, -(full.exp() * full).sum(-1).detach())
    (g1,) = torch.autograd.grad(lp.sum(), logits)
    (g2,) = torch.autograd.grad(full.gather(-1, ids[..., None]).sum(), logits)
    torch.testing.assert_close(g1, g2)


def test_hidden_logprobs_checkpointed_matches_and_slices_vocab():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 9, 8, generator=g).requires_grad_(True)
    w = torch.randn(16, 8, generator=g).requires_grad_(True)  # 12 real rows + 4 padded
    ids = torch.randint(0, 12, (2, 9), generator=g)
    lp, ent = hidden_logprobs(h, w, ids, temperature=1.3, chunk_size=4, vocab_size=12, with_entropy=True)
    full = torch.log_softmax((h @ w[:12].t()) / 1.3, -1)
    ref = full.gather(-1, ids[..., None]).squeeze(-1)
    torch.testing.assert_close(lp, ref)
    torch.testing.assert_close(ent, -(full.exp() * full).sum(-1).detach())
    g1 = torch.autograd.grad(lp.sum(), (h, w))
    g2 = torch.autograd.grad(ref.sum(), (h, w))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_hidden_topk_logprobs_chunked():
    from rayskd.losses import hidden_topk_logprobs
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(2, 5, 8, generator=g), torch.randn(14, 8, generator=g)
    ids = torch.randint(0, 12, (2, 5), generator=g)
    lp, ti, tv = hidden_topk_logprobs(h, w, ids, 3, temperature=0.5, chunk_size=3, vocab_size=12)
    full = torch.log_softmax((h @ w[:12].t()) / 0.5, -1)
    torch.testing.assert_close(lp, full.gather(-1, ids[..., None]).squeeze(-1))
    v, i = full.topk(3, -1)
    torch.testing.assert_close(tv[..., :3], v)
    assert (ti == i).all()
    outside = full.scatter(-1, i, -math.inf)
    torch.testing.assert_close(tv[..., 3], torch.logsumexp(outside, -1))  # the tail log-mass


@pytest.mark.parametrize("fn", ["hidden_logprobs", "hidden_topk_logprobs", "hidden_topk_divergence"])
def test_bf16_hidden_states_give_fp32_logits(fn):
    """Issue 8.6: with bf16 hidden states and LM head (a bf16 learner, the teacher on GPU),
    each chunk's logits are formed in fp32: log-probs match float64 arithmetic on the same
    bf16 inputs to fp32 rounding, where a bf16 product is off by up to ~1e-2."""
    from rayskd.losses import hidden_topk_divergence, hidden_topk_logprobs
    g = torch.Generator().manual_seed(12)
    h = (torch.randn(3, 16, 64, generator=g) * 2).bfloat16()
    w = (torch.randn(500, 64, generator=g) * 0.5).bfloat16()
    ids = torch.randint(0, 500, (3, 16), generator=g)
    full64 = torch.log_softmax(h.double() @ w.double().t(), -1)
    if fn == "hidden_logprobs":
        got, ref = hidden_logprobs(h, w, ids, chunk_size=7), full64.gather(-1, ids[..., None]).squeeze(-1)
    elif fn == "hidden_topk_logprobs":
        got, ref = hidden_topk_logprobs(h, w, ids, 5, chunk_size=7)[0], full64.gather(-1, ids[..., None]).squeeze(-1)
    else:
        teacher = torch.log_softmax(torch.randn(3, 16, 500, generator=g, dtype=torch.float32), -1)
        vals, top = teacher.topk(5, -1)
        vals = torch.cat([vals, torch.logsumexp(teacher.scatter(-1, top, -math.inf), -1, keepdim=True)], -1)
        got = hidden_topk_divergence(h, w, top, vals, "reverse_kl", chunk_size=7)
        from rayskd.losses import distribution_divergence
        ref = distribution_divergence(h.double() @ w.double().t(), vals.double(), "reverse_kl", topk_ids=top)
    assert got.dtype == torch.float32
    assert (got.double() - ref).abs().max() < 1e-4


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_slices_with_batch_denominator_add_up_to_the_batch_aggregate(aggregation):
    """Micro-batches / ranks: each slice divides by the whole batch's normaliser."""
    from rayskd.losses import aggregate_denominator as denominator
    logp, old, adv, mask, _ = batch(6)
    whole = policy_loss(logp, old, adv, mask, aggregation=aggregation, norm_len=9)
    total = denominator(mask, aggregation, 9)
    parts = [policy_loss(logp[s], old[s], adv[s], mask[s], aggregation=aggregation, norm_len=9, denominator=total)
             for s in (slice(0, 2), slice(2, 3), slice(3, 5))]
    torch.testing.assert_close(sum(parts), whole)
    tl = torch.zeros(5, 7) - 0.7
    kd_whole, _ = kdrl_loss(logp, logp.detach(), adv, mask, tl, 0.5, aggregation=aggregation, norm_len=9)
    kd_parts = sum(kdrl_loss(logp[s], logp.detach()[s], adv[s], mask[s], tl[s], 0.5, aggregation=aggregation,
                             norm_len=9, pg_denominator=total, kd_denominator=total)[0]
                   for s in (slice(0, 2), slice(2, 5)))
    torch.testing.assert_close(kd_parts, kd_whole)
