"""Issue 28.1, the hidden-state teacher's parts outside the losses: each learner reads the
teacher's LM head from its safetensors files (tied heads under the input embedding's name, as
Qwen2.5 and Llama-3.2 store them), and a teacher asked for its hidden states sends the final
hidden state at every response position, from which the learner's head gives its log-probs."""
import pytest
import torch

from rayskd.modeling import load_output_head


@pytest.mark.parametrize("tied", [False, True])
def test_the_learner_reads_the_teachers_head_tied_or_not(tmp_path, tied):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path)
    head = load_output_head(str(tmp_path), "cpu")
    assert torch.equal(head, model.get_output_embeddings().weight.detach())
    if tied:
        assert torch.equal(head, model.get_input_embeddings().weight.detach())


def test_a_teacher_sends_its_hidden_states_and_they_give_its_log_probs(demo_assets):
    from rayskd.batch import RolloutShard, pad_rows
    from rayskd.config import load_config
    from rayskd.losses import hidden_logprobs
    from rayskd.teacher import TeacherScorer

    cfg = load_config("configs/demo.yaml", ["algorithm.kd.estimator=full", "teacher.send_hidden=true",
                                            "teacher.dtype=float32"])
    teacher = TeacherScorer(cfg.teacher.path, cfg.teacher, 13)
    responses = [[0, 5, 2, 12], [0, 5, 3, 12], [0, 1, 12], [1, 12]]
    n = len(responses)
    shard = RolloutShard(pad_rows([[0, 7, 10, 4, 5, 11]] * n), torch.tensor([6] * n), pad_rows(responses),
                         torch.tensor([len(r) for r in responses]), pad_rows([[-1.0] * len(r) for r in responses], 0.0,
                                                                              torch.float32),
                         torch.zeros(n), torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.long), 2, 0)
    scores = teacher.score(shard)
    assert scores.hidden_NRH.shape == (n, 4, teacher.model.config.hidden_size)
    head = load_output_head(cfg.teacher.path, "cpu")
    lp = hidden_logprobs(scores.hidden_NRH, head, shard.response_ids_NR, vocab_size=13)
    mask = shard.response_mask_NR() > 0
    torch.testing.assert_close(lp[mask], scores.logp_NR[mask], atol=1e-5, rtol=0)
