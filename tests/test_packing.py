"""Micro-batches by token budget (issue 9.5): every sequence lands in exactly one micro-batch,
the budget holds, padding shrinks, and the log-probs are those of the padded path (float64,
a tiny random Llama: the teacher's scores, top-k included, to 1e-12)."""
import pytest
import torch

from rayskd.batch import RolloutShard, forward_fields, micro_batches, pad_rows
from rayskd.config import TeacherConfig
from rayskd.modeling import response_logprobs
from rayskd.teacher import TeacherScorer

VOCAB = 40


def ragged_shard(n=24, seed=0) -> RolloutShard:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, VOCAB, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    responses = [torch.randint(1, VOCAB, (int(torch.randint(0, 15, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(n)]
    lengths = torch.tensor([len(r) for r in responses])
    return RolloutShard(pad_rows(prompts), torch.tensor([len(p) for p in prompts]), pad_rows(responses, width=14),
                        lengths, torch.zeros(n, 14), torch.zeros(n), torch.zeros(n, dtype=torch.bool),
                        torch.arange(n), 1, 0)


@pytest.mark.parametrize("budget", [0, 1, 20, 64, 10_000])
def test_micro_batches_cover_every_sequence_once_within_the_budget(budget):
    shard = ragged_shard()
    lengths = shard.prompt_len_N + shard.response_len_N
    sets = micro_batches(lengths, 5, budget)
    assert sorted(torch.cat(sets).tolist()) == list(range(len(lengths)))
    if budget == 0:  # rows: contiguous, in order, as before
        assert [s.tolist() for s in sets] == [list(range(i, min(i + 5, 24))) for i in range(0, 24, 5)]
        return
    for s in sets:  # within the budget, or one sequence alone
        assert len(s) * int(lengths[s].max()) <= budget or len(s) == 1


def test_length_grouping_cuts_padding():
    shard = ragged_shard(n=256, seed=1)
    lengths = shard.prompt_len_N + shard.response_len_N
    padded = lambda sets: sum(len(s) * int(lengths[s].max()) for s in sets)  # noqa: E731
    rows = micro_batches(lengths, 32, 0)
    grouped = micro_batches(lengths, 32, 32 * int(lengths.max()))
    real = int(lengths.sum())
    assert len(grouped) <= len(rows)
    assert padded(grouped) - real < 0.2 * real < 0.5 * (padded(rows) - real)  # padding: 16% of the tokens vs 76%


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    path = tmp_path_factory.mktemp("tiny")
    model.to(torch.float64).save_pretrained(path)
    return str(path), model.to(torch.float64).eval()


def test_grouped_micro_batches_give_the_padded_log_probs(tiny_model):
    _, model = tiny_model
    shard = ragged_shard()
    whole = (shard.prompt_ids_NP, shard.prompt_len_N, shard.response_ids_NR, shard.response_len_N)
    mask = shard.response_mask_NR().double()
    with torch.no_grad():
        padded = response_logprobs(model, whole, 0.7, 16, VOCAB, "cpu") * mask
        grouped = torch.zeros_like(padded)
        for idx in micro_batches(shard.prompt_len_N + shard.response_len_N, 4, 40):
            fields = forward_fields(shard, idx)
            grouped[idx, :fields[2].shape[1]] = response_logprobs(model, fields, 0.7, 16, VOCAB, "cpu")
    assert mask.sum() > 100
    assert torch.allclose(grouped * mask, padded, rtol=0, atol=1e-12)


@pytest.mark.parametrize("top_k", [0, 5])
def test_teacher_token_budget_scores_equal_fixed_rows(tiny_model, top_k):
    path, _ = tiny_model
    shard = ragged_shard()
    scores = {}
    for budget in (0, 40):
        cfg = TeacherConfig(path=path, top_k=top_k, micro_batch_size=7, max_tokens_per_batch=budget, dtype="float64")
        scores[budget] = TeacherScorer(path, cfg, VOCAB).score(shard)
    a, b = scores[0], scores[40]
    assert torch.allclose(a.logp_NR, b.logp_NR, rtol=0, atol=1e-6)  # returned as float32
    assert a.logp_NR.abs().sum() > 0
    if top_k:
        mask = shard.response_mask_NR().bool()
        assert torch.equal(a.topk_ids_NRK[mask], b.topk_ids_NRK[mask])
        assert torch.allclose(a.topk_logp_NRK1[mask], b.topk_logp_NRK1[mask], rtol=0, atol=1e-6)
