"""Log-probabilities of chosen tokens, computed in chunks of positions.

A full fp32 [batch, length, vocab] tensor for a 152k vocabulary is gigabytes; these helpers
never build more than [chunk, vocab] at a time in fp32.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .divergences import fp32_logits, head_rows, logsumexp_outside, upcast


def _chunk_logp_entropy(logits: torch.Tensor, ids: torch.Tensor, temperature: float, with_entropy: bool):
    logits = upcast(logits)
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - lse
    if not with_entropy:
        return logp, None
    p = torch.softmax(logits, dim=-1)
    entropy = lse - (p * logits).sum(-1)
    return logp, entropy


def token_logprobs(
    logits: torch.Tensor,
    ids: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
):
    """log softmax(logits / temperature)[ids] over the last dim, `chunk_size` positions at a time.

    logits [..., V] (any float dtype), ids [...] -> logp [...] in fp32 (and entropy [...] when
    `with_entropy`, detached).
    """
    lead = ids.shape
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_ids = ids.reshape(-1)
    logps, ents = [], []
    for start in range(0, flat_ids.numel(), chunk_size):
        sl = slice(start, start + chunk_size)
        lp, ent = _chunk_logp_entropy(flat_logits[sl], flat_ids[sl], temperature, with_entropy)
        logps.append(lp)
        if with_entropy:
            ents.append(ent.detach())
    logp = torch.cat(logps).reshape(lead) if logps else flat_logits.new_zeros(lead, dtype=upcast(flat_logits[:0]).dtype)
    if not with_entropy:
        return logp
    entropy = torch.cat(ents).reshape(lead) if ents else torch.zeros_like(logp)
    return logp, entropy


def hidden_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    ids: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    vocab_size: int | None = None,
    with_entropy: bool = False,
):
    """Like `token_logprobs` but starting from hidden states [..., H] and the LM head [V, H]:
    each chunk's logits are recomputed in backward (activation checkpointing), so neither the
    full logits nor their fp32 copy is ever held. `vocab_size` slices padded LM-head rows.
    Each chunk's logits are formed in fp32 (`fp32_logits`).
    """
    weight = head_rows(lm_head_weight, vocab_size)
    lead = ids.shape
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_ids = ids.reshape(-1)

    def chunk_fn(h, w, i):
        return _chunk_logp_entropy(fp32_logits(h, w), i, temperature, False)[0]

    logps, ents = [], []
    for start in range(0, flat_ids.numel(), chunk_size):
        sl = slice(start, start + chunk_size)
        if torch.is_grad_enabled() and (flat_h.requires_grad or weight.requires_grad):
            lp = checkpoint(chunk_fn, flat_h[sl], weight, flat_ids[sl], use_reentrant=False)
        else:
            lp = chunk_fn(flat_h[sl], weight, flat_ids[sl])
        logps.append(lp)
        if with_entropy:
            with torch.no_grad():
                ents.append(_chunk_logp_entropy(fp32_logits(flat_h[sl], weight), flat_ids[sl], temperature, True)[1])
    logp = torch.cat(logps).reshape(lead)
    if not with_entropy:
        return logp
    return logp, torch.cat(ents).reshape(lead)


@torch.no_grad()
def hidden_topk_logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, ids: torch.Tensor, k: int,
                         temperature: float = 1.0, chunk_size: int = 1024, vocab_size: int | None = None):
    """From hidden states [..., H]: the log-prob of `ids` [...], the top-k ids [..., k] and
    their log-probs followed by the tail log-mass outside them [..., k+1] (`logsumexp_outside`:
    exact however close the top-k mass is to 1), computing fp32 logits `chunk_size`
    positions at a time (no grad)."""
    weight = head_rows(lm_head_weight, vocab_size)
    lead = ids.shape
    flat_h, flat_ids = hidden.reshape(-1, hidden.shape[-1]), ids.reshape(-1)
    kk = min(k, weight.shape[0])
    lps, top_i, top_v = [], [], []
    for start in range(0, flat_ids.numel(), chunk_size):
        z = fp32_logits(flat_h[start:start + chunk_size], weight)
        lp = torch.log_softmax(z / temperature if temperature != 1.0 else z, dim=-1)
        lps.append(lp.gather(-1, flat_ids[start:start + chunk_size, None]).squeeze(-1))
        v, i = lp.topk(kk, dim=-1)
        top_v.append(torch.cat([v, logsumexp_outside(lp, i)], dim=-1))
        top_i.append(i)
    return (torch.cat(lps).reshape(lead), torch.cat(top_i).reshape(*lead, kk),
            torch.cat(top_v).reshape(*lead, kk + 1))
