"""KL estimators and f-divergence generators against exact float64 enumeration on a small
vocabulary (docs/algorithms.md, "How it is tested"), values and gradients, plus Monte-Carlo convergence."""
import math

import pytest
import torch

from rayskd.losses import f_divergence, kl_estimator

torch.set_default_dtype(torch.float64)
V = 9


def dists(seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(V, generator=g, dtype=torch.float64).requires_grad_(True)
    z_ref = torch.randn(V, generator=g, dtype=torch.float64)
    return z, torch.log_softmax(z_ref, -1)


def exact_kl(log_a, log_b):
    return (log_a.exp() * (log_a - log_b)).sum()


def grad(f, z):
    (g,) = torch.autograd.grad(f, z)
    return g


def expected_estimator_grad(z, ref_logp, kind):
    """E_{x ~ pi_theta}[grad k(x)] by enumeration: weights pi_theta(x) held fixed (the sample
    distribution is not differentiated, exactly as when the estimator is a loss on samples)."""
    logp = torch.log_softmax(z, -1)
    return grad((logp.exp().detach() * kl_estimator(logp, ref_logp, kind)).sum(), z)


@pytest.mark.parametrize("seed", range(4))
def test_k2_expected_gradient_is_reverse_kl_gradient(seed):
    z, ref = dists(seed)
    g_rkl = grad(exact_kl(torch.log_softmax(z, -1), ref), z)
    torch.testing.assert_close(expected_estimator_grad(z, ref, "k2"), g_rkl, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_k1_as_loss_has_zero_expected_gradient(seed):
    z, ref = dists(seed)
    g = expected_estimator_grad(z, ref, "k1")
    assert g.abs().max() < 1e-12
    # ... while the exact reverse KL has a clearly non-zero gradient: k1-as-loss is the bug
    assert grad(exact_kl(torch.log_softmax(z, -1), ref), z).abs().max() > 1e-2


@pytest.mark.parametrize("seed", range(4))
def test_k3_expected_gradient_is_forward_kl_gradient(seed):
    z, ref = dists(seed)
    g_fkl = grad(exact_kl(ref, torch.log_softmax(z, -1)), z)
    torch.testing.assert_close(expected_estimator_grad(z, ref, "k3"), g_fkl, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_k1_k3_values_unbiased_k2_biased(seed):
    z, ref = dists(seed)
    logp = torch.log_softmax(z, -1).detach()
    p = logp.exp()
    kl = exact_kl(logp, ref)
    assert torch.isclose((p * kl_estimator(logp, ref, "k1")).sum(), kl, rtol=1e-12)
    assert torch.isclose((p * kl_estimator(logp, ref, "k3")).sum(), kl, rtol=1e-12)
    assert (kl_estimator(logp, ref, "k3") >= 0).all()
    k2 = (p * kl_estimator(logp, ref, "k2")).sum()
    assert not torch.isclose(k2, kl, rtol=1e-3)


def mc_check(per_sample_grads, exact, sigmas=6.0):
    """Mean of N per-sample gradients converges to `exact` within sigmas * std / sqrt(N)."""
    n = per_sample_grads.shape[0]
    mean = per_sample_grads.mean(0)
    tol = sigmas * per_sample_grads.std(0) / math.sqrt(n) + 1e-12
    assert ((mean - exact).abs() <= tol).all(), (mean, exact, tol)


@pytest.mark.parametrize("kind,target", [("k1", "zero"), ("k2", "reverse"), ("k3", "forward")])
def test_estimator_gradients_monte_carlo(kind, target):
    z, ref = dists(11)
    logp = torch.log_softmax(z, -1)
    n = 50_000
    x = torch.multinomial(logp.exp().detach(), n, replacement=True, generator=torch.Generator().manual_seed(0))
    # per-sample gradient wrt z: k'(delta_x) * (e_x - pi)
    pi = logp.exp().detach()
    delta = (logp.detach() - ref)[x]
    dk = {"k1": torch.ones_like(delta), "k2": delta, "k3": 1 - torch.exp(-delta)}[kind]
    per_sample = dk[:, None] * (torch.nn.functional.one_hot(x, V).double() - pi)
    # the same per-sample gradient through autograd, on a few samples
    for i in range(5):
        g = grad(kl_estimator(torch.log_softmax(z, -1)[x[i]], ref[x[i]], kind), z)
        torch.testing.assert_close(g, per_sample[i])
    exact = {
        "zero": torch.zeros(V),
        "reverse": grad(exact_kl(torch.log_softmax(z, -1), ref), z),
        "forward": grad(exact_kl(ref, torch.log_softmax(z, -1)), z),
    }[target]
    mc_check(per_sample, exact)


# ---- f-divergences: E_{x ~ pi_ref}[f(pi_theta/pi_ref)] = D_f(pi_theta || pi_ref) ----

def exact_f_div(logp, ref, kind, alpha=0.5):
    """Independent closed forms of each divergence."""
    p, q = logp.exp(), ref.exp()
    if kind == "forward_kl":
        return exact_kl(ref, logp)
    if kind == "reverse_kl":
        return exact_kl(logp, ref)
    if kind == "js":  # 2 * JS
        m = torch.log(0.5 * (p + q))
        return exact_kl(logp, m) + exact_kl(ref, m)
    if kind == "alpha":
        return ((p ** (1 - alpha) * q ** alpha).sum() - 1) / (alpha * (alpha - 1))
    raise AssertionError(kind)


F_KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("js", 0.5), ("alpha", 0.3), ("alpha", 0.7)]


@pytest.mark.parametrize("kind,alpha", F_KINDS)
@pytest.mark.parametrize("seed", range(3))
def test_f_divergence_value_and_gradient_exact(kind, alpha, seed):
    z, ref = dists(seed)
    logp = torch.log_softmax(z, -1)
    expect = (ref.exp() * f_divergence(logp - ref, kind, alpha)).sum()
    exact = exact_f_div(logp, ref, kind, alpha)
    assert torch.isclose(expect, exact, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(grad(expect, z), grad(exact_f_div(torch.log_softmax(z, -1), ref, kind, alpha), z),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind,alpha", F_KINDS)
def test_f_divergence_zero_at_equality_and_nonnegative(kind, alpha):
    s = torch.linspace(-8, 8, 401)
    f = f_divergence(s, kind, alpha)
    assert (f >= -1e-12).all()
    assert f_divergence(torch.zeros(3), kind, alpha).abs().max() < 1e-15
    z, ref = dists(3)
    assert exact_f_div(ref, ref, kind, alpha).abs() < 1e-12


def test_alpha_limits_are_the_kls():
    z, ref = dists(5)
    logp = torch.log_softmax(z, -1).detach()
    fwd, rev = exact_kl(ref, logp), exact_kl(logp, ref)
    near1 = (ref.exp() * f_divergence(logp - ref, "alpha", 1 - 1e-6)).sum()
    near0 = (ref.exp() * f_divergence(logp - ref, "alpha", 1e-6)).sum()
    assert torch.isclose(near1, fwd, rtol=1e-4) and torch.isclose(near0, rev, rtol=1e-4)


@pytest.mark.parametrize("kind,alpha", F_KINDS)
def test_f_divergence_gradient_monte_carlo(kind, alpha):
    z, ref = dists(7)
    n = 40_000
    x = torch.multinomial(ref.exp(), n, replacement=True, generator=torch.Generator().manual_seed(1))
    logp = torch.log_softmax(z, -1)
    s = (logp.detach() - ref)[x].requires_grad_(True)
    (df,) = torch.autograd.grad(f_divergence(s, kind, alpha).sum(), s)
    per_sample = df[:, None] * (torch.nn.functional.one_hot(x, V).double() - logp.exp().detach())
    mc_check(per_sample, grad(exact_f_div(logp, ref, kind, alpha), z))


def test_bad_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="k1, k2 or k3"):
        kl_estimator(torch.zeros(2), torch.zeros(2), "kl")
    with pytest.raises(ValueError, match="alpha"):
        f_divergence(torch.zeros(2), "alpha", 1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clamps_keep_real_gradients_and_only_stop_overflow(dtype):
    """Issue 8.5: forward KL's rehearsal gradient f'(u) u = u - 1 -> -1 on forgotten tokens
    (s = -25, where a clamp at -20 gave 0); k3's gradient 1 - exp(-delta) -> 1 at delta = +25;
    and values that would overflow stay finite."""
    s = torch.tensor([-25.0, -60.0, 25.0], dtype=dtype, requires_grad=True)
    (g,) = torch.autograd.grad(f_divergence(s, "forward_kl").sum(), s)
    torch.testing.assert_close(g, torch.expm1(s.detach()))
    assert g[0] < -0.99 and g[1] < -0.99
    for kind in ("reverse_kl", "js", "alpha"):  # every generator is finite and differentiable as u -> 0
        (g,) = torch.autograd.grad(f_divergence(s, kind).sum(), s)
        assert torch.isfinite(g).all(), kind
    delta = torch.tensor([25.0, -25.0], dtype=dtype)
    logp = delta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(kl_estimator(logp, torch.zeros_like(delta), "k3").sum(), logp)
    torch.testing.assert_close(g, -torch.expm1(-delta))  # 1 - pi_ref/pi_theta, both signs
    huge = torch.tensor([1e4, -1e4], dtype=dtype, requires_grad=True)
    for value in (f_divergence(huge, "reverse_kl"), f_divergence(huge, "forward_kl"),
                  kl_estimator(huge, torch.zeros_like(huge), "k3")):
        (g,) = torch.autograd.grad(value.sum(), huge)
        assert torch.isfinite(value).all() and torch.isfinite(g).all()
