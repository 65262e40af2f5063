"""Held-out evaluation: greedy accuracy, sampled pass@1 and pass@k, response length.

A sample solves its problem when its reward is at least SOLVED_AT (full credit: the built-in
rewards give 1.0 to a correct answer); the teacher term's reward-guided mask uses the same rule
(losses.solved). pass@k uses the unbiased estimator of Chen et al.
(2021) from n samples of which c solve the problem, averaged over problems:

    pass@k = 1 - C(n - c, k) / C(n, k)

(1 when fewer than k samples fail). Sampled pass@1 is the mean solve rate of the samples;
greedy accuracy is temperature-0 decoding, one response per problem.

The teacher-hacking monitor (teacher.golden_path; Tiapkin et al., "On Teacher Hacking in
Language Model Distillation", arXiv 2502.02671) scores the sampled responses with the teacher
(the proxy) and a golden model, and logs KL(student || each) estimated on them (`sampled_kl`);
`hacking_warning` says when the proxy divergence keeps falling while the golden one rises.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .losses import SOLVED_AT, solved


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n, c of them
    correct, is correct. Computed as a product (no factorials: exact for any n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


@dataclass
class EvalRows:
    """What an engine returns for its share of the problems: per problem, the greedy response's
    reward and length, and the rewards and lengths of `samples` sampled responses."""
    greedy_reward: list[float] = field(default_factory=list)
    greedy_len: list[int] = field(default_factory=list)
    sampled_reward: list[list[float]] = field(default_factory=list)
    sampled_len: list[list[int]] = field(default_factory=list)
    reward_errors: int = 0
    samples: list = field(default_factory=list)  # the sampled responses (RolloutShards), when asked for
    distinct_right: list[int] = field(default_factory=list)  # per problem: distinct responses that solve it

    @staticmethod
    def count_distinct_right(sampled, samples: int) -> list[int]:
        """Per problem of a sampled shard (`samples` responses each, group by group): how many
        different responses (by token ids) solve it. A policy narrowed onto one answer scores 1."""
        right = solved(sampled.rewards_N).view(-1, samples).tolist()
        out = []
        for p, flags in enumerate(right):
            rows = range(p * samples, (p + 1) * samples)
            out.append(len({tuple(sampled.response_ids_NR[i, :int(sampled.response_len_N[i])].tolist())
                            for i, ok in zip(rows, flags) if ok}))
        return out

    def extend(self, other: "EvalRows") -> "EvalRows":
        self.greedy_reward += other.greedy_reward
        self.greedy_len += other.greedy_len
        self.sampled_reward += other.sampled_reward
        self.sampled_len += other.sampled_len
        self.reward_errors += other.reward_errors
        self.samples += other.samples
        self.distinct_right += other.distinct_right
        return self


def summarize_eval(rows: EvalRows, ks: tuple[int, ...]) -> dict:
    """The numbers of one evaluation: greedy_accuracy, pass@k for each k (when there are
    sampled responses), response_len_mean (greedy and sampled responses together), counts."""
    problems = len(rows.greedy_reward)
    out = {"problems": problems,
           "greedy_accuracy": sum(r >= SOLVED_AT for r in rows.greedy_reward) / max(problems, 1),
           "greedy_reward_mean": sum(rows.greedy_reward) / max(problems, 1)}
    lengths = rows.greedy_len + [n for per in rows.sampled_len for n in per]
    n = len(rows.sampled_reward[0]) if rows.sampled_reward else 0
    if n:
        right = [sum(r >= SOLVED_AT for r in per) for per in rows.sampled_reward]
        for k in ks:
            out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in right) / problems
        out["samples_per_problem"] = n
        if rows.distinct_right:
            out["distinct_right"] = sum(rows.distinct_right) / problems
    out["response_len_mean"] = sum(lengths) / max(len(lengths), 1)
    out["reward_errors"] = rows.reward_errors
    return out


def format_eval(summary: dict) -> str:
    """One line: `greedy 0.412 | pass@1 0.377 | pass@4 0.590 | len 3.9`."""
    parts = [f"greedy {summary['greedy_accuracy']:.3f}"]
    parts += [f"{key} {value:.3f}" for key, value in summary.items() if key.startswith("pass@")]
    parts.append(f"len {summary['response_len_mean']:.1f}")
    if summary.get("golden_kl") is not None:
        parts.append(f"KL to teacher {summary['proxy_kl']:.4f}, to golden {summary['golden_kl']:.4f}")
    return " | ".join(parts)


def sampled_kl(shards: list, scores: list) -> float:
    """KL(student || model) per response token, estimated on the student's own sampled
    responses: the mean over their tokens of log pi_student - log pi_model (k1; unbiased, the
    samples being the student's). The student's log-probs are the engine's (the sampling
    temperature), the model's as its scorer returns them (teacher.temperature)."""
    total = tokens = 0.0
    for shard, score in zip(shards, scores, strict=True):
        mask = shard.response_mask_NR()
        total += float(((shard.sampler_logp_NR - score.logp_NR) * mask).sum())
        tokens += float(mask.sum())
    return total / max(tokens, 1.0)


def hacking_warning(history: list[dict], window: int = 3) -> str | None:
    """The teacher-hacking sign over the last `window` evaluations' changes (`history`: eval.jsonl
    rows with proxy_kl and golden_kl, in order): the divergence from the teacher fell at each
    while the divergence from the golden model rose at each. None otherwise."""
    rows = [r for r in history if r.get("golden_kl") is not None][-(window + 1):]
    if len(rows) < window + 1:
        return None
    pairs = list(zip(rows, rows[1:]))
    if all(b["proxy_kl"] < a["proxy_kl"] for a, b in pairs) and all(b["golden_kl"] > a["golden_kl"] for a, b in pairs):
        return (f"teacher hacking? over the last {window} evaluations (steps {rows[0]['step']}-{rows[-1]['step']}) "
                f"the divergence from the teacher fell ({rows[0]['proxy_kl']:.4f} -> {rows[-1]['proxy_kl']:.4f}) "
                f"while the divergence from the golden model rose ({rows[0]['golden_kl']:.4f} -> "
                f"{rows[-1]['golden_kl']:.4f})")
    return None


def evaluate_on(pool, dataset, run, scorers: dict | None = None) -> dict:
    """One evaluation of the model the rollout pool's engines serve: the first
    run.eval_max_prompts problems of `dataset` (0: all), greedy plus run.eval_samples samples
    each, summarised for run.eval_k; `eval_s` is its wall time. Training and `rayskd eval`
    both evaluate through here. `scorers` ({"proxy": teacher group, "golden": golden group}):
    the sampled responses scored by each, `<name>_kl` = `sampled_kl`."""
    import time

    import ray

    from .batch import prompt_batch

    t0 = time.perf_counter()
    n = len(dataset) if not run.eval_max_prompts else min(len(dataset), run.eval_max_prompts)
    rows = EvalRows()
    for part in ray.get(pool.run("evaluate", pool.split(prompt_batch(dataset, list(range(n)))), run.eval_samples,
                                 bool(scorers), what="evaluation")):
        rows.extend(part)
    out = summarize_eval(rows, run.eval_k)
    for name, group in (scorers or {}).items():
        refs = [group.call_worker(i % group.workers, "score", shard) for i, shard in enumerate(rows.samples)]
        out[f"{name}_kl"] = sampled_kl(rows.samples, ray.get(refs))
    return {**out, "eval_s": time.perf_counter() - t0}


def resolve_target(target: str) -> tuple[str, str | None, int | None]:
    """(model directory, run config or None, checkpoint step or None) of `rayskd eval TARGET`:
    a Hugging Face model directory, or a run directory (its newest intact checkpoint's model;
    a finished run's final/ when it has no checkpoint left)."""
    import os

    from . import checkpoint
    from .preflight import UsageError

    if os.path.isfile(os.path.join(target, "config.json")):
        return target, None, None
    config = os.path.join(target, "config.yaml")
    if not os.path.isfile(config):
        raise UsageError(f"{target}: neither a model directory (config.json) nor a rayskd run directory "
                         f"(config.yaml)")
    found, _ = checkpoint.newest_intact(target)
    if found is not None:
        return os.path.join(found[1], "hf"), config, found[0]
    final = os.path.join(target, "final")
    if os.path.isfile(os.path.join(final, "config.json")):
        return final, config, None
    raise UsageError(f"{target}: the run has no intact checkpoint and no final/ model to evaluate yet")


def run_eval(target: str, data: str | None, ks: tuple[int, ...], samples: int, overrides: list[str],
             log=print) -> dict:
    """`rayskd eval`: the numbers of summarize_eval for the model at `target` on `data` (default:
    the run's eval split), on the run's rollout settings (or the defaults, for a model
    directory) and `overrides`, on rollout.num_workers vLLM engines."""
    import os

    import ray

    from .actors import actor_env, init_ray
    from .config import load_config
    from .preflight import UsageError, check_inputs
    from .rollout_pool import RolloutPool, start_rollout

    model, config, step = resolve_target(os.path.abspath(target))
    fixed = [f"student.path={model}", f"teacher.path={model}", f"run.eval_samples={samples}",
             f"run.eval_k=[{','.join(map(str, ks))}]"]
    if config is None and data is None:
        raise UsageError("--data FILE is needed to evaluate a model directory (a JSONL file of prompts and answers)")
    if data is not None:
        fixed += [f"data.eval_path={os.path.abspath(data)}", f"data.train_path={os.path.abspath(data)}"]
    cfg = load_config(config, [*overrides, *fixed])
    if cfg.data.eval_path is None:
        raise UsageError(f"{config} has no data.eval_path: give --data FILE")
    inputs = check_inputs(cfg, need_teacher=False, need_rehearsal=False, need_train=False)
    log(f"evaluating {model}" + (f" (step {step})" if step is not None else "") + f" on {cfg.data.eval_path}: "
        f"{len(inputs.eval)} problems, greedy and {samples} samples each")
    started = init_ray(cfg.rollout.num_workers * cfg.rollout.tensor_parallel_size)
    pool = None
    try:
        pool = RolloutPool(start_rollout(cfg, model, inputs.max_model_len, actor_env(cfg)), log, cfg.rollout.max_failures)
        return {"model": model, "step": step, "data": cfg.data.eval_path, **evaluate_on(pool, inputs.eval, cfg.run)}
    finally:
        if pool is not None:
            pool.shutdown()
        if started:
            ray.shutdown()
