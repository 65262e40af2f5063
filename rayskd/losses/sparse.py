"""Sparse teacher targets by importance sampling (Anshumann et al., "Sparse Logit Sampling:
Accelerating Knowledge Distillation in LLMs", arXiv 2503.16870). docs/algorithms.md, "Sampled
sparse targets".

At each position the teacher sends N token ids drawn from a proposal r (its own distribution,
possibly tempered) and a weight for each, w_i = P_T(x_i) / (N r(x_i)), so that for any f

    E_{x_1..N ~ r} [ sum_i w_i f(x_i) ] = sum_x P_T(x) f(x),

an unbiased sparse stand-in for the teacher's distribution. Top-k renormalisation is not:
it drops the tail and inflates the top-k, so its forward-KL gradient is off in expectation
(tests/test_losses_sparse.py measures both by exact expectation over a small vocabulary).

A teacher payload (teacher.sparse_samples = N, estimator `sparse`): the teacher draws with
`hidden_sampled_logprobs` (each draw a function of its sequence and position alone, whatever the
batching, so a resumed or re-split run draws the same ids), the learner takes
`hidden_sampled_forward_kl` in the student's forward.
"""
from __future__ import annotations

import hashlib

import torch
from .divergences import checkpointed_chunks, fp32_logits, head_rows


def proposal(teacher_logp: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log r: the teacher's distribution at `temperature` (1: the teacher's own), [..., V]."""
    if temperature <= 0:
        raise ValueError(f"the proposal's temperature must be > 0, got {temperature}")
    return torch.log_softmax(teacher_logp / temperature, dim=-1)


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


# ---- the payload: the teacher's draw from hidden states, the learner's estimate in its forward ----

def row_uniforms(rows: list[list[int]], lengths: list[int], width: int, n: int) -> torch.Tensor:
    """Uniforms [rows, width, n] for the draws, each row's from a generator seeded by that
    row's tokens (prompt and response: `rows`), the first `lengths[i]` positions drawn and the
    rest 0: a position's draws depend on its sequence alone, never on the batch around it."""
    out = torch.zeros(len(rows), width, n, dtype=torch.float64)
    for i, (tokens, length) in enumerate(zip(rows, lengths)):
        digest = hashlib.blake2b(torch.tensor(tokens, dtype=torch.int64).numpy().tobytes(), digest_size=8).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
        out[i, :length] = torch.rand(length, n, generator=g, dtype=torch.float64)
    return out


def inverse_cdf_ids(proposal_logp: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Ids drawn from r by inverse CDF ([P, V] log r, [P, N] uniforms in [0, 1) -> [P, N]): the
    cumulative sum in float64, so that large vocabularies draw as r says."""
    cdf = proposal_logp.double().exp().cumsum(-1)
    ids = torch.searchsorted(cdf, uniforms.to(cdf.device) * cdf[:, -1:], right=True)
    return ids.clamp_(max=proposal_logp.shape[-1] - 1)


def hidden_sampled_logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, ids: torch.Tensor, uniforms: torch.Tensor,
                            temperature: float = 1.0, proposal_temperature: float = 1.0, chunk_size: int = 1024,
                            vocab_size: int | None = None):
    """The teacher's side, from its hidden states [..., H] (no grad): the log-prob of `ids` [...];
    N ids per position [..., N] drawn from r = its distribution at `proposal_temperature`
    (`uniforms` [..., N] from `row_uniforms`); their log-probs log P_T [..., N]; and their log
    importance weights log(P_T / (N r)) [..., N]. P_T is at `temperature`, as every teacher
    log-prob rayskd sends; logits in fp32, `chunk_size` positions at a time."""
    weight = head_rows(lm_head_weight, vocab_size)
    lead, n = ids.shape, uniforms.shape[-1]
    flat_h, flat_ids, flat_u = hidden.reshape(-1, hidden.shape[-1]), ids.reshape(-1), uniforms.reshape(-1, n)
    lps, drawn, drawn_lp, drawn_logw = [], [], [], []
    for start in range(0, flat_ids.numel(), chunk_size):
        z = fp32_logits(flat_h[start:start + chunk_size], weight)
        lp = torch.log_softmax(z / temperature if temperature != 1.0 else z, dim=-1)
        log_r = proposal(lp, proposal_temperature) if proposal_temperature != 1.0 else lp
        x = inverse_cdf_ids(log_r, flat_u[start:start + chunk_size])
        lps.append(lp.gather(-1, flat_ids[start:start + chunk_size, None]).squeeze(-1))
        drawn.append(x)
        drawn_lp.append(lp.gather(-1, x))
        drawn_logw.append(importance_weights(lp, log_r, x).log())
    return (torch.cat(lps).reshape(lead), torch.cat(drawn).reshape(*lead, n), torch.cat(drawn_lp).reshape(*lead, n),
            torch.cat(drawn_logw).reshape(*lead, n))


def hidden_sampled_forward_kl(hidden: torch.Tensor, lm_head_weight: torch.Tensor, ids: torch.Tensor,
                              teacher_logp_ids: torch.Tensor, teacher_logw: torch.Tensor, temperature: float = 1.0,
                              chunk_size: int = 1024, vocab_size: int | None = None) -> torch.Tensor:
    """The learner's side: `sparse_forward_kl` at each position [...] from the student's hidden
    states [..., H] and the teacher's draws (ids, log P_T and log weights, each [..., N]), the
    student's log-probs at `temperature` formed `chunk_size` positions at a time in fp32 and
    recomputed in backward (checkpointed), as `divergences.hidden_topk_divergence`."""
    def chunk_fn(h, x, t_lp, t_logw, w):
        z = fp32_logits(h, w)
        return sparse_forward_kl(torch.log_softmax(z / temperature if temperature != 1.0 else z, -1), x, t_logw.exp(),
                                 t_lp)

    rows = tuple(t.reshape(-1, t.shape[-1]) for t in (hidden, ids, teacher_logp_ids, teacher_logw))
    return checkpointed_chunks(chunk_fn, rows, (head_rows(lm_head_weight, vocab_size),),
                               chunk_size).reshape(ids.shape[:-1])
