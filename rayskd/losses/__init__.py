"""Pure tensor functions for rayskd's objectives. Only torch is imported here."""
from .divergences import DISTRIBUTION_DIVERGENCES, distribution_divergence, hidden_topk_divergence, topk_support
from .estimators import f_divergence, kl_estimator
from .logprobs import hidden_logprobs, hidden_topk_logprobs, token_logprobs
from .objective import (
    KD_ESTIMATORS, KD_MASKS, KD_NORMS, SCHEDULES, coef_at, kd_sequence_mask, kdrl_loss, rehearsal_loss,
)
from .policy import (
    ADVANTAGES, AGGREGATIONS, aggregate, aggregate_denominator, clipped_surrogate, group_advantages, policy_loss, truncated_is_weights,
)

F_DIVERGENCES = ("forward_kl", "reverse_kl", "js", "alpha")

__all__ = [
    "ADVANTAGES", "AGGREGATIONS", "DISTRIBUTION_DIVERGENCES", "aggregate_denominator", "F_DIVERGENCES", "KD_ESTIMATORS", "KD_MASKS",
    "KD_NORMS", "SCHEDULES", "aggregate", "clipped_surrogate", "coef_at", "distribution_divergence",
    "f_divergence", "group_advantages", "hidden_topk_divergence", "hidden_logprobs", "hidden_topk_logprobs", "kd_sequence_mask", "kdrl_loss", "kl_estimator",
    "policy_loss", "rehearsal_loss", "token_logprobs", "topk_support", "truncated_is_weights",
]
