"""The teacher in the sampling loop: Speculative Knowledge Distillation (SKD; Xu et al., arXiv
2410.11325; docs/algorithms.md, "Speculative KD").

Each sequence is built block by block: the student's engine proposes up to `block` tokens from
the prefix so far; the teacher (one forward over prefix + proposal) accepts each proposed token
that lies in its top-K at that position, and the first one that does not is replaced by a token
drawn from the teacher's distribution there; the prefix grows by the accepted tokens and the
replacement, and the next block is proposed from it. A sequence ends at an end-of-sequence
token (proposed and accepted, or drawn by the teacher) or at rollout.max_new_tokens. Where the
teacher accepts everything, the sequence is the student's own sample.

`skd_generate` runs one request's loop as a Ray task beside the actors (an engine and a teacher
scorer), so the driver's pipeline treats it like any generation request.
"""
from __future__ import annotations

import ray

from .batch import MIXED, MIXTURE, PromptBatch


def skd_round_seed(step_seed: int, round_index: int) -> int:
    return (step_seed * 1_000_003 + round_index * 7919 + 12345) % (2 ** 62)


def speculative_sequences(propose, judge, rows: list[list[int]], *, max_new_tokens: int, block: int, seed: int,
                          stop_ids: set) -> tuple[list[list[int]], dict, list[list[int]]]:
    """The loop, given the two sides as functions: `propose(prefixes, lengths, seed)` -> the
    student's tokens for each prefix (at most lengths[i]); `judge(prefixes, proposals, seed)` ->
    (accepted count, the teacher's replacement or -1) for each. Returns (responses, counts of
    proposed and accepted tokens, each response's replaced positions)."""
    responses = [[] for _ in rows]
    replaced = [[] for _ in rows]
    proposed = accepted = 0
    active = list(range(len(rows)))
    round_index = 0
    while active:
        prefixes = [rows[i] + responses[i] for i in active]
        lengths = [min(block, max_new_tokens - len(responses[i])) for i in active]
        proposals = propose(prefixes, lengths, skd_round_seed(seed, round_index))
        verdicts = judge(prefixes, proposals, skd_round_seed(seed, round_index))
        still = []
        for i, proposal, (taken, replacement) in zip(active, proposals, verdicts):
            proposed += len(proposal)
            accepted += taken
            responses[i] += proposal[:taken]
            if replacement >= 0:
                replaced[i].append(len(responses[i]))
                responses[i].append(replacement)
            ended = any(t in stop_ids for t in responses[i]) or len(responses[i]) >= max_new_tokens
            if not ended and proposal:
                still.append(i)
        active = still
        round_index += 1
    return [r[:max_new_tokens] for r in responses], {"skd_proposed": proposed, "skd_accepted": accepted}, replaced


@ray.remote(num_cpus=0, num_returns=2, max_retries=0)
def skd_generate(engine, teacher, prompts: PromptBatch, step: int, verdict: str, param: float, block: int):
    """One request's sequences with the teacher in the loop: G per prompt, each grown by the
    student's engine and the teacher scorer in turns, rewarded and packed by the engine.
    `verdict`: judge (SKD: `param` is the top-K) or mix (MiniLLM: `param` is alpha, blocks of
    one token). Returns (shard, summary)."""
    spec = ray.get(engine.skd_spec.remote(prompts, step))
    rows = [ids for ids in prompts.prompt_ids for _ in range(spec["group_size"])]
    judge = getattr(teacher, verdict)
    responses, stats, _ = speculative_sequences(
        lambda prefixes, lengths, seed: ray.get(engine.propose.remote(prefixes, lengths, seed)),
        lambda prefixes, proposals, seed: ray.get(judge.remote(prefixes, proposals, param, seed)),
        rows, max_new_tokens=spec["max_new_tokens"], block=block, seed=spec["seed"], stop_ids=set(spec["stop_ids"]))
    origin = MIXED if verdict == "judge" else MIXTURE
    return tuple(ray.get(engine.pack.options(num_returns=2).remote(prompts, responses, origin, stats)))
