"""Typed batches passed between stages. Shapes are in the names: N sequences, P prompt
tokens, R response tokens, K teacher top-k. Padding is right-padding with zeros; lengths say
how much of each row is real."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def pad_rows(rows: list[list], pad=0, dtype=torch.long, width: int | None = None) -> torch.Tensor:
    """Right-pad a list of lists into an [N, max_len] tensor (at least one column)."""
    width = max([len(r) for r in rows] + [1]) if width is None else width
    out = torch.full((len(rows), width), pad, dtype=dtype)
    for i, r in enumerate(rows):
        if len(r):
            out[i, :len(r)] = torch.as_tensor(r, dtype=dtype)
    return out


def length_mask(lengths_N: torch.Tensor, width: int) -> torch.Tensor:
    """[N, width] float mask of the first lengths_N[i] positions of each row."""
    return (torch.arange(width)[None] < lengths_N[:, None]).float()


# where a sequence comes from (docs/algorithms.md, "Sequences of other origins"): the student's
# own sample, the dataset's reference response, the teacher's sample (GKD's off-policy ones), or
# the student's proposals with the teacher's corrections (SKD)
ORIGINS = ("student", "dataset", "teacher", "mixed", "mixture", "replay")
# mixed: the student's proposals, corrected by the teacher (SKD); mixture: drawn token by token
# from alpha pi_T + (1 - alpha) pi_theta (MiniLLM), a behaviour policy the learner knows;
# replay: the student's own samples of an earlier step, from DistiLLM's replay buffer (replay.py)
STUDENT, DATASET, TEACHER, MIXED, MIXTURE, REPLAY = 0, 1, 2, 3, 4, 5
# sequences the student's engines sampled (now or, replayed, earlier): the GRPO term's
STUDENT_SAMPLED = (STUDENT, REPLAY)
# sequences served by others than the student's engines: requests of their own (`request_bounds`)
SERVED_ELSEWHERE = (TEACHER, REPLAY)


def student_sampled(origin_N: torch.Tensor) -> torch.Tensor:
    """[N] bool: which sequences the student's engines sampled (STUDENT_SAMPLED)."""
    return torch.isin(origin_N, torch.tensor(STUDENT_SAMPLED, dtype=origin_N.dtype, device=origin_N.device))


def reference_ids(tokenizer, answer: str, eos_id: int, max_new_tokens: int) -> tuple[list[int], bool]:
    """A row's reference response as token ids: its answer column and the end of sequence, at
    most max_new_tokens (and whether it was cut). GKD's dataset responses and DistiLLM's
    validation loss both read it."""
    ids = tokenizer(str(answer), add_special_tokens=False)["input_ids"] + [eos_id]
    return ids[:max_new_tokens], len(ids) > max_new_tokens


@dataclass
class PromptBatch:
    """Prompts chosen for one step (small metadata the driver may hold)."""
    uids: list[int]  # dataset row index of each prompt
    prompt_ids: list[list[int]]
    prompts: list[str]
    answers: list[str]
    origins: list[int] = field(default_factory=list)  # each prompt's sequences' origin (ORIGINS); empty: the student's

    def origin(self, i: int) -> int:
        return self.origins[i] if self.origins else STUDENT


PROMPT_FIELDS = ("uids", "prompt_ids", "prompts", "answers", "origins")


def prompt_batch(dataset, uids: list[int]) -> PromptBatch:
    """The prompts of rows `uids` of a `PromptDataset`, in that order."""
    return PromptBatch(uids=list(uids), prompt_ids=[dataset.prompt_ids[u] for u in uids],
                       prompts=[dataset.rows[u]["prompt"] for u in uids],
                       answers=[dataset.rows[u]["answer"] for u in uids])


def gkd_origins(seed: int, step: int, count: int, lmbda: float, off_policy: int = DATASET) -> list[int]:
    """GKD's choice for each of a step's `count` prompts: the student's own samples with
    probability `lmbda`, else `off_policy` (DATASET or TEACHER); a function of (seed, step)
    only, so a resumed run draws what the uninterrupted one did."""
    u = torch.rand(count, generator=torch.Generator().manual_seed(seed * 1_000_003 + step + 7919), dtype=torch.float64)
    return [STUDENT if x < lmbda else off_policy for x in u.tolist()]


def teacher_last(prompts: PromptBatch) -> PromptBatch:
    """The prompts with those served elsewhere than the student's engines (the teacher's samples,
    replayed groups) after the others (stable): each request then goes to one kind of server
    (`request_bounds`)."""
    if not set(SERVED_ELSEWHERE) & set(prompts.origins):
        return prompts
    order = sorted(range(len(prompts.uids)), key=lambda i: prompts.origins[i] in SERVED_ELSEWHERE)
    return PromptBatch(*([getattr(prompts, f)[i] for i in order] for f in PROMPT_FIELDS))


def request_bounds(prompts: PromptBatch, count: int) -> list[int]:
    """Where a step's prompts (`teacher_last`) are cut into `count` contiguous requests: near-
    equal parts, except that the prompts served elsewhere (the teacher's, or replayed: never both
    in one run) form requests of their own (as many as their share of the prompts gives, at
    least one for each kind present)."""
    n = len(prompts.uids)
    ours = sum(1 for i in range(n) if prompts.origin(i) not in SERVED_ELSEWHERE)
    if ours in (0, n) or count < 2:
        return [round(i * n / count) for i in range(count + 1)]
    first = min(max(round(count * ours / n), 1), count - 1)
    return ([round(i * ours / first) for i in range(first)]
            + [ours + round(i * (n - ours) / (count - first)) for i in range(count - first + 1)])


def split_prompts(prompts: PromptBatch, count: int) -> list[PromptBatch]:
    """`count` contiguous parts of a prompt batch, in order (`request_bounds`)."""
    bounds = request_bounds(prompts, count)
    return [PromptBatch(*(getattr(prompts, f)[a:b] for f in PROMPT_FIELDS)) for a, b in zip(bounds, bounds[1:])]


def merge_prompts(parts: list[PromptBatch]) -> PromptBatch:
    """The prompt batches `parts`, one after another (split_prompts' inverse)."""
    if any(p.origins for p in parts):
        parts = [PromptBatch(*(getattr(p, f) for f in PROMPT_FIELDS[:4]), [p.origin(i) for i in range(len(p.uids))])
                 for p in parts]
    return PromptBatch(*([x for p in parts for x in getattr(p, f)] for f in PROMPT_FIELDS))


def batch_stats(summaries: list[RolloutSummary]) -> dict:
    """Scalars describing a step's rollouts, for its metrics (from the requests' summaries)."""
    lengths = torch.tensor([n for s in summaries for n in s.response_len], dtype=torch.float32)
    rewards = torch.tensor([x for s in summaries for x in s.rewards], dtype=torch.float32)
    truncated = torch.tensor([x for s in summaries for x in s.truncated], dtype=torch.float32)
    return {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
            "response_len_mean": float(lengths.mean()), "response_tokens": float(lengths.sum()),
            "empty_frac": float((lengths == 0).float().mean()), "truncated_frac": float(truncated.mean()),
            "reward_errors": sum(int(s.stats.get("reward_errors", 0)) for s in summaries),
            "reward_timeouts": sum(int(s.stats.get("reward_timeouts", 0)) for s in summaries),
            "weights_version_sampled": min((s.weights_version for s in summaries
                                            if not set(s.origin) & set(SERVED_ELSEWHERE)), default=None),
            "prompt_uids": sorted({u for s in summaries for u in s.uids}), **origin_stats(summaries, rewards)}


def origin_stats(summaries: list[RolloutSummary], rewards: torch.Tensor) -> dict:
    """Sequences and mean reward per origin (ORIGINS), when a step has more than the student's."""
    origin = torch.tensor([o for s in summaries for o in (s.origin or [STUDENT] * len(s.uids))])
    out = {}
    proposed = sum(s.stats.get("skd_proposed", 0) for s in summaries)
    if proposed:  # speculative KD: the share of the student's proposed tokens the teacher kept
        out["skd_acceptance"] = sum(s.stats.get("skd_accepted", 0) for s in summaries) / proposed
    if not bool((origin != STUDENT).any()):
        return out
    return {**out,"sequences_by_origin": {name: int((origin == i).sum()) for i, name in enumerate(ORIGINS)},
            "reward_by_origin": {name: float(rewards[origin == i].mean()) if bool((origin == i).any()) else None
                                 for i, name in enumerate(ORIGINS)}}


@dataclass
class RolloutShard:
    """One rollout worker's output: G responses for each of its prompts, group by group."""
    prompt_ids_NP: torch.Tensor
    prompt_len_N: torch.Tensor
    response_ids_NR: torch.Tensor
    response_len_N: torch.Tensor
    sampler_logp_NR: torch.Tensor  # the sampler's (vLLM) log-prob of each sampled token, at the sampling temperature
    rewards_N: torch.Tensor
    truncated_N: torch.Tensor  # hit max_new_tokens without end of sequence
    uids_N: torch.Tensor  # dataset row of each sequence's prompt
    group_size: int
    weights_version: int
    stats: dict = field(default_factory=dict)  # reward_errors, reward_timeouts
    origin_N: torch.Tensor | None = None  # each sequence's origin (ORIGINS; None: all the student's)

    def __post_init__(self):
        if self.origin_N is None:
            self.origin_N = torch.zeros(self.response_ids_NR.shape[0], dtype=torch.int8)

    @property
    def num_sequences(self) -> int:
        return self.response_ids_NR.shape[0]

    def response_mask_NR(self) -> torch.Tensor:
        return length_mask(self.response_len_N, self.response_ids_NR.shape[1])


@dataclass
class RolloutSummary:
    """What the driver reads of a rollout request: per-sequence scalars, no token data (the
    batch statistics, the loss normalisers and the staleness come from these)."""
    uids: list[int]
    response_len: list[int]
    rewards: list[float]
    truncated: list[bool]
    group_size: int
    weights_version: int  # the weights the engine sampled with
    stats: dict = field(default_factory=dict)  # reward_errors, reward_timeouts
    origin: list = field(default_factory=list)  # per sequence (ORIGINS)


def summarize(shard: RolloutShard) -> RolloutSummary:
    return RolloutSummary(uids=shard.uids_N.tolist(), response_len=shard.response_len_N.tolist(),
                          rewards=shard.rewards_N.tolist(), truncated=shard.truncated_N.tolist(),
                          group_size=shard.group_size, weights_version=shard.weights_version, stats=dict(shard.stats),
                          origin=shard.origin_N.tolist())


SHARD_TENSORS = ("prompt_ids_NP", "prompt_len_N", "response_ids_NR", "response_len_N", "sampler_logp_NR", "rewards_N",
                 "truncated_N", "uids_N", "origin_N")


def shard_to_tensors(shard: RolloutShard, prefix: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a shard, for safetensors (checkpoints hold no pickled objects)."""
    tensors = {f"{prefix}.{name}": getattr(shard, name).contiguous() for name in SHARD_TENSORS}
    return tensors, {"group_size": shard.group_size, "weights_version": shard.weights_version, "stats": shard.stats}


def shard_from_tensors(tensors: dict, prefix: str, meta: dict) -> RolloutShard:
    # (a checkpoint from before origins has none: the student's samples)
    return RolloutShard(**{name: tensors.get(f"{prefix}.{name}") for name in SHARD_TENSORS},
                        group_size=meta["group_size"], weights_version=meta["weights_version"], stats=meta["stats"])


@dataclass
class LearnerShare:
    """One learner rank's part of an update (`learner.learner_shares`): object refs to its
    rollout shards and their teacher scores (the rank fetches them itself: the driver never
    holds token data), which of its sequences the teacher term selects, and the normalisers of
    the whole batch (`losses.batch_normalisers`)."""
    kd_coef: float
    rehearsal_start: int
    pg_denominator: float
    kd_denominator: float
    kd_mask: list  # 0/1 per sequence of the share's shards, in order (`losses.kd_sequence_mask`)
    shards: list  # ray ObjectRefs of RolloutShard, contiguous groups
    scores: list  # ray ObjectRefs of TeacherScores: per shard, one per teacher that scored it
    taid_t: float = 1.0  # TAID's interpolation for this step (algorithm.kd.divergence=taid)
    # several teachers: how many of `scores` belong to each shard (None: one each), how they
    # combine (teacher.combine) and each teacher's coefficient (config.teacher_coefs)
    score_parts: list | None = None
    combine: str = "route"
    teacher_coefs: tuple = (1.0,)

    def scores_by_shard(self, scores: list) -> list[list]:
        """`scores` (this share's, flat, as fetched) grouped by shard."""
        counts, out, i = self.score_parts or [1] * len(self.shards), [], 0
        for c in counts:
            out.append(list(scores[i:i + c]))
            i += c
        return out


@dataclass
class TeacherScores:
    """The teacher's view of one rollout shard, aligned with its response tokens. A sequence for
    which the teacher gave a non-finite value has its values zeroed and its count of such
    response tokens in `nonfinite_N` (the learner gives it no teacher term)."""
    logp_NR: torch.Tensor
    topk_ids_NRK: torch.Tensor | None = None
    topk_logp_NRK1: torch.Tensor | None = None
    # teacher.sparse_samples = S: ids drawn from the teacher's (tempered) distribution at each
    # position, their log-probs and log importance weights (losses/sparse.py)
    sample_ids_NRS: torch.Tensor | None = None
    sample_logp_NRS: torch.Tensor | None = None
    sample_logw_NRS: torch.Tensor | None = None
    # teacher.send_hidden: the teacher's final hidden state at each position (its dtype)
    hidden_NRH: torch.Tensor | None = None
    nonfinite_N: torch.Tensor | None = None  # None: all finite
    worker: int = 0  # the teacher worker that scored it (for messages)
    # several teachers (teacher.others): the teacher that scored these, and the shard's rows they
    # are (None: all, in order); once combined (`combine_scores`), each row's teacher (route) or
    # each teacher's log-probs [T, N, R] (ensemble: logp_NR is then the mixture's)
    teacher: int = 0
    rows_N: torch.Tensor | None = None
    teacher_N: torch.Tensor | None = None
    teacher_logp_TNR: torch.Tensor | None = None

    def nonfinite(self) -> torch.Tensor:
        """[N] count of response tokens the teacher gave a non-finite value."""
        return self.nonfinite_N if self.nonfinite_N is not None else torch.zeros(self.logp_NR.shape[0], dtype=torch.long)


@dataclass
class RehearsalRows:
    """Cached samples of the initial student (DPH-RL) with their reference log-probs."""
    prompt_ids_NP: torch.Tensor
    prompt_len_N: torch.Tensor
    response_ids_NR: torch.Tensor
    response_len_N: torch.Tensor
    ref_logp_NR: torch.Tensor

    def response_mask_NR(self) -> torch.Tensor:
        return length_mask(self.response_len_N, self.response_ids_NR.shape[1])


def concat_shards(shards: list[RolloutShard]) -> RolloutShard:
    """Merge rollout shards (groups stay contiguous), re-padding to common widths."""
    def cat(name, pad=0.0):
        ts = [getattr(s, name) for s in shards]
        width = max(t.shape[1] for t in ts)
        return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pad) for t in ts])

    stats: dict = {}
    for s in shards:
        for k, v in s.stats.items():
            stats[k] = stats.get(k, 0) + v
    return RolloutShard(
        prompt_ids_NP=cat("prompt_ids_NP", 0), prompt_len_N=torch.cat([s.prompt_len_N for s in shards]),
        response_ids_NR=cat("response_ids_NR", 0), response_len_N=torch.cat([s.response_len_N for s in shards]),
        sampler_logp_NR=cat("sampler_logp_NR", 0.0), rewards_N=torch.cat([s.rewards_N for s in shards]),
        truncated_N=torch.cat([s.truncated_N for s in shards]), uids_N=torch.cat([s.uids_N for s in shards]),
        group_size=shards[0].group_size, weights_version=min(s.weights_version for s in shards), stats=stats,
        origin_N=torch.cat([s.origin_N for s in shards]))


def split_shard(shard: RolloutShard, count: int) -> list[RolloutShard]:
    """`count` contiguous parts of a shard by whole groups, cut where split_prompts cuts its
    prompts (the counters in `stats` go with the first part)."""
    groups = shard.origin_N[::shard.group_size].tolist()
    prompts = PromptBatch(list(range(len(groups))), [], [], [], groups)
    bounds = [b * shard.group_size for b in request_bounds(prompts, count)]
    return [RolloutShard(**{name: getattr(shard, name)[a:b] for name in SHARD_TENSORS}, group_size=shard.group_size,
                         weights_version=shard.weights_version, stats=dict(shard.stats) if i == 0 else {})
            for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


def select_rows(shard: RolloutShard, idx: torch.Tensor) -> RolloutShard:
    """Rows `idx` of a shard (whole groups or not: the group size is kept as metadata)."""
    return RolloutShard(**{name: getattr(shard, name)[idx] for name in SHARD_TENSORS}, group_size=shard.group_size,
                        weights_version=shard.weights_version, stats=dict(shard.stats))


SCORE_TENSORS = ("logp_NR", "topk_ids_NRK", "topk_logp_NRK1", "sample_ids_NRS", "sample_logp_NRS", "sample_logw_NRS",
                 "hidden_NRH")


def _pad_width(t: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    """`t` right-padded with zeros to `width` along `dim` (its response positions)."""
    return torch.nn.functional.pad(t, (0, 0) * (t.dim() - dim - 1) + (0, width - t.shape[dim]))


def concat_scores(scores: list[TeacherScores], width: int) -> TeacherScores:
    def cat(ts, rows=0):  # along the rows, each padded to `width` positions (the dimension after them)
        if ts[0] is None:
            return None
        return torch.cat([_pad_width(t, width, rows + 1) for t in ts], rows)

    return TeacherScores(**{name: cat([getattr(s, name) for s in scores]) for name in SCORE_TENSORS},
                         nonfinite_N=torch.cat([s.nonfinite() for s in scores]),
                         teacher_N=torch.cat([s.teacher_N for s in scores]) if scores[0].teacher_N is not None else None,
                         teacher_logp_TNR=cat([s.teacher_logp_TNR for s in scores], rows=1))


def combine_scores(parts: list[TeacherScores], rows: int, combine: str, coefs: list[float]) -> TeacherScores:
    """One shard's scores from its teachers' (docs/algorithms.md, "Several teachers"). route:
    each part scored some of the `rows` sequences (`rows_N`), and goes back to them, with each
    row's teacher in `teacher_N`. ensemble: every part scored every row, and the target is the
    mixture sum_i w_i pi_i (`coefs`: the weights w, summing to 1): its log-prob of a sampled token
    is logsumexp_i(log w_i + log pi_i), exact; each teacher's log-probs stay in `teacher_logp_TNR`
    (for its own divergence metric). A row is non-finite when any of its teachers' is."""
    if len(parts) == 1 and parts[0].rows_N is None:
        return parts[0]
    width = max(p.logp_NR.shape[1] for p in parts)
    if combine == "ensemble":
        parts = sorted(parts, key=lambda p: p.teacher)
        logp_TNR = torch.stack([_pad_width(p.logp_NR, width) for p in parts])
        log_w = torch.tensor([coefs[p.teacher] for p in parts], dtype=logp_TNR.dtype).log()
        nonfinite = sum(p.nonfinite() for p in parts)
        return TeacherScores(logp_NR=torch.logsumexp(logp_TNR + log_w[:, None, None], 0), teacher_logp_TNR=logp_TNR,
                             nonfinite_N=nonfinite if bool((nonfinite > 0).any()) else None,
                             worker=next((p.worker for p in parts if p.nonfinite_N is not None), 0))
    out: dict = {}
    teacher_N, nonfinite = torch.full((rows,), -1, dtype=torch.long), torch.zeros(rows, dtype=torch.long)
    for p in parts:
        idx = p.rows_N if p.rows_N is not None else torch.arange(rows)
        for name in SCORE_TENSORS:
            t = getattr(p, name)
            if t is not None:
                if name not in out:
                    out[name] = t.new_zeros((rows, width, *t.shape[2:]))
                out[name][idx, :t.shape[1]] = t
        teacher_N[idx], nonfinite[idx] = p.teacher, p.nonfinite()
    if bool((teacher_N < 0).any()):
        raise ValueError(f"rows {(teacher_N < 0).nonzero().flatten().tolist()} of a shard have no teacher's scores")
    return TeacherScores(**out, teacher_N=teacher_N, nonfinite_N=nonfinite if bool((nonfinite > 0).any()) else None,
                         worker=next((p.worker for p in parts if p.nonfinite_N is not None), 0))


def micro_batches(seq_len_N: torch.Tensor, max_rows: int, max_tokens: int = 0) -> list[torch.Tensor]:
    """Index sets that split N sequences into micro-batches. max_tokens == 0: contiguous chunks
    of `max_rows`, in order. Otherwise by a token budget: the sequences longest first, each set
    as many as fit rows x its longest <= max_tokens (a longer sequence goes alone), so a set
    holds near-equal lengths and padding stays small; `max_rows` is then unused."""
    n = len(seq_len_N)
    if max_tokens <= 0:
        return [torch.arange(s, min(s + max_rows, n)) for s in range(0, n, max_rows)]
    order = torch.argsort(seq_len_N, descending=True, stable=True)
    sets, start = [], 0
    while start < n:
        longest = max(int(seq_len_N[order[start]]), 1)
        rows = max(1, min(max_tokens // longest, n - start))
        sets.append(order[start:start + rows])
        start += rows
    return sets


def forward_fields(rows, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(prompt_ids, prompt_len, response_ids, response_len) of rows `idx` of a RolloutShard or
    RehearsalRows, cut to the widths those rows need (at least one column)."""
    prompt_len, response_len = rows.prompt_len_N[idx], rows.response_len_N[idx]
    p, r = max(int(prompt_len.max()), 1), max(int(response_len.max()), 1)
    return rows.prompt_ids_NP[idx, :p], prompt_len, rows.response_ids_NR[idx, :r], response_len


def sequences_for_forward(prompt_ids_NP, prompt_len_N, response_ids_NR, response_len_N, pad_id: int = 0):
    """Pack prompt + response per row: input_ids [N, L], attention_mask [N, L] and the
    position of the logits that predict each response token, positions_NR [N, R]
    (logits at position t predict token t + 1)."""
    N, R = response_ids_NR.shape
    L = int((prompt_len_N + response_len_N).max().item()) if N else 1
    L = max(L, 1)
    input_ids = torch.full((N, L), pad_id, dtype=torch.long)
    attention = torch.zeros((N, L), dtype=torch.long)
    for i in range(N):
        p, r = int(prompt_len_N[i]), int(response_len_N[i])
        input_ids[i, :p] = prompt_ids_NP[i, :p]
        input_ids[i, p:p + r] = response_ids_NR[i, :r]
        attention[i, :p + r] = 1
    positions = (prompt_len_N[:, None] - 1 + torch.arange(R)[None]).clamp(0, L - 1)
    return input_ids, attention, positions
