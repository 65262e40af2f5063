"""The shapes of the models people distil, as random-weight test models (no download): the real
Hugging Face configuration of each (tied embeddings, grouped-query attention, head dim, RoPE
settings, the real vocabulary size) with fewer layers where a test asks, over any tokenizer, so
that the LM head has padded rows past the tokenizer's vocabulary as real checkpoints do.
tests/, scripts/gpu_check.py and scripts/bench_weight_push.py build theirs here."""
from __future__ import annotations

import os

# from the models' config.json (Qwen/Qwen2.5-0.5B-Instruct, Qwen/Qwen2.5-1.5B-Instruct,
# meta-llama/Llama-3.2-1B-Instruct)
SHAPES = {
    "qwen2.5-0.5b": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
        num_hidden_layers=24, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu", use_sliding_window=False,
        max_window_layers=21),
    "qwen2.5-1.5b": dict(
        model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
        num_hidden_layers=28, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu", use_sliding_window=False,
        max_window_layers=21),
    "llama-3.2-1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64, num_hidden_layers=16, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu", attention_bias=False, mlp_bias=False),
    # the same kinds of model at a size CPU tests and `gpu_check.py --tiny` can run: tied, GQA,
    # head dim 64 (vLLM's CPU attention needs it), and a 512-row LM head over a small tokenizer
    "tiny-student": dict(
        model_type="qwen2", hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1,
        num_hidden_layers=2, vocab_size=512, max_position_embeddings=2048, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, hidden_act="silu", use_sliding_window=False, max_window_layers=2),
    "tiny-teacher": dict(
        model_type="qwen2", hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, vocab_size=512, max_position_embeddings=2048, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, hidden_act="silu", use_sliding_window=False, max_window_layers=2),
}


def build(shape: str, out_dir: str, tokenizer_dir: str, *, layers: int | None = None, seed: int = 0,
          dtype: str = "float32", max_position_embeddings: int | None = None) -> str:
    """A random-weight model of `shape` (optionally cut to `layers`) with the tokenizer of
    `tokenizer_dir`, saved to `out_dir` (kept if already there). Its ids are the tokenizer's."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    spec = dict(SHAPES[shape])
    model_type = spec.pop("model_type")
    if layers is not None:
        spec["num_hidden_layers"] = layers
        if "max_window_layers" in spec:
            spec["max_window_layers"] = min(spec["max_window_layers"], layers)
    if max_position_embeddings is not None:
        spec["max_position_embeddings"] = max_position_embeddings
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(model_type, **spec, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # a 1.5B model initialises in seconds on a GPU
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    tmp = out_dir + ".tmp"
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return out_dir
