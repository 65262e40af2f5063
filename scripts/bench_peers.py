#!/usr/bin/env python
"""Benchmark (not a test): rayskd against TRL 1.16 on the same work, one after another.

    python scripts/bench_peers.py [--settings demo,long,teacher_heavy] [--engines ...]

Engines: rayskd (the CLI: configs/demo.yaml, the demo's one learner rank, with the setting's
overrides and algorithm.max_staleness=1), rayskd_two_learners (the same with two learner
ranks: on a 2-core machine a second rank adds a gloo all-reduce and a process competing for
the same cores), rayskd_sequential (two ranks, strictly on-policy with an fp32 teacher: how
rayskd ran before the pipeline), TRL's DistillationTrainer (on-policy, beta=1: reverse KL),
GKDTrainer (lmbda=1: on-policy, beta=1) and GRPOTrainer (no teacher), all with HF generate in
one process, fp32 on CPU. Every engine gets the same student, teacher, prompts, sequences per
update and new tokens, and trains an update in one forward and backward pass (TRL: its whole
per-device batch; rayskd: each rank's share, and the teacher scores a request at once); in
`long` and `teacher_heavy` every response is exactly max_new_tokens long (rayskd:
rollout.ignore_eos; TRL: min_new_tokens).

Every engine runs --rounds times (default 2), in turn, every other round in reverse order (this
machine's speed drifts over minutes; each engine then sees both ends of the run). Per engine
and setting: s_per_step (the median over the measured steps after warm-up, then over the
rounds; each round's is kept), samples_per_s, tokens_per_s (response tokens), startup_s
(process start to the first update's start), peak_mem_gib (the summed proportional set size of the engine's whole
process tree: Ray's workers and vLLM's engine core included) and, for rayskd, the per-phase
split. Writes benchmarks/peers.json and prints a table. Needs `trl` (a benchmark-only
dependency, installed on first use).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "bench_assets")
TRL_VERSION = "1.16.0"

# Qwen2 shapes over the demo's 13-token vocabulary (head size 64: vLLM's CPU attention needs it)
SMALL = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, intermediate_size=512, num_hidden_layers=4)
STUDENT_10M = dict(hidden_size=384, num_attention_heads=6, num_key_value_heads=6, intermediate_size=1536,
                   num_hidden_layers=5)
TEACHER_4X = dict(hidden_size=768, num_attention_heads=12, num_key_value_heads=12, intermediate_size=2048,
                  num_hidden_layers=7)
TEACHER_10X = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=8, intermediate_size=1536,
                   num_hidden_layers=3)

SETTINGS = {
    # the demo as configs/demo.yaml runs it: 32 prompts x 8 samples, natural lengths (<= 6)
    "demo": dict(student="demo", teacher="demo", prompts=32, samples=8, max_new_tokens=6, forced=False,
                 warmup=3, measure=30),
    # a >= 10M student, a teacher >= 4x its size, 128 new tokens per sequence
    "long": dict(student=STUDENT_10M, teacher=TEACHER_4X, prompts=8, samples=4, max_new_tokens=128, forced=True,
                 warmup=2, measure=3),
    # a teacher >= 10x the student
    "teacher_heavy": dict(student=SMALL, teacher=TEACHER_10X, prompts=8, samples=4, max_new_tokens=128, forced=True,
                          warmup=2, measure=3),
}
# rayskd as configured here (generation overlapped with learning), and as it ran before the
# pipeline (strictly on-policy, fp32 teacher) for the before/after ratio in the same run
RAYSKD_VARIANTS = {
    "rayskd": ["algorithm.max_staleness=1", "learner.world_size=1"],
    "rayskd_two_learners": ["algorithm.max_staleness=1", "learner.world_size=2"],
    "rayskd_sequential": ["algorithm.max_staleness=0", "teacher.dtype=float32", "learner.world_size=2"],
}
ENGINES = (*RAYSKD_VARIANTS, "trl_distillation", "trl_gkd", "trl_grpo")
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # GKD needs one; adds nothing


# ---- assets -------------------------------------------------------------------------------

def model_dirs(name: str, spec: dict) -> dict:
    """Student and teacher directories of a setting (built once, cached in bench_assets/)."""
    import torch
    from transformers import AutoTokenizer

    from rayskd.data.demo import make_model, pinned_numerics

    out = {}
    for role in ("student", "teacher"):
        arch = spec[role]
        path = os.path.join(ASSETS, name, role)
        out[role] = path
        if os.path.isfile(os.path.join(path, "model.safetensors")):
            continue
        src = os.path.join(ROOT, "demo_assets", role)
        tok = AutoTokenizer.from_pretrained(src)
        tok.chat_template = CHAT_TEMPLATE
        if arch == "demo":
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        else:
            with pinned_numerics():
                model = make_model(arch, len(tok), tok.eos_token_id, seed=1 if role == "teacher" else 2)
            model.config.max_position_embeddings = 256
        tmp = path + ".tmp"
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, path)
    return out


def param_count(path: str) -> int:
    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


# ---- measuring a process tree --------------------------------------------------------------

def pss_bytes(pid: int) -> int:
    """Proportional set size from /proc/PID/smaps_rollup (shared pages split between their
    users, so a tree's sum is its real footprint; far cheaper than parsing smaps)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str], log_path: str, env: dict | None = None) -> tuple[int, float]:
    """Run `cmd`, sampling the summed PSS of its process tree; returns (exit code, peak GiB)."""
    import psutil

    peak = [0]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})})
        done = threading.Event()

        def sample():
            root = psutil.Process(proc.pid)
            while not done.is_set():
                total = 0
                try:
                    procs = [root, *root.children(recursive=True)]
                except psutil.NoSuchProcess:
                    break
                for p in procs:
                    total += pss_bytes(p.pid)
                peak[0] = max(peak[0], total)
                done.wait(1.0)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        rc = proc.wait()
        done.set()
        t.join()
    return rc, peak[0] / 2**30


# ---- rayskd -----------------------------------------------------------------------------

def rayskd_overrides(spec: dict, dirs: dict, out_dir: str) -> list[str]:
    """The setting as rayskd config overrides (the variant adds its learner count). Like TRL (one
    forward and backward over its whole per-device batch), each learner rank trains its share in
    one micro-batch (micro_batch_size is a most) and the teacher scores a request in one batch."""
    seqs = spec["prompts"] * spec["samples"]
    return [
        f"run.output_dir={out_dir}", f"run.steps={spec['warmup'] + spec['measure']}", "run.eval_every=0",
        "data.eval_path=null", f"student.path={dirs['student']}", f"teacher.path={dirs['teacher']}",
        f"rollout.samples_per_prompt={spec['samples']}", f"rollout.max_new_tokens={spec['max_new_tokens']}",
        f"rollout.ignore_eos={str(spec['forced']).lower()}", f"algorithm.prompts_per_step={spec['prompts']}",
        f"learner.micro_batch_size={seqs}", f"teacher.micro_batch_size={seqs}",
    ]


def bench_rayskd(variant: str, name: str, spec: dict, dirs: dict, work: str, extra: list[str]) -> dict:
    out_dir = os.path.join(work, name, variant)
    cmd = [sys.executable, "-m", "rayskd", "train", "configs/demo.yaml", *rayskd_overrides(spec, dirs, out_dir),
           *RAYSKD_VARIANTS[variant], *extra]
    rc, peak = run_measured(cmd, os.path.join(work, f"{name}-{variant}.log"))
    if rc != 0:
        raise RuntimeError(f"{variant} failed in setting {name}: see {work}/{name}-{variant}.log")
    recs = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    measured = recs[spec["warmup"]:]
    s = statistics.median(r["step_s"] for r in measured)
    seqs = spec["prompts"] * spec["samples"]
    phases = {k: round(statistics.median(r[k] for r in measured), 4)
              for k in ("generate_s", "score_s", "train_s", "sync_s", "wait_s") if k in measured[0]}
    return {"s_per_step": s, "samples_per_s": seqs / s,
            "tokens_per_s": statistics.median(r["response_tokens"] for r in measured) / s,
            "startup_s": recs[0]["startup_s"], "peak_mem_gib": peak, "phases": phases,
            "overrides": RAYSKD_VARIANTS[variant] + extra}


# ---- TRL --------------------------------------------------------------------------------

def ensure_trl() -> None:
    try:
        import trl  # noqa: F401

        if trl.__version__ == TRL_VERSION:
            return
    except ImportError:
        pass
    print(f"[bench] installing trl=={TRL_VERSION} (benchmark-only dependency)", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    f"trl=={TRL_VERSION}"], check=True)


def trl_worker(engine: str, name: str, result_path: str) -> None:
    """Runs in its own process: one TRL trainer on the setting, step times to `result_path`."""
    t_start = time.time()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    spec = SETTINGS[name]
    dirs = model_dirs(name, spec)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(dirs["student"])
    student = AutoModelForCausalLM.from_pretrained(dirs["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(dirs["teacher"], dtype=torch.float32)
    rows = [json.loads(line) for line in open(os.path.join(ROOT, "demo_assets", "train.jsonl"))]
    seqs, new = spec["prompts"] * spec["samples"], spec["max_new_tokens"]
    forced = {"min_new_tokens": new} if spec["forced"] else {}
    steps = spec["warmup"] + spec["measure"]
    generated = []  # response tokens of each generate call (up to and including the first EOS)

    original_generate = student.generate

    def counting_generate(*args, **kwargs):
        out = original_generate(*args, **kwargs)
        ids = out.sequences if hasattr(out, "sequences") else out
        prompt_len = (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[1]
        resp = ids[:, prompt_len:]
        is_eos = resp == tok.eos_token_id
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full_like(is_eos[:, 0], resp.shape[1],
                                                                                        dtype=torch.long))
        generated.append(int(first.sum()))
        return out

    student.generate = counting_generate
    times, starts = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            starts.append(time.perf_counter())
            if len(starts) == 1:
                starts_wall.append(time.time())

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - starts[-1])

    starts_wall: list[float] = []
    common = dict(output_dir=os.path.join(ASSETS, "trl_out", engine), max_steps=steps, learning_rate=3e-4,
                  use_cpu=True, report_to=[], save_strategy="no", logging_steps=10**6, disable_tqdm=True, seed=0,
                  gradient_accumulation_steps=1, lr_scheduler_type="constant", bf16=False)
    if engine == "trl_distillation":
        from trl import DistillationConfig, DistillationTrainer

        data = Dataset.from_list([{"prompt": r["prompt"]} for r in rows])
        args = DistillationConfig(per_device_train_batch_size=seqs, max_completion_length=new, beta=1.0,
                                  temperature=1.0, use_vllm=False, generation_kwargs=forced or None, **common)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                      processing_class=tok, callbacks=[Timer()])
    elif engine == "trl_gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        data = Dataset.from_list([{"messages": [{"role": "user", "content": r["prompt"]},
                                                {"role": "assistant", "content": r["answer"]}]} for r in rows])
        args = GKDConfig(per_device_train_batch_size=seqs, max_new_tokens=new, lmbda=1.0, beta=1.0, temperature=1.0,
                         **common)
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                             processing_class=tok, callbacks=[Timer()])
        for key, value in forced.items():
            setattr(trainer.generation_config, key, value)
    elif engine == "trl_grpo":
        from trl import GRPOConfig, GRPOTrainer

        def exact_match(completions, answer, **kw):
            return [float(c.strip() == a) for c, a in zip(completions, answer)]

        data = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
        args = GRPOConfig(per_device_train_batch_size=seqs, num_generations=spec["samples"],
                          max_completion_length=new, beta=0.0, temperature=1.0, use_vllm=False,
                          generation_kwargs=forced or None, **common)
        trainer = GRPOTrainer(model=student, reward_funcs=exact_match, args=args, train_dataset=data,
                              processing_class=tok, callbacks=[Timer()])
    else:
        raise SystemExit(f"unknown engine {engine}")
    trainer.train()
    with open(result_path, "w") as f:
        json.dump({"times": times, "generated": generated, "startup_s": starts_wall[0] - t_start,
                   "process_start": t_start}, f)


def bench_trl(engine: str, name: str, spec: dict, work: str) -> dict:
    result = os.path.join(work, f"{name}-{engine}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--trl-worker", engine, "--settings", name, "--result", result]
    rc, peak = run_measured(cmd, os.path.join(work, f"{name}-{engine}.log"))
    if rc != 0:
        raise RuntimeError(f"{engine} failed in setting {name}: see {work}/{name}-{engine}.log")
    r = json.load(open(result))
    w = spec["warmup"]
    s = statistics.median(r["times"][w:])
    seqs = spec["prompts"] * spec["samples"]
    # GRPO generates once per update; the distillation trainers once per update too
    tokens = statistics.median(r["generated"][w:]) if len(r["generated"]) > w else None
    return {"s_per_step": s, "samples_per_s": seqs / s, "tokens_per_s": tokens / s if tokens else None,
            "startup_s": r["startup_s"], "peak_mem_gib": peak}


# ---- driver -----------------------------------------------------------------------------

def combine(rounds: list[dict], seqs: int) -> dict:
    """An engine's result over the rounds: medians (peak memory: the highest), each round kept.
    This machine's speed drifts by tens of percent over minutes; rounds in alternating order put
    every engine at the early and the late end of the run."""
    med = lambda key: statistics.median(r[key] for r in rounds)  # noqa: E731
    s = med("s_per_step")
    out = {"s_per_step": s, "samples_per_s": seqs / s,
           "tokens_per_s": med("tokens_per_s") if all(r.get("tokens_per_s") for r in rounds) else None,
           "startup_s": med("startup_s"), "peak_mem_gib": max(r["peak_mem_gib"] for r in rounds),
           "rounds_s_per_step": [round(r["s_per_step"], 4) for r in rounds]}
    if "phases" in rounds[0]:
        out["phases"] = {k: round(statistics.median(r["phases"][k] for r in rounds), 4) for k in rounds[0]["phases"]}
        out["overrides"] = rounds[0]["overrides"]
    return out


def machine() -> str:
    import psutil

    return (f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, no GPU")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default="demo,long,teacher_heavy")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "peers.json"))
    p.add_argument("--rayskd-override", action="append", default=[], help="extra rayskd config overrides")
    p.add_argument("--rounds", type=int, default=2, help="times each engine runs, in alternating order (default 2)")
    p.add_argument("--trl-worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    sys.path.insert(0, ROOT)
    if args.trl_worker:
        trl_worker(args.trl_worker, args.settings, args.result)
        return 0
    settings, engines = args.settings.split(","), args.engines.split(",")
    bad = [s for s in settings if s not in SETTINGS] + [e for e in engines if e not in ENGINES]
    if bad:
        print(f"bench_peers: unknown setting or engine {bad}; settings: {list(SETTINGS)}, engines: {list(ENGINES)}",
              file=sys.stderr)
        return 2
    if any(e.startswith("trl") for e in engines):
        ensure_trl()
    if not os.path.isfile(os.path.join(ROOT, "demo_assets", "report.json")):
        subprocess.run([sys.executable, "-m", "rayskd", "prepare-demo", "--out", "demo_assets"], cwd=ROOT, check=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = os.path.join(ROOT, "runs", f"bench-peers-{stamp}")
    os.makedirs(work, exist_ok=True)
    results = {}
    for name in settings:
        spec = SETTINGS[name]
        dirs = model_dirs(name, spec)
        results[name] = {"spec": {**{k: v for k, v in spec.items() if k not in ("student", "teacher")},
                                  "student_params": param_count(dirs["student"]),
                                  "teacher_params": param_count(dirs["teacher"])}, "engines": {}}
        rounds: dict[str, list[dict]] = {e: [] for e in engines}
        for round_ in range(args.rounds):  # engines in turn, every other round in reverse order
            for engine in engines if round_ % 2 == 0 else engines[::-1]:
                print(f"[bench] {name}: {engine} (round {round_ + 1}/{args.rounds})", flush=True)
                round_dir = os.path.join(work, f"round{round_ + 1}")
                os.makedirs(round_dir, exist_ok=True)
                r = bench_rayskd(engine, name, spec, dirs, round_dir, args.rayskd_override) \
                    if engine in RAYSKD_VARIANTS else bench_trl(engine, name, spec, round_dir)
                rounds[engine].append(r)
                print(f"[bench] {name}: {engine}: {r['s_per_step']:.3f} s/step, {r['samples_per_s']:.0f} samples/s, "
                      f"startup {r['startup_s']:.1f} s", flush=True)
        for engine in engines:
            results[name]["engines"][engine] = combine(rounds[engine], spec["prompts"] * spec["samples"])
        engines_run = results[name]["engines"]
        trl = {e: r for e, r in engines_run.items() if e not in RAYSKD_VARIANTS}
        if "rayskd" in engines_run:
            ours = engines_run["rayskd"]["samples_per_s"]
            results[name]["rayskd_vs"] = {e: round(ours / r["samples_per_s"], 2) for e, r in engines_run.items()
                                          if e != "rayskd"}
        # every rayskd variant against every TRL trainer, side by side from this one run
        results[name]["variant_vs_trl"] = {v: {e: round(engines_run[v]["samples_per_s"] / r["samples_per_s"], 2)
                                               for e, r in trl.items()}
                                           for v in RAYSKD_VARIANTS if v in engines_run}
    report = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "trl": TRL_VERSION,
              "command": " ".join(["python", "scripts/bench_peers.py", *sys.argv[1:]]), "settings": results}
    if os.path.exists(args.out) and set(settings) != set(SETTINGS):  # a partial run keeps the other settings
        old = json.load(open(args.out))
        report["settings"] = {**old.get("settings", {}), **results}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(table(report))
    return 0


def table(report: dict) -> str:
    lines = [f"{report['date']}, {report['machine']}, TRL {report['trl']}",
             f"{'setting':<14}{'engine':<18}{'s/step':>8}{'samples/s':>11}{'tokens/s':>10}{'startup s':>11}"
             f"{'peak GiB':>10}  rayskd is"]
    for name, r in report["settings"].items():
        for engine, e in r["engines"].items():
            ratio = r.get("rayskd_vs", {}).get(engine)
            tps = f"{e['tokens_per_s']:.0f}" if e.get("tokens_per_s") else "-"
            lines.append(f"{name:<14}{engine:<18}{e['s_per_step']:>8.3f}{e['samples_per_s']:>11.0f}{tps:>10}"
                         f"{e['startup_s']:>11.1f}{e['peak_mem_gib']:>10.2f}  {f'{ratio}x' if ratio else ''}")
    for name, r in report["settings"].items():
        for variant, ratios in r.get("variant_vs_trl", {}).items():
            lines.append(f"{name}: {variant} vs " + ", ".join(f"{e} {x}x" for e, x in ratios.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
