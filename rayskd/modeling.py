"""Shared model plumbing for the teacher and the learner: load a Hugging Face causal LM and
compute per-response-token log-probs from hidden states, in chunks (never a full fp32
[batch, length, vocab] tensor)."""
from __future__ import annotations

import os

import torch

from .batch import sequences_for_forward
from .losses import hidden_logprobs

# positions per chunk of the no-grad scoring log-softmax (teacher, presampling)
SCORING_CHUNK = 4096


def load_causal_lm(path: str, dtype: torch.dtype, device: str | torch.device = "cpu", **kwargs):
    """A Hugging Face causal LM on `device` (`kwargs` go to from_pretrained: tp_plan and
    device_mesh for a tensor-parallel teacher, which places itself)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    return model if "tp_plan" in kwargs else model.to(device)


def load_output_head(path: str, device) -> torch.Tensor:
    """The LM head [V, H] of the model at `path`, read from its safetensors files alone (a
    hidden-state teacher's, held by each learner rank, frozen): the parameter the architecture
    uses as its output embedding, found on a meta-device copy of the model, under whichever of
    its names the checkpoint stores (a tied head is stored as the input embedding)."""
    import glob

    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    head = model.get_output_embeddings().weight
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is head]
    names += [n for n, p in model.named_parameters(remove_duplicate=False)
              if p is model.get_input_embeddings().weight and n not in names]  # tied: either name
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with safe_open(file, "pt") as f:
            for name in names:
                if name in f.keys():
                    return f.get_tensor(name).to(device)
    raise ValueError(f"{path}: no safetensors tensor named {' or '.join(names)} (its LM head)")


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


class PolicyModel(torch.nn.Module):
    """The student as the learner trains it: one forward from token ids to log pi_theta of each
    response token at the sampling temperature (optionally its entropy, and a divergence on the
    teacher's top-k support). DeepSpeed wraps this module, not the language model: under ZeRO-3
    a parameter is gathered only inside the forward of a module that holds it, and the LM head
    is read here, outside the language model's own forward, so it is registered as this
    module's external parameter (gathered for this forward and for its backward)."""

    def __init__(self, lm, *, temperature: float, chunk: int, vocab_size: int, device, zero3: bool,
                 divergence: str = "reverse_kl", beta: float = 0.5, skew: float = 0.1,
                 teacher_head: torch.Tensor | None = None, teacher_temperature: float = 1.0):
        super().__init__()
        self.lm = lm
        self.temperature, self.chunk, self.vocab_size, self.device = temperature, chunk, vocab_size, device
        self.divergence, self.beta, self.skew = divergence, beta, skew
        # a hidden-state teacher's LM head: a plain tensor (frozen; neither a parameter nor a
        # buffer, so DeepSpeed and the checkpoints leave it alone)
        self.teacher_head, self.teacher_temperature = teacher_head, teacher_temperature
        if zero3:
            import deepspeed

            deepspeed.zero.register_external_parameter(self, lm.get_output_embeddings().weight)

    def forward(self, prompt_ids_NP, prompt_len_N, response_ids_NR, response_len_N, with_entropy: bool = False,
                topk_ids_NRK=None, teacher_topk_logp_NRK1=None, taid_t: float = 1.0, sample_ids_NRS=None,
                teacher_sample_logp_NRS=None, teacher_sample_logw_NRS=None, teacher_hidden_NRH=None):
        """(logp [N, R], entropy [N, R] or None, the divergence to the teacher's distribution
        [N, R] or None: on its top-k, its draws' forward-KL estimate, or over the whole
        vocabulary from its hidden states). `taid_t`: TAID's interpolation this step (divergence
        taid)."""
        from .losses import hidden_full_divergence, hidden_topk_divergence
        from .losses.sparse import hidden_sampled_forward_kl

        h = response_hidden(self.lm, prompt_ids_NP, prompt_len_N, response_ids_NR, response_len_N, self.device)
        w = self.lm.get_output_embeddings().weight
        ids = response_ids_NR.to(self.device)
        out = hidden_logprobs(h, w, ids, self.temperature, self.chunk, self.vocab_size, with_entropy)
        logp, entropy = out if with_entropy else (out, None)
        kd = None
        if topk_ids_NRK is not None:
            kd = hidden_topk_divergence(h, w, topk_ids_NRK.to(self.device).long(), teacher_topk_logp_NRK1.to(self.device),
                                        self.divergence, self.beta, self.skew, self.temperature, self.chunk,
                                        self.vocab_size, t=taid_t)
        elif teacher_hidden_NRH is not None:
            kd = hidden_full_divergence(h, w, teacher_hidden_NRH.to(self.device), self.teacher_head, self.divergence,
                                        self.beta, self.skew, self.temperature, self.teacher_temperature, self.chunk,
                                        self.vocab_size, t=taid_t)
        elif sample_ids_NRS is not None:
            kd = hidden_sampled_forward_kl(h, w, sample_ids_NRS.to(self.device).long(), teacher_sample_logp_NRS.to(self.device),
                                           teacher_sample_logw_NRS.to(self.device), self.temperature, self.chunk,
                                           self.vocab_size)
        return logp, entropy, kd
