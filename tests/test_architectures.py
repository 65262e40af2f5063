"""The shapes people distil, end to end: vLLM rollouts, teacher scoring, a DeepSpeed update,
the weight push, and the learner's and the engine's log-probs of the sampled tokens agreeing.
Issue 13.6: tiny random-weight Qwen3 (student) and Mistral (teacher) models (Qwen2 is the demo's
own architecture, trained by every system test). Issue 25.8: the real Qwen2.5-0.5B and Llama-3.2-1B
configurations cut to 2 layers (rayskd/shapes.py): tied embeddings, grouped-query attention,
their head dims and RoPE settings (Llama 3's scaled RoPE), and their 151,936- and 128,256-row
LM heads over the demo's 13-token tokenizer, so that almost every row is padding; each trains,
pushes its weights, checkpoints and resumes."""
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


def test_a_qwen3_student_and_a_mistral_teacher_end_to_end(demo_assets, tmp_path, no_leftover_engines):
    """Qwen3 (q/k norms) through the engine, the learner and the push; Mistral through the
    teacher. (Mistral is Llama's architecture to vLLM and to the learner: the Llama-3.2 shape
    below trains, pushes and resumes.)"""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(demo_assets[0], "student"))
    student = tiny_model("qwen3", str(tmp_path / "student"), tok, seed=0)
    teacher = tiny_model("mistral", str(tmp_path / "teacher"), tok, seed=1)
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


@pytest.mark.parametrize("shape", ["qwen2.5-0.5b", "llama-3.2-1b"])
def test_real_shapes_train_push_and_resume(shape, demo_assets, tmp_path, no_leftover_engines):
    """A step, its weight push, a checkpoint; then a resume, the restored weights pushed and
    checked against the learner's, and a step on them. (The engines multiply by a packed copy of
    the tied LM head on CPU: this test found it stale after a push, 3.6e-2 off in log-prob.)
    Qwen's learner is at ZeRO-2, its teacher sending hidden states (the learner forms the teacher's
    logits with its LM head: forward KL over the whole vocabulary, through a checkpoint and its
    resume); Llama's at ZeRO-0, whose gradient norm rayskd's optimizer checks and reports
    (DeepSpeed does not there: grad_norm > 0 below once failed at ZeRO-0).
    Llama's checkpoint is 4.6 GB with its Adam moments, 9.2 GB at the resume's own before the
    first is pruned: deleted at the end whatever happens."""
    import shutil

    from rayskd.shapes import build

    student = build(shape, str(tmp_path / "student"), os.path.join(demo_assets[0], "student"), layers=2)
    run = tmp_path / "run"
    small = ["learner.world_size=1", "algorithm.prompts_per_step=4", "rollout.samples_per_prompt=2",
             "run.eval_samples=0", "run.eval_max_prompts=8", "run.eval_every=0", "run.checkpoint_every=0",
             "run.keep_checkpoints=1"]
    if shape.startswith("llama"):  # ZeRO-0 (Qwen's at the demo's 2): ZeRO-2's flat copies of its 380M
        small.append("learner.zero_stage=0")  # parameters took a third of each step; and stage 0 is covered
    else:  # a hidden-state teacher (issue 28.1): the learner holds its head, the divergence is over the vocabulary
        small += ["algorithm.kd.estimator=full", "teacher.send_hidden=true", "algorithm.kd.divergence=forward_kl"]
    try:
        r = rayskd("train", "configs/demo.yaml", "run.steps=1", f"run.output_dir={run}", f"student.path={student}",
                   *small)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        r = rayskd("resume", str(run), "run.steps=2")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "resumed from" in r.stdout and "step 1" in r.stdout, r.stdout[-2000:]
        rows = metrics(run)
        assert [m["step"] for m in rows] == [1, 2]
        for m in rows:
            assert m["kd_divergence"] > 0 and m["skipped_update"] is False and m["grad_norm"] > 0
            assert m["sampler_mismatch_max"] < 1e-3, m["sampler_mismatch_max"]  # the engine serves the pushed weights
        assert [m["weights_version_sampled"] for m in rows] == [0, 1]
    finally:  # the logs stay for a failure; the GBs go
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
        shutil.rmtree(run / "final", ignore_errors=True)
        shutil.rmtree(student, ignore_errors=True)
