"""The combined objectives: KDRL (GRPO + teacher divergence on the same rollouts) and the
DPH-RL rehearsal term on cached reference samples."""
from __future__ import annotations

import torch

from .estimators import f_divergence, kl_estimator
from .policy import aggregate, clipped_surrogate

KD_ESTIMATORS = ("k2", "k3", "k1_reward", "topk")
KD_MASKS = ("all", "incorrect_only", "group_unsolved")
KD_NORMS = ("masked", "all")
SCHEDULES = ("constant", "linear")


def coef_at(step: int, schedule: str, coef: float, coef_min: float = 0.0, decay: float = 0.0) -> float:
    """Divergence coefficient at `step` (0-based): constant, or linear annealing
    max(coef - decay * step, coef_min) (KDRL's best run: 5e-3, 1e-3, 5e-5)."""
    if schedule == "constant":
        return coef
    if schedule == "linear":
        return max(coef - decay * step, coef_min)
    raise ValueError(f"unknown schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")


def kd_sequence_mask(rewards: torch.Tensor, group_size: int, mode: str) -> torch.Tensor:
    """Reward-guided KD: which responses receive the teacher term. rewards [P * G] -> [P * G] in {0, 1}.

    all: every response; incorrect_only: responses with reward <= 0;
    group_unsolved: every response of a group where no response has reward > 0.
    """
    if mode == "all":
        return torch.ones_like(rewards, dtype=torch.float32)
    wrong = (rewards <= 0).float()
    if mode == "incorrect_only":
        return wrong
    if mode == "group_unsolved":
        unsolved = wrong.reshape(-1, group_size).prod(dim=1, keepdim=True)
        return unsolved.expand(-1, group_size).reshape(-1)
    raise ValueError(f"unknown KD mask {mode!r}: expected one of {', '.join(KD_MASKS)}")


def kdrl_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    teacher_logp: torch.Tensor,
    coef: float,
    *,
    estimator: str = "k2",
    kd_values: torch.Tensor | None = None,
    kd_seq_mask: torch.Tensor | None = None,
    kd_norm: str = "masked",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: str = "token_mean",
    is_weights: torch.Tensor | None = None,
    norm_len: int | None = None,
    pg_denominator: float | None = None,
    kd_denominator: float | None = None,
    pg_coef: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KDRL: L = pg_coef * L_GRPO + coef * D(pi_theta || pi_T), both on the same student
    rollouts (pg_coef = 0: on-policy distillation alone).

    logp/old_logp/teacher_logp/mask: [B, T] (teacher_logp: the teacher's log-prob of each
    sampled token); advantages [B]. estimator:
      k2         coef * token-mean of delta^2/2, delta = logp - teacher_logp: gradient
                 delta * grad(logp), an unbiased reverse-KL gradient (the paper's choice);
      k3         coef * token-mean of k3: a forward-KL-like gradient;
      k1_reward  the k1 penalty -coef * sg(delta) as a per-token reward, written as the
                 importance-sampled term sg(delta) * pi_theta / sg(pi_theta): its value is
                 k1 (an unbiased KL estimate) and its gradient sg(delta) * grad(logp) is
                 exactly k2's. It gets everything the teacher term gets (coef, sg(rho), the
                 KD mask and normaliser) and nothing the GRPO term gets (pg_coef, the GRPO
                 normaliser, clipping, TIS weights);
      topk       `kd_values` [B, T] are the per-token divergences the caller computed over the
                 teacher's top-k support (`distribution_divergence(..., topk_ids=...)`).
    The teacher term is weighted per token by sg(rho), rho = pi_theta / pi_old, which is 1
    on-policy and corrects off-policy minibatches. `kd_seq_mask` [B] (see
    `kd_sequence_mask`) selects responses; kd_norm 'masked' divides by the selected tokens,
    'all' by every response token. `pg_denominator` / `kd_denominator` are the normalisers
    of the whole batch when this call sees one slice of it (see `aggregate`). Returns
    (loss, detached metrics); the metrics `kd_k1_sum` / `kd_tokens` are the sum of the k1
    value of KL(student || teacher) over the KD-masked tokens and their count, so that slices
    can be added before dividing.
    """
    seq_mask = torch.ones(mask.shape[0], dtype=mask.dtype, device=mask.device) if kd_seq_mask is None \
        else kd_seq_mask.to(mask.dtype)
    delta = (logp - teacher_logp).detach()
    if estimator == "k1_reward":
        kd_values = delta * torch.exp(logp - logp.detach())
    elif estimator in ("k2", "k3"):
        kd_values = kl_estimator(logp, teacher_logp, estimator)
    elif estimator == "topk":
        if kd_values is None:
            raise ValueError("estimator 'topk' needs kd_values from distribution_divergence")
    else:
        raise ValueError(f"unknown KD estimator {estimator!r}: expected one of {', '.join(KD_ESTIMATORS)}")

    pg_tok, clipped = clipped_surrogate(logp, old_logp, advantages, clip_low, clip_high)
    if is_weights is not None:
        pg_tok = pg_tok * is_weights.detach()
    pg = aggregate(pg_tok, mask, aggregation, norm_len, pg_denominator)
    metrics = {
        "policy_loss": pg.detach(),
        "clip_frac": aggregate(clipped, mask, "token_mean").detach(),
    }
    # k1 value of KL(student || teacher) on the KD-masked tokens: unbiased, whatever the
    # training estimator; sum and count kept apart so that slices add up
    kd_mask = mask * seq_mask.unsqueeze(-1)
    metrics["kd_k1_sum"] = (delta * kd_mask).sum()
    metrics["kd_tokens"] = kd_mask.sum()
    rho = torch.exp((logp - old_logp).detach().clamp(-20.0, 20.0))
    kd_tok = kd_values * rho
    if kd_norm == "masked":
        kd = aggregate(kd_tok, kd_mask, aggregation, norm_len, kd_denominator)
    elif kd_norm == "all":
        kd = aggregate(kd_tok * seq_mask.unsqueeze(-1), mask, aggregation, norm_len, kd_denominator)
    else:
        raise ValueError(f"unknown KD normaliser {kd_norm!r}: expected one of {', '.join(KD_NORMS)}")
    metrics["kd_loss"] = kd.detach()
    return pg_coef * pg + coef * kd, metrics


def rehearsal_loss(
    logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, kind: str, alpha: float = 0.5,
    aggregation: str = "token_mean",
) -> torch.Tensor:
    """DPH-RL rehearsal term on cached samples of pi_ref: token-mean of f(u),
    u = exp(logp - sg(ref_logp)); its expected gradient is grad D_f(pi_theta || pi_ref)."""
    return aggregate(f_divergence(logp - ref_logp.detach(), kind, alpha), mask, aggregation)
