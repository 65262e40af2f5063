"""Issue 13.6: tiny random-weight Qwen3, Llama and Mistral models (Qwen2 is the demo's own
architecture, trained by every system test) each run one training step end to end: vLLM
rollouts, teacher scoring, a DeepSpeed update, the weight sync, and the learner's and the
engine's log-probs of the sampled tokens agreeing."""
import os

import pytest

from test_system import FAST, metrics, rayskd

pytestmark = pytest.mark.slow


def tiny_model(kind: str, path: str, tokenizer, seed: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen3Config

    config_class = {"qwen3": Qwen3Config, "llama": LlamaConfig, "mistral": MistralConfig}[kind]
    extra = {"sliding_window": None} if kind == "mistral" else {}
    # head_dim 64: vLLM's CPU attention supports only some head sizes (16 is refused); GQA 2:1
    config = config_class(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=128,
                          bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, **extra)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["qwen3", "llama", "mistral"])
def test_one_step_end_to_end(kind, demo_assets, tmp_path, no_leftover_engines):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(demo_assets[0], "student"))
    student = tiny_model(kind, str(tmp_path / "student"), tok, seed=0)
    teacher = tiny_model(kind, str(tmp_path / "teacher"), tok, seed=1)
    run = tmp_path / "run"
    r = rayskd("train", "configs/demo.yaml", "run.steps=2", f"run.output_dir={run}", "learner.world_size=1", *FAST,
               f"student.path={student}", f"teacher.path={teacher}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = metrics(run)
    assert [m["step"] for m in rows] == [1, 2]
    for m in rows:
        assert m["kd_divergence"] > 0 and m["skipped_update"] is False
        assert m["sampler_mismatch_max"] < 1e-3, m["sampler_mismatch_max"]  # engine and learner agree
    assert rows[1]["weights_version_sampled"] == 1  # step 2 sampled the weights step 1 pushed
