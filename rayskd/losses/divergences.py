"""Divergences between the student's and the teacher's next-token distributions.

P = teacher, Q = student (pi_theta). All computed in fp32 log space; -inf log-probs
(masked logits) are clamped to LOG_FLOOR so that 0 * log 0 terms give 0, never NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOG_FLOOR = -1.0e4


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32: half-precision inputs are promoted, fp32/fp64 kept as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def head_rows(lm_head_weight: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """The LM head's rows that belong to the tokenizer (`vocab_size`; None: all), at least
    fp32: upcast once per call, so that every chunk's logits are formed in fp32 (`fp32_logits`)."""
    return upcast(lm_head_weight if vocab_size is None else lm_head_weight[:vocab_size])


def fp32_logits(hidden: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """hidden [..., H] @ head [V, H]^T in at least fp32: a bf16 product alone is off by up to
    ~7e-3 in a log-prob. `head` comes from `head_rows`."""
    return upcast(hidden) @ head.t()
def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) over the last dim, from log-probabilities."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * a + (1 - weight_a) * b), computed with logsumexp."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def logsumexp_outside(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside `ids` [..., k] of log-probs `logp` [..., V],
    as a logsumexp over the other tokens: exact when that mass is 1e-12 or 1e-30, where
    log(1 - sum_k p) cancels to nothing in fp32. [..., V] -> [..., 1]. When `ids` cover the
    vocabulary the result is the dtype's most negative finite number (mass 0)."""
    hidden = logp.scatter(-1, ids, torch.finfo(logp.dtype).min)
    return torch.logsumexp(hidden, dim=-1, keepdim=True)


def topk_support(student_logp: torch.Tensor, topk_ids: torch.Tensor, teacher_topk_tail_logp: torch.Tensor):
    """Coarse-grain both distributions onto the teacher's top-k tokens plus one tail bucket.

    docs/algorithms.md, "The teacher term" (top-k support): both sides keep their true probability
    of each of the k tokens and put the rest of their mass in the tail. Every divergence on this
    (k+1)-outcome support is a lower bound of the full-vocabulary divergence (data
    processing) and equals it when k covers the vocabulary.
    student_logp [..., V]; topk_ids [..., k]; teacher_topk_tail_logp [..., k+1]: the teacher's
    log-probs of the k tokens, then its tail log-mass (`logsumexp_outside`, computed where
    the teacher's full distribution is). Both tails are logsumexps over the tokens outside
    the top-k, never log(1 - exp(logsumexp_topk)), which loses the tail when the top-k
    mass is within ~1e-7 of 1 in fp32.
    Returns (teacher_logp [..., k+1], student_logp [..., k+1]).
    """
    if teacher_topk_tail_logp.shape[-1] != topk_ids.shape[-1] + 1:
        raise ValueError(f"the teacher's top-k log-probs need the tail log-mass as a (k+1)-th value: got "
                         f"{teacher_topk_tail_logp.shape[-1]} values for k={topk_ids.shape[-1]}")
    student = torch.cat([student_logp.gather(-1, topk_ids), logsumexp_outside(student_logp, topk_ids)], dim=-1)
    return upcast(teacher_topk_tail_logp), student


# ---- the divergences, each a function of (log P teacher, log Q student, DivergenceParams) over
# the last dim, and the table the config chooses from by name ----

@dataclass(frozen=True)
class DivergenceParams:
    """What a divergence reads besides the two distributions (each reads its own)."""
    beta: float = 0.5  # generalized_jsd's mixture weight (algorithm.kd.beta)
    skew: float = 0.1  # the skew KLs' (algorithm.kd.skew)
    t: float = 1.0  # TAID's interpolation: training state, sent with each step (algorithm.kd.taid)


def forward_kl(log_p: torch.Tensor, log_q: torch.Tensor, params: DivergenceParams) -> torch.Tensor:
    """KL(P_T || Q_theta): mass-covering."""
    return _kl(log_p, log_q)


def reverse_kl(log_p: torch.Tensor, log_q: torch.Tensor, params: DivergenceParams) -> torch.Tensor:
    """KL(Q_theta || P_T): mode-seeking.

    What KDRL's k2 estimates from sampled tokens."""
    return _kl(log_q, log_p)


def generalized_jsd(log_p: torch.Tensor, log_q: torch.Tensor, params: DivergenceParams) -> torch.Tensor:
    """beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q (GKD; kd.beta).

    TRL's generalized_jsd_loss; beta = 0 is forward KL and beta = 1 reverse KL (both ends
    special-cased: M would equal one side and the other's weight vanish)."""
    beta = params.beta
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd needs 0 <= beta <= 1, got {beta}")
    if beta == 0.0:
        return _kl(log_p, log_q)
    if beta == 1.0:
        return _kl(log_q, log_p)
    log_m = _log_mix(log_p, log_q, beta)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def js(log_p: torch.Tensor, log_q: torch.Tensor, params: DivergenceParams) -> torch.Tensor:
    """JS(P_T, Q_theta): generalized_jsd at beta = 0.5.

    `params.beta` is not read."""
    return generalized_jsd(log_p, log_q, DivergenceParams(beta=0.5))


def _skew(skew: float) -> None:
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"skew must be in [0, 1), got {skew}")


def skew_forward_kl(log_p: torch.Tensor, log_q: torch.Tensor, params: DivergenceParams) -> torch.Tensor:
    """KL(P || skew P + (1 - skew) Q): DistiLLM's skew KL (kd.skew).

    skew = 0 is forward KL."""
    skew = params.skew
    _skew(skew)
    return _kl(log_p, _log_mix(log_p, log_q, skew) if skew > 0 else log_q)


def skew_reverse_kl(log_p: torch.Tensor, log_q: torch.Tensor, params: DivergenceParams) -> torch.Tensor:
    """KL(Q || skew Q + (1 - skew) P): DistiLLM's skew reverse KL (kd.skew).

    skew = 0 is reverse KL."""
    skew = params.skew
    _skew(skew)
    return _kl(log_q, _log_mix(log_q, log_p, skew) if skew > 0 else log_p)


def taid_divergence(log_p: torch.Tensor, log_q: torch.Tensor, params: DivergenceParams) -> torch.Tensor:
    """KL(p_t || Q_theta), p_t = softmax((1 - t) sg(log Q) + t log P): TAID at the step's t
    (losses/taid.py; the trainer moves t by the paper's adaptive rule)."""
    from .taid import taid

    return taid(log_p, log_q, params.t)


# algorithm.kd.divergence: a new divergence is one function above and one entry here
DIVERGENCES = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "js": js,
    "generalized_jsd": generalized_jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "taid": taid_divergence,
}
DISTRIBUTION_DIVERGENCES = tuple(DIVERGENCES)


def distribution_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str,
    beta: float = 0.5,
    temperature: float = 1.0,
    skew: float = 0.1,
    topk_ids: torch.Tensor | None = None,
    vocab_size: int | None = None,
    t: float = 1.0,
) -> torch.Tensor:
    """Per-position divergence `DIVERGENCES[kind]` between the teacher's distribution P and the
    student's Q over the vocabulary: [..., V] -> [...]. An exact function of the position's
    prefix: it does not depend on which token was sampled there.

    Both logits are divided by `temperature`; `beta`, `skew` and TAID's `t`: `DivergenceParams`.
    `vocab_size` slices padded LM-head rows.
    Top-k teacher: pass `topk_ids` [..., k] and, as `teacher_logits`, the teacher's
    full-vocabulary log-probs of those k tokens followed by its tail log-mass [..., k+1]; the
    divergence is then taken on the top-k + tail support (see `topk_support`).
    """
    fn = DIVERGENCES.get(kind)
    if fn is None:
        raise ValueError(f"unknown divergence {kind!r}: expected one of {', '.join(DIVERGENCES)}")
    if vocab_size is not None:
        student_logits = student_logits[..., :vocab_size]
    log_q = torch.log_softmax(upcast(student_logits) / temperature, dim=-1)
    if topk_ids is None:
        if vocab_size is not None:
            teacher_logits = teacher_logits[..., :vocab_size]
        log_p = torch.log_softmax(upcast(teacher_logits) / temperature, dim=-1)
    else:
        log_p, log_q = topk_support(log_q, topk_ids, teacher_logits)
    return fn(log_p.clamp_min(LOG_FLOOR), log_q.clamp_min(LOG_FLOOR), DivergenceParams(beta, skew, t))


def checkpointed_chunks(chunk_fn, rows: tuple, shared: tuple, chunk_size: int) -> torch.Tensor:
    """`chunk_fn(*row_chunks, *shared)` over `chunk_size` rows of every tensor in `rows` at a time
    (each [positions, ...]), concatenated. With gradients each chunk is recomputed in backward
    (checkpointed), so at most one chunk's [rows, V] logits exist at a time, forward or backward."""
    from torch.utils.checkpoint import checkpoint

    out = []
    for start in range(0, rows[0].shape[0], chunk_size):
        args = (*(t[start:start + chunk_size] for t in rows), *shared)
        out.append(checkpoint(chunk_fn, *args, use_reentrant=False) if torch.is_grad_enabled() else chunk_fn(*args))
    return torch.cat(out)


def hidden_topk_divergence(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, topk_ids: torch.Tensor, teacher_topk_logp: torch.Tensor,
    kind: str, beta: float = 0.5, skew: float = 0.1, temperature: float = 1.0, chunk_size: int = 1024,
    vocab_size: int | None = None, t: float = 1.0,
) -> torch.Tensor:
    """Per-position `distribution_divergence` on the teacher's top-k support, from the
    student's hidden states [..., H]: logits are formed `chunk_size` positions at a time and
    recomputed in backward (checkpointed), never as one [positions, V] fp32 tensor. The
    logits are formed in fp32 whatever the model's dtype. `teacher_topk_logp` [..., k+1]
    ends with the teacher's tail log-mass."""
    def chunk_fn(h, ids, teacher, w):
        return distribution_divergence(fp32_logits(h, w), teacher, kind, beta=beta, temperature=temperature, skew=skew,
                                       topk_ids=ids, t=t)

    rows = tuple(x.reshape(-1, x.shape[-1]) for x in (hidden, topk_ids, teacher_topk_logp))
    return checkpointed_chunks(chunk_fn, rows, (head_rows(lm_head_weight, vocab_size),),
                               chunk_size).reshape(topk_ids.shape[:-1])


def hidden_full_divergence(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, teacher_hidden: torch.Tensor, teacher_head_weight: torch.Tensor,
    kind: str, beta: float = 0.5, skew: float = 0.1, temperature: float = 1.0, teacher_temperature: float = 1.0,
    chunk_size: int = 1024, vocab_size: int | None = None, t: float = 1.0,
) -> torch.Tensor:
    """Per-position `distribution_divergence` over the whole vocabulary, from the student's
    hidden states [..., H] and the teacher's final hidden states [..., H_T] with its LM head
    [V_T, H_T] (a hidden-state teacher: it sends H_T values per token, the learner forms its
    logits). Both sides' logits in fp32, `chunk_size` positions at a time, recomputed in backward
    (checkpointed): no [positions, V] tensor beyond a chunk's. The student's logits at
    `temperature`, the teacher's at `teacher_temperature`; `vocab_size` rows of both heads."""
    def chunk_fn(h, th, w, tw):
        student = fp32_logits(h, w) / temperature
        teacher = fp32_logits(th, tw) / teacher_temperature
        return distribution_divergence(student, teacher, kind, beta=beta, skew=skew, t=t)

    rows = tuple(x.reshape(-1, x.shape[-1]) for x in (hidden, teacher_hidden))
    heads = (head_rows(lm_head_weight, vocab_size), head_rows(teacher_head_weight, vocab_size))
    return checkpointed_chunks(chunk_fn, rows, heads, chunk_size).reshape(hidden.shape[:-1])
