"""DPH-RL presampling: sample the initial student before training, keep the prompts it
solves reliably, and store those responses with per-token reference log-probs
(`rayskd presample`)."""
from __future__ import annotations

import dataclasses
import json
import os

import torch

from .batch import prompt_batch
from .config import Config
from .rehearsal import meta_path, rehearsal_meta


def reference_teacher(cfg: Config):
    """The reference scorer's settings: the initial student, scored exactly as the learner will
    compute log pi_theta at step 0 (its dtype, the sampling temperature), on a learner's device."""
    meta = rehearsal_meta(cfg)
    return dataclasses.replace(cfg.teacher, path=cfg.student.path, num_workers=1, tensor_parallel_size=1, top_k=0,
                               dtype=meta["dtype"], temperature=meta["temperature"],
                               gpus_per_worker=cfg.learner.gpus_per_worker, resources=dict(cfg.learner.resources))


def presample(cfg: Config, max_prompts: int = 0, explore_out: str | None = None, log=print) -> dict:
    """Sample `presample_samples` responses per training prompt from the initial student on the
    rollout engines (rollout settings and workers), keep the correct responses of prompts solved
    at least `presample_min_correct` times, and write them with reference log-probs computed by
    a scorer of the initial student on a learner's device, in the learner's dtype and at the
    sampling temperature (so u = pi_theta / pi_ref = 1 at the start), recorded beside the data
    (`meta_path`). Optionally writes the other prompts (the exploration set) as training JSONL."""
    import ray

    from .actors import actor_env, init_ray, start_teachers
    from .batch import concat_shards, select_rows
    from .losses import solved
    from .preflight import check_inputs
    from .rollout_pool import RolloutPool, start_rollout

    reh, out_path = cfg.algorithm.rehearsal, cfg.algorithm.rehearsal.data_path
    if not out_path:
        from .preflight import UsageError

        raise UsageError("algorithm.rehearsal.data_path: set where the presampled data goes")
    inputs = check_inputs(cfg, need_teacher=False, need_rehearsal=False)  # it makes the rehearsal data
    data = inputs.train
    n = len(data) if not max_prompts else min(max_prompts, len(data))
    prompts = prompt_batch(data, list(range(n)))
    G = reh.presample_samples
    started = init_ray(cfg.rollout.num_workers * cfg.rollout.tensor_parallel_size + 1)
    pool = scorer = None
    try:
        env = actor_env(cfg)
        pool = RolloutPool(start_rollout(cfg, cfg.student.path, inputs.max_model_len, env), log, cfg.rollout.max_failures)
        parts = pool.split(prompts)
        shard = concat_shards(ray.get(pool.run("generate", parts, 0, False, G, what="presampling")))
        pool.shutdown()
        pool = None
        right = solved(shard.rewards_N)
        keep_prompt = right.reshape(-1, G).sum(1) >= reh.presample_min_correct
        keep = [i for i in range(shard.num_sequences) if keep_prompt[i // G] and right[i]]
        rows = []
        if keep:
            kept = select_rows(shard, torch.tensor(keep))
            scorer = start_teachers(dataclasses.replace(cfg, teacher=reference_teacher(cfg)), inputs.tokenizer_len, env)
            logp = ray.get(scorer.call_worker(0, "score", kept)).logp_NR
            for j, i in enumerate(keep):
                p, r = int(kept.prompt_len_N[j]), int(kept.response_len_N[j])
                rows.append({"uid": int(kept.uids_N[j]), "prompt_ids": kept.prompt_ids_NP[j, :p].tolist(),
                             "response_ids": kept.response_ids_NR[j, :r].tolist(), "ref_logp": logp[j, :r].tolist()})
    finally:
        if pool is not None:
            pool.shutdown()
        if scorer is not None:
            scorer.kill()
        if started:
            ray.shutdown()
    meta = rehearsal_meta(cfg)
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path + ".tmp", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(out_path + ".tmp", out_path)
    with open(meta_path(out_path), "w") as f:
        json.dump({**meta, "student": cfg.student.path, "samples": len(rows)}, f)
    report = {"prompts": n, "solved_reliably": int(keep_prompt.sum()), "samples_kept": len(rows), "path": out_path}
    if explore_out:
        with open(explore_out, "w") as f:
            for u in range(n):
                if not keep_prompt[u]:
                    f.write(json.dumps({cfg.data.prompt_key: data.rows[u]["prompt"],
                                        cfg.data.answer_key: data.rows[u]["answer"]}) + "\n")
        report["explore_path"] = explore_out
    log(f"[presample] {report['solved_reliably']}/{n} prompts solved >= {reh.presample_min_correct}/{G} times; "
        f"{len(rows)} samples written to {out_path}")
    return report
