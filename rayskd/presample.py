"""DPH-RL presampling: sample the initial student before training, keep the prompts it
solves reliably, and store those responses with per-token reference log-probs
(`rayskd presample`)."""
from __future__ import annotations

import json
import os

import torch

from .batch import prompt_batch
from .config import Config
from .rehearsal import meta_path, rehearsal_meta


def presample(cfg: Config, max_prompts: int = 0, explore_out: str | None = None, log=print) -> dict:
    """Sample `presample_samples` responses per training prompt from the initial student
    (rollout sampling settings), keep the correct responses of prompts solved at least
    `presample_min_correct` times, and write them with reference log-probs computed by the
    learner's forward pass at the sampling temperature and in the learner's dtype (so
    u = pi_theta / pi_ref = 1 at the start), recorded beside the data (`meta_path`).
    Optionally writes the other prompts (the exploration set) as training JSONL."""
    from .modeling import SCORING_CHUNK, load_causal_lm, response_logprobs, vocab_limit
    from .preflight import check_inputs
    from .rollout import RolloutEngine

    reh, out_path = cfg.algorithm.rehearsal, cfg.algorithm.rehearsal.data_path
    if not out_path:
        from .preflight import UsageError

        raise UsageError("algorithm.rehearsal.data_path: set where the presampled data goes")
    inputs = check_inputs(cfg, need_teacher=False, need_rehearsal=False)  # it makes the rehearsal data
    data = inputs.train
    n = len(data) if not max_prompts else min(max_prompts, len(data))
    prompts = prompt_batch(data, list(range(n)))
    engine = RolloutEngine(cfg.student.path, cfg.rollout, cfg.reward, cfg.run.seed, inputs.max_model_len,
                           (os.getcwd(),))
    try:
        shard = engine.generate(prompts, step=0, n=reh.presample_samples)
    finally:
        engine.shutdown()
    G = reh.presample_samples
    solved = (shard.rewards_N.reshape(-1, G) > 0).sum(1)
    keep_prompt = solved >= reh.presample_min_correct
    keep = [i for i in range(shard.num_sequences) if keep_prompt[i // G] and shard.rewards_N[i] > 0]
    meta = rehearsal_meta(cfg)
    model = load_causal_lm(cfg.student.path, getattr(torch, meta["dtype"])).eval()
    rows = []
    with torch.no_grad():
        for s in range(0, len(keep), 64):
            idx = torch.tensor(keep[s:s + 64])
            fields = (shard.prompt_ids_NP[idx], shard.prompt_len_N[idx], shard.response_ids_NR[idx],
                      shard.response_len_N[idx])
            logp = response_logprobs(model, fields, cfg.rollout.temperature, SCORING_CHUNK, vocab_limit(inputs.tokenizer_len, model),
                                     "cpu")
            for j, i in enumerate(idx.tolist()):
                p, r = int(shard.prompt_len_N[i]), int(shard.response_len_N[i])
                rows.append({"uid": int(shard.uids_N[i]), "prompt_ids": shard.prompt_ids_NP[i, :p].tolist(),
                             "response_ids": shard.response_ids_NR[i, :r].tolist(), "ref_logp": logp[j, :r].tolist()})
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
