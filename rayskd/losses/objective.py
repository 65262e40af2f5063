"""The objective as named terms: the policy-gradient (GRPO) term, the teacher term, the DPH-RL
rehearsal term, the per-token importance weights of every term, and the normalisers of a batch.

    L = pg_coef * L_pg + kd_coef * L_teacher (+ rehearsal.coef * L_rehearsal, on other samples)

docs/algorithms.md has the math: each term's definition, estimator, which distribution samples
it, and the one rule for the off-policy corrections (`importance_weights`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .estimators import f_divergence
from .policy import aggregate, aggregate_denominator, clipped_surrogate, truncated_is_weights

KD_MASKS = ("all", "incorrect_only", "group_unsolved")
KD_NORMS = ("masked", "all")
SCHEDULES = ("constant", "linear")
# a response solves its problem when its reward reaches this (full credit: the built-in rewards
# give 1.0 to a right answer); the KD mask and pass@k evaluation both read it
SOLVED_AT = 1.0


def coef_at(step: int, schedule: str, coef: float, coef_min: float = 0.0, decay: float = 0.0) -> float:
    """Divergence coefficient at `step` (0-based): constant, or linear annealing
    max(coef - decay * step, coef_min) (KDRL's best run: 5e-3, 1e-3, 5e-5)."""
    if schedule == "constant":
        return coef
    if schedule == "linear":
        return max(coef - decay * step, coef_min)
    raise ValueError(f"unknown schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")


def solved(rewards: torch.Tensor) -> torch.Tensor:
    """Which responses solve their problem: reward >= SOLVED_AT. [N] -> [N] bool."""
    return rewards >= SOLVED_AT


def kd_sequence_mask(rewards: torch.Tensor, group_size: int, mode: str) -> torch.Tensor:
    """Reward-guided KD: which responses receive the teacher term. rewards [P * G] -> [P * G] in {0, 1}.

    all: every response; incorrect_only: responses that do not solve their problem (`solved`);
    group_unsolved: every response of a group where none solves it.
    """
    if mode == "all":
        return torch.ones_like(rewards, dtype=torch.float32)
    wrong = (~solved(rewards)).float()
    if mode == "incorrect_only":
        return wrong
    if mode == "group_unsolved":
        unsolved = wrong.reshape(-1, group_size).prod(dim=1, keepdim=True)
        return unsolved.expand(-1, group_size).reshape(-1)
    raise ValueError(f"unknown KD mask {mode!r}: expected one of {', '.join(KD_MASKS)}")


# ---- off-policy corrections: one rule for every term ----

@dataclass(frozen=True)
class ImportanceWeights:
    """Each term's per-token off-policy correction, all detached [B, T]."""
    pg_behaviour_logp: torch.Tensor  # the log-probs GRPO's clipped ratio pi_theta / pi_old is taken against
    pg_weight: torch.Tensor | None  # TIS weight on GRPO's per-token loss (None: none)
    teacher_weight: torch.Tensor  # on the sampled-token teacher estimators


def importance_weights(logp: torch.Tensor, sampler_logp: torch.Tensor, tis_cap: float,
                       teacher_cap: float) -> ImportanceWeights:
    """The per-token importance weights of every term, from the learner's log-probs pi_theta and
    the sampler's mu of the sampled tokens (the engine that drew them, at whatever weights
    version, so staleness and the engine/learner mismatch are one correction). Each term applies
    the ratio pi_theta / mu once, whatever algorithm.max_staleness is:

    - GRPO, tis_cap = 0: the clipped ratio is taken against mu (PPO's trust region corrects
      inside the clip); tis_cap = C > 0: the ratio is taken against the learner's own log-probs
      (pi_old = sg(pi_theta): one update per batch) and the loss is weighted by
      sg(min(pi_theta / mu, C)) (truncated importance sampling; never both, which would apply
      the ratio twice);
    - sampled-token teacher estimators: sg(min(pi_theta / mu, teacher_cap));
    - distribution teacher estimators and the rehearsal term take no weight (see losses/teacher.py).
    The per-token ratio corrects each token's distribution given its prefix, not the
    distribution of the prefix (the usual PPO approximation).
    """
    logp, sampler_logp = logp.detach(), sampler_logp.detach()
    teacher_weight = truncated_is_weights(logp, sampler_logp, teacher_cap)
    if tis_cap > 0:
        return ImportanceWeights(logp, truncated_is_weights(logp, sampler_logp, tis_cap), teacher_weight)
    return ImportanceWeights(sampler_logp, None, teacher_weight)


# ---- the terms ----

def policy_gradient_term(
    logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, weights: ImportanceWeights, *,
    clip_low: float, clip_high: float, aggregation: str, norm_len: int | None = None,
    denominator: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's clipped surrogate with its off-policy correction (`importance_weights`), aggregated.
    logp, mask [B, T]; advantages [B]. Returns (loss, clipped [B, T]: 1 where the clipped branch
    was taken)."""
    per_token, clipped = clipped_surrogate(logp, weights.pg_behaviour_logp, advantages, clip_low, clip_high)
    if weights.pg_weight is not None:
        per_token = per_token * weights.pg_weight
    return aggregate(per_token, mask, aggregation, norm_len, denominator), clipped


def teacher_denominator(mask: torch.Tensor, seq_mask: torch.Tensor, norm: str, aggregation: str,
                        norm_len: int | None = None) -> float:
    """The teacher term's normaliser over a batch [B, T]: norm 'all' divides as the GRPO term
    does, 'masked' counts only the responses `seq_mask` [B] selects (their tokens for
    token_mean, the non-empty ones for seq_mean_token_mean, their number x norm_len for
    seq_mean_token_sum_norm)."""
    if norm == "all":
        return aggregate_denominator(mask, aggregation, norm_len)
    if norm != "masked":
        raise ValueError(f"unknown KD normaliser {norm!r}: expected one of {', '.join(KD_NORMS)}")
    if aggregation == "seq_mean_token_sum_norm":
        return max(float(seq_mask.sum()), 1.0) * max(norm_len if norm_len is not None else mask.shape[-1], 1)
    return aggregate_denominator(mask * seq_mask[:, None], aggregation, norm_len)


def teacher_term(
    values: torch.Tensor, mask: torch.Tensor, seq_mask: torch.Tensor, weight: torch.Tensor | None, *,
    norm: str, aggregation: str, norm_len: int | None = None, denominator: float | None = None,
) -> torch.Tensor:
    """The teacher term: per-token `values` [B, T] of an estimator (losses/teacher.py), times its
    importance `weight` (None for distribution estimators), over the responses `seq_mask` [B]
    selects (`kd_sequence_mask`), divided by `teacher_denominator` (or `denominator`, the whole
    batch's, when this is a slice of it)."""
    per_token = values if weight is None else values * weight
    if denominator is None:
        denominator = teacher_denominator(mask, seq_mask, norm, aggregation, norm_len)
    return aggregate(per_token, mask * seq_mask[:, None], aggregation, norm_len, denominator)


def rehearsal_loss(
    logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, kind: str, alpha: float = 0.5,
    aggregation: str = "token_mean",
) -> torch.Tensor:
    """DPH-RL rehearsal term on cached samples of pi_ref: token-mean of f(u),
    u = exp(logp - sg(ref_logp)); its expected gradient is grad D_f(pi_theta || pi_ref). The
    samples come from pi_ref itself, so no importance weight applies."""
    return aggregate(f_divergence(logp - ref_logp.detach(), kind, alpha), mask, aggregation)


# ---- the batch ----

def batch_normalisers(lengths_N: torch.Tensor, kd_mask_N: torch.Tensor, *, aggregation: str, kd_norm: str,
                      max_new_tokens: int) -> tuple[float, float]:
    """(GRPO, teacher-term) normalisers of a whole batch, from its response lengths [N] and KD
    mask [N]: each learner rank trains on a share of it, in micro-batches, and the slices must
    add up to the batch's aggregate."""
    width = max(max_new_tokens, int(lengths_N.max()) if len(lengths_N) else 1)
    mask_NR = (torch.arange(width)[None] < lengths_N[:, None]).float()
    return (aggregate_denominator(mask_NR, aggregation, max_new_tokens),
            teacher_denominator(mask_NR, kd_mask_N.float(), kd_norm, aggregation, max_new_tokens))
