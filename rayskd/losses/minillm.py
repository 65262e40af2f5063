"""MiniLLM's teacher term (Gu et al., arXiv 2306.08543; the authors' code is microsoft/LMOps,
minillm/). docs/algorithms.md, "MiniLLM".

The objective is the reverse KL between whole sequences, KL(Q_theta(y|x) || P_T(y|x)), minimised
by policy gradient. With delta_t = log Q_theta(y_t|y_<t) - log P_T(y_t|y_<t) (the negative of
MiniLLM's per-token reward r_t), its gradient splits into

    single-step:  sum_t grad KL(Q_theta(.|y_<t) || P_T(.|y_<t))   (exact where the teacher sends
                  its distribution; else delta_t grad log Q_theta(y_t), whose expectation it is)
    long:         sum_t G_t grad log Q_theta(y_t),   G_t = sum_{t' > t} gamma^(t'-t-1) delta_t'

and with gamma = 1 and no length normalisation the two add up to the exact gradient of the
sequence-level reverse KL (tests/test_losses_minillm.py sums over every sequence). The authors
discount (gamma 0.95 in their code) and divide G_t by the number of tokens it sums (their
"length normalisation"), both to reduce variance at the price of that exactness.
"""
from __future__ import annotations

import torch


def future_cost(delta: torch.Tensor, mask: torch.Tensor, gamma: float, length_norm: bool) -> torch.Tensor:
    """G_t = sum_{t' > t} gamma^(t'-t-1) delta_t' over each response's own tokens: delta, mask
    [B, T] (delta detached); length_norm: G_t divided by the number of tokens after t (none: 0).
    Returns [B, T], 0 outside the mask."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"MiniLLM's gamma must be in [0, 1], got {gamma}")
    d = (delta * mask).detach()
    out = torch.zeros_like(d)
    running = torch.zeros_like(d[:, 0]) if d.shape[-1] else None
    for t in range(d.shape[-1] - 1, -1, -1):  # right to left: running = G_{t-1} after this position
        out[:, t] = running
        running = d[:, t] + gamma * running
    if length_norm:
        after = mask.flip(-1).cumsum(-1).flip(-1) - mask  # how many response tokens follow t
        out = out / after.clamp_min(1)
    return out * mask


def long_part(logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor, gamma: float,
              length_norm: bool) -> torch.Tensor:
    """Per-token values [B, T] of value 0 and gradient G_t grad log Q_theta(y_t) (`future_cost` of
    the sampled tokens' log-ratios): MiniLLM's long part, added to a single-step part (k1_reward
    from the sampled token, or the per-position reverse KL), so that the values still sum to
    the single-step part's, an estimate of the per-token reverse KL (what the run logs)."""
    delta = (logp - teacher_logp).detach()
    return future_cost(delta, mask, gamma, length_norm) * (logp - logp.detach())
