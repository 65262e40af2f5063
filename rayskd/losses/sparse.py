"""Sparse teacher targets by importance sampling (Anshumann et al., "Sparse Logit Sampling:
Accelerating Knowledge Distillation in LLMs", arXiv 2503.16870). docs/algorithms.md, "Sampled
sparse targets".

At each position the teacher sends N token ids drawn from a proposal r (its own distribution,
possibly tempered) and a weight for each, w_i = P_T(x_i) / (N r(x_i)), so that for any f

    E_{x_1..N ~ r} [ sum_i w_i f(x_i) ] = sum_x P_T(x) f(x),

an unbiased sparse stand-in for the teacher's distribution. Top-k renormalisation is not:
it drops the tail and inflates the top-k, so its forward-KL gradient is off in expectation
(tests/test_losses_sparse.py measures both by exact expectation over a small vocabulary).

Status (issue 28.2): the teacher's draw and the learner's estimator, tested; not yet a teacher
payload (TeacherScorer would call `sample_ids` and `importance_weights`; the learner
`sparse_forward_kl`).
"""
from __future__ import annotations

import torch


def proposal(teacher_logp: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log r: the teacher's distribution at `temperature` (1: the teacher's own), [..., V]."""
    if temperature <= 0:
        raise ValueError(f"the proposal's temperature must be > 0, got {temperature}")
    return torch.log_softmax(teacher_logp / temperature, dim=-1)


def sample_ids(proposal_logp: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """N ids per position drawn independently (with replacement) from r: [..., V] -> [..., N]."""
    flat = proposal_logp.reshape(-1, proposal_logp.shape[-1]).exp()
    ids = torch.multinomial(flat, n, replacement=True, generator=generator)
    return ids.reshape(*proposal_logp.shape[:-1], n)


def importance_weights(teacher_logp: torch.Tensor, proposal_logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """w_i = P_T(x_i) / (N r(x_i)) for the drawn ids [..., N] (exactly 1/N when r is the teacher)."""
    n = ids.shape[-1]
    return torch.exp(teacher_logp.gather(-1, ids) - proposal_logp.gather(-1, ids)) / n


def sparse_forward_kl(student_logp: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                      teacher_logp_ids: torch.Tensor) -> torch.Tensor:
    """sum_i w_i (log P_T(x_i) - log Q_theta(x_i)) per position ([..., N] -> [...]): an unbiased
    estimate of KL(P_T || Q_theta), and its gradient, -sum_i w_i grad log Q_theta(x_i), one of
    the forward-KL gradient. `student_logp` [..., V] (with gradient); `teacher_logp_ids` the
    teacher's log-probs of the ids, as the teacher sends them."""
    return (weights * (teacher_logp_ids - student_logp.gather(-1, ids))).sum(-1)


def topk_renormalised_forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, k: int) -> torch.Tensor:
    """The common biased alternative, for comparison: forward KL from the teacher's top-k
    renormalised to sum to 1, -sum_top-k (P_T / P_T(top-k)) log Q_theta + const."""
    top, ids = teacher_logp.topk(k, dim=-1)
    renorm = torch.log_softmax(top, dim=-1)
    return (renorm.exp() * (renorm - student_logp.gather(-1, ids))).sum(-1)
