"""Per-token KL estimators (Schulman) and f-divergence generators (docs/algorithms.md).

All functions are pure torch and keep the reference side detached: gradients flow only
through the learner's log-probabilities.
"""
from __future__ import annotations

import math

import torch


def overflow_bound(dtype: torch.dtype) -> float:
    """The largest log ratio s for which exp(s) * |s| (the largest term any generator or
    estimator here forms) is finite in `dtype`: log(max) - 8, about 80.7 in fp32. Clamping
    at this bound only ever touches values that would overflow; a tighter clamp (the DPH-RL
    reference code uses +-20) zeroes real gradients, e.g. forward KL's (u - 1) -> -1 on the
    tokens the policy has forgotten (s -> -inf)."""
    return math.log(torch.finfo(dtype).max) - 8.0


def kl_estimator(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL(pi_theta || pi_ref) estimators on tokens sampled from pi_theta.

    delta = logp - sg(ref_logp).
      k1 = delta                  unbiased value; as a loss its expected gradient is ZERO
                                  (use it only inside the reward, see `k1_in_reward`).
      k2 = delta^2 / 2            biased value; gradient delta * grad(logp), whose expectation
                                  is grad KL(pi_theta || pi_ref) (reverse KL).
      k3 = exp(-delta) - 1 + delta  unbiased value >= 0; gradient (1 - pi_ref/pi_theta) grad(logp),
                                  whose expectation is grad KL(pi_ref || pi_theta) (forward KL).
    """
    delta = logp - ref_logp.detach()
    if kind == "k1":
        return delta
    if kind == "k2":
        return 0.5 * delta.square()
    if kind == "k3":
        # exp(-delta) overflows only for very negative delta; large positive delta is
        # harmless (value ~ delta, gradient -> 1) and must keep its gradient
        delta = delta.clamp(min=-overflow_bound(delta.dtype))
        return torch.expm1(-delta) + delta
    raise ValueError(f"unknown KL estimator {kind!r}: expected k1, k2 or k3")


# DPH-RL's generators f(u) of u = exp(s) = pi_theta / pi_ref, each from (s, u, alpha); the
# table algorithm.rehearsal.divergence chooses from

def _forward_kl_generator(s: torch.Tensor, u: torch.Tensor, alpha: float) -> torch.Tensor:
    """u - 1 - log u: KL(pi_ref || pi_theta)."""
    return torch.expm1(s) - s


def _reverse_kl_generator(s: torch.Tensor, u: torch.Tensor, alpha: float) -> torch.Tensor:
    """u log u - u + 1: KL(pi_theta || pi_ref)."""
    return u * s - torch.expm1(s)


def _js_generator(s: torch.Tensor, u: torch.Tensor, alpha: float) -> torch.Tensor:
    """u log u - (u+1) log((u+1)/2): 2 JS(pi_theta, pi_ref)."""
    # (u+1) log((u+1)/2) = (u+1) * (softplus(s) - log 2)
    return u * s - (u + 1.0) * (torch.nn.functional.softplus(s) - torch.log(torch.tensor(2.0, dtype=s.dtype)))


def _alpha_generator(s: torch.Tensor, u: torch.Tensor, alpha: float) -> torch.Tensor:
    """(u^(1-a) - (1-a) u - a) / (a(a-1)): the alpha-divergence (rehearsal.alpha; 1: forward KL, 0: reverse KL)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha-divergence needs 0 < alpha < 1, got {alpha}")
    return (torch.exp((1.0 - alpha) * s) - (1.0 - alpha) * u - alpha) / (alpha * (alpha - 1.0))


GENERATORS = {
    "forward_kl": _forward_kl_generator,
    "reverse_kl": _reverse_kl_generator,
    "js": _js_generator,
    "alpha": _alpha_generator,
}
F_DIVERGENCES = tuple(GENERATORS)


def f_divergence(
    log_ratio: torch.Tensor, kind: str, alpha: float = 0.5, value_clamp: float | None = None
) -> torch.Tensor:
    """Per-token generator value f(u), u = exp(log_ratio) = pi_theta / pi_ref.

    Averaged over tokens SAMPLED FROM pi_ref, E_ref[f(u)] = D_f(pi_theta || pi_ref), and its
    gradient is the gradient of that divergence (the reference side must be detached by the
    caller; `log_ratio = logp - ref_logp.detach()`).
      forward_kl : f = u - 1 - log u                      -> KL(pi_ref || pi_theta)
      reverse_kl : f = u log u - u + 1                    -> KL(pi_theta || pi_ref)
      js         : f = u log u - (u+1) log((u+1)/2)       -> 2 * JS(pi_theta, pi_ref)
      alpha      : f = (u^(1-a) - (1-a) u - a) / (a(a-1)), a in (0,1); a->1 forward KL,
                   a->0 reverse KL.
    Every generator is finite for s -> -inf (u -> 0), so the log ratio is clamped from above
    only, where exp(s) would overflow (`overflow_bound`); `value_clamp` optionally clamps the
    value too.
    """
    generator = GENERATORS.get(kind)
    if generator is None:
        raise ValueError(f"unknown f-divergence {kind!r}: expected {', '.join(GENERATORS)}")
    s = log_ratio.clamp(max=overflow_bound(log_ratio.dtype))
    f = generator(s, torch.exp(s), alpha)
    if value_clamp is not None:
        f = f.clamp(-value_clamp, value_clamp)
    return f
