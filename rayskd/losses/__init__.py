"""Pure tensor functions for rayskd's objectives. Only torch is imported here.

policy.py      GRPO advantages, the clipped surrogate, aggregations and their normalisers
estimators.py  Schulman's KL estimators (k1, k2, k3) and DPH-RL's f-divergence generators
divergences.py divergences between two next-token distributions (full, or top-k + tail; the full
               one also from the teacher's hidden states and LM head)
teacher.py     the teacher term's estimators, by config name (TEACHER_ESTIMATORS)
objective.py   the terms of the objective, their importance weights and normalisers
logprobs.py    chunked log-probs (and top-k) from logits or hidden states
taid.py        TAID's interpolated target and its adaptive schedule of t
minillm.py     MiniLLM's reward-to-go and the values of its estimators
sparse.py      sampled sparse teacher targets: the teacher's draw, the learner's estimate
"""
from .divergences import (
    DISTRIBUTION_DIVERGENCES, DIVERGENCES, DivergenceParams, distribution_divergence, hidden_full_divergence,
    hidden_topk_divergence, topk_support,
)
from .estimators import F_DIVERGENCES, GENERATORS, f_divergence, kl_estimator
from .logprobs import hidden_logprobs, hidden_topk_logprobs, token_logprobs
from .objective import (
    KD_MASKS, KD_NORMS, SCHEDULES, SOLVED_AT, ImportanceWeights, batch_normalisers, coef_at, importance_weights,
    kd_sequence_mask, policy_gradient_term, rehearsal_loss, solved, teacher_denominator, teacher_term,
)
from .policy import (
    ADVANTAGES, AGGREGATIONS, aggregate, aggregate_denominator, clipped_surrogate, group_advantages, policy_loss,
    truncated_is_weights,
)
from .taid import TaidState, taid, taid_target
from .teacher import KD_ESTIMATORS, TEACHER_ESTIMATORS, TeacherEstimator, TeacherSignal

__all__ = [
    "ADVANTAGES", "AGGREGATIONS", "DISTRIBUTION_DIVERGENCES", "DIVERGENCES", "F_DIVERGENCES", "GENERATORS",
    "KD_ESTIMATORS", "KD_MASKS", "KD_NORMS", "SCHEDULES", "SOLVED_AT", "TEACHER_ESTIMATORS", "DivergenceParams",
    "ImportanceWeights", "TaidState",
    "TeacherEstimator", "TeacherSignal", "aggregate", "aggregate_denominator", "batch_normalisers", "clipped_surrogate",
    "coef_at", "distribution_divergence", "f_divergence", "group_advantages", "hidden_logprobs",
    "hidden_full_divergence", "hidden_topk_divergence", "hidden_topk_logprobs", "importance_weights", "kd_sequence_mask", "kl_estimator",
    "policy_gradient_term", "policy_loss", "rehearsal_loss", "solved", "taid", "taid_target",
    "teacher_denominator", "teacher_term",
    "token_logprobs", "topk_support", "truncated_is_weights",
]
