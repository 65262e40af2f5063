"""GRPO advantages, the clipped policy-gradient surrogate and its aggregations."""
from __future__ import annotations

import torch

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
ADVANTAGES = ("grpo", "dr_grpo")


def group_advantages(rewards: torch.Tensor, group_size: int, kind: str = "grpo", eps: float = 1e-6) -> torch.Tensor:
    """Outcome advantages for rewards laid out group by group: [P * G] -> [P * G].

    grpo:    (r - mean_group) / (std_group + eps), std with Bessel's correction (torch.std);
    dr_grpo: r - mean_group (Dr. GRPO drops the std).
    A group whose rewards are all equal gets 0. The result carries no gradient.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.detach().double().reshape(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if kind == "dr_grpo":
        adv = centred
    elif kind == "grpo":
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        adv = centred / (std + eps)
    else:
        raise ValueError(f"unknown advantage {kind!r}: expected one of {', '.join(ADVANTAGES)}")
    return adv.reshape(-1).to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def aggregate(values: torch.Tensor, mask: torch.Tensor, aggregation: str, norm_len: int | None = None,
              denominator: float | None = None) -> torch.Tensor:
    """Reduce per-token values [B, T] over the response mask to a scalar.

    token_mean:              sum(v * m) / sum(m)
    seq_mean_token_mean:     mean over sequences with >= 1 token of each one's token mean
    seq_mean_token_sum_norm: sum(v * m) / (B * norm_len), norm_len defaulting to T (Dr. GRPO
                             uses the generation budget, max_new_tokens)
    An all-empty batch gives 0 (with a graph), never NaN.
    `denominator` replaces this batch's own normaliser (token count, non-empty sequence count
    or B * norm_len) with that of a larger batch this one is a slice of, so that the slices'
    results add up to the whole batch's aggregate (micro-batches, data-parallel ranks).
    """
    mask = mask.to(values.dtype)
    masked = values * mask
    if denominator is not None:
        if aggregation == "seq_mean_token_mean":
            return (masked.sum(-1) / mask.sum(-1).clamp_min(1.0)).sum() / denominator
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}: expected one of {', '.join(AGGREGATIONS)}")
        return masked.sum() / denominator
    if aggregation == "token_mean":
        return masked.sum() / mask.sum().clamp_min(1.0)
    if aggregation == "seq_mean_token_mean":
        lengths = mask.sum(-1)
        nonempty = (lengths > 0).to(values.dtype)
        per_seq = masked.sum(-1) / lengths.clamp_min(1.0)
        return (per_seq * nonempty).sum() / nonempty.sum().clamp_min(1.0)
    if aggregation == "seq_mean_token_sum_norm":
        length = norm_len if norm_len is not None else mask.shape[-1]
        return masked.sum() / (mask.shape[0] * max(length, 1))
    raise ValueError(f"unknown aggregation {aggregation!r}: expected one of {', '.join(AGGREGATIONS)}")


def aggregate_denominator(mask: torch.Tensor, aggregation: str, norm_len: int | None = None) -> float:
    """The normaliser `aggregate` uses for a whole batch [B, T]: pass it as `denominator` to
    each slice of the batch so that the slices' results add up to the batch's aggregate."""
    if aggregation == "token_mean":
        return max(float(mask.sum()), 1.0)
    if aggregation == "seq_mean_token_mean":
        return max(float((mask.sum(-1) > 0).sum()), 1.0)
    if aggregation == "seq_mean_token_sum_norm":
        return float(mask.shape[0] * max(norm_len if norm_len is not None else mask.shape[-1], 1))
    raise ValueError(f"unknown aggregation {aggregation!r}: expected one of {', '.join(AGGREGATIONS)}")


def clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO/GRPO loss -min(rho A, clip(rho, 1-clip_low, 1+clip_high) A), and a
    0/1 tensor marking the tokens where the clipped branch was taken."""
    if advantages.dim() == logp.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.detach()
    ratio = torch.exp((logp - old_logp.detach()).clamp(-20.0, 20.0))
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    return loss, (clipped < unclipped).to(logp.dtype)


def truncated_is_weights(learner_old_logp: torch.Tensor, sampler_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling: sg(min(pi_old_learner / mu, cap)) per token."""
    return torch.exp(learner_old_logp.detach() - sampler_logp.detach()).clamp(max=cap)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: str = "token_mean",
    is_weights: torch.Tensor | None = None,
    norm_len: int | None = None,
    denominator: float | None = None,
) -> torch.Tensor:
    """Clipped GRPO surrogate over response tokens, aggregated as configured.

    logp, old_logp, mask: [B, T]; advantages: [B] (broadcast over tokens) or [B, T].
    `is_weights` (e.g. `truncated_is_weights`) multiply each token's loss and are detached.
    """
    loss, _ = clipped_surrogate(logp, old_logp, advantages, clip_low, clip_high)
    if is_weights is not None:
        loss = loss * is_weights.detach()
    return aggregate(loss, mask, aggregation, norm_len, denominator)
