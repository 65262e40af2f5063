"""Shared model plumbing for the teacher and the learner: load a Hugging Face causal LM and
compute per-response-token log-probs from hidden states, in chunks (never a full fp32
[batch, length, vocab] tensor)."""
from __future__ import annotations

import torch

from .batch import sequences_for_forward
from .losses import hidden_logprobs

# positions per chunk of the no-grad scoring log-softmax (teacher, presampling)
SCORING_CHUNK = 4096


def load_causal_lm(path: str, dtype: torch.dtype, device: str | torch.device = "cpu"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device)


def vocab_limit(tokenizer_len: int, model) -> int:
    """Rows of the LM head that belong to the tokenizer (the rest is padding)."""
    return min(tokenizer_len, model.get_output_embeddings().weight.shape[0])


def response_hidden(model, prompt_ids_NP, prompt_len_N, response_ids_NR, response_len_N, device):
    """Hidden states [N, R, H] at the positions whose logits predict each response token."""
    input_ids, attention, positions = sequences_for_forward(prompt_ids_NP, prompt_len_N, response_ids_NR,
                                                            response_len_N)
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    hidden = base(input_ids=input_ids.to(device), attention_mask=attention.to(device)).last_hidden_state
    idx = positions.to(device).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, idx)


def response_logprobs(model, shard_fields, temperature: float, chunk: int, vocab_size: int, device,
                      with_entropy: bool = False):
    """log pi(response token | prefix) at `temperature`: [N, R] (and entropy [N, R])."""
    prompt_ids, prompt_len, response_ids, response_len = shard_fields
    h = response_hidden(model, prompt_ids, prompt_len, response_ids, response_len, device)
    w = model.get_output_embeddings().weight
    return hidden_logprobs(h, w, response_ids.to(device), temperature, chunk, vocab_size, with_entropy)
