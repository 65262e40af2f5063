#!/usr/bin/env python
"""Benchmark (not a test): rayskd against TRL 1.16 on the same work, one after another.

    python scripts/bench_peers.py [--settings demo,long,teacher_heavy] [--engines ...]
                                  [--teacher-dtypes bf16,fp32] [--rounds 2]

Engines: rayskd (the CLI: configs/demo.yaml, the demo's one learner rank, with the setting's
overrides and algorithm.max_staleness=1), rayskd_two_learners (the same with two learner
ranks: on a 2-core machine a second rank adds a gloo all-reduce and a process competing for
the same cores), rayskd_sequential (two ranks, strictly on-policy: how rayskd ran before the
pipeline), TRL's DistillationTrainer (on-policy, beta=1: reverse KL), GKDTrainer (lmbda=1:
on-policy, beta=1) and GRPOTrainer (no teacher), all with HF generate in one process. The
default engines are rayskd and the three TRL trainers.

Equal work: every engine gets the same student, teacher, prompts, sequences per update and new
tokens, and trains an update in one forward and backward pass (TRL: its whole per-device batch;
rayskd: each rank's share, and the teacher scores a request at once); in `long` and
`teacher_heavy` every response is exactly max_new_tokens long (rayskd: rollout.ignore_eos; TRL:
min_new_tokens). The student trains in fp32 everywhere (rayskd's learner and its vLLM engine on
CPU, TRL's model), and every engine with a teacher runs once per teacher precision
(--teacher-dtypes: rayskd's teacher.dtype, TRL's teacher loaded in that dtype), named
ENGINE@bf16 / ENGINE@fp32: ratios compare equal precisions, and each engine's bf16-vs-fp32 effect
is reported beside them.

Every engine runs --rounds times (default 2), in turn, every other round in reverse order (this
machine's speed drifts over minutes; each engine then sees both ends of the run); each round's
s/step is printed and kept, with the spread of the rounds. Per engine and setting: s_per_step
(the median over the measured steps after warm-up, then over the rounds), samples_per_s,
tokens_per_s (response tokens), startup_s (process start to the first update's start),
peak_mem_gib (the summed proportional set size of the engine's whole process tree: Ray's workers
and vLLM's engine core included) and, for rayskd, the per-phase split. Writes
benchmarks/peers.json and prints a table. Needs `trl` (a benchmark-only dependency, installed on
first use).
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
    # a >= 10M student, a teacher >= 4x its size, 128 new tokens per sequence (a step is 5-10 s,
    # GKD's over a minute: 5 measured steps)
    "long": dict(student=STUDENT_10M, teacher=TEACHER_4X, prompts=8, samples=4, max_new_tokens=128, forced=True,
                 warmup=2, measure=5),
    # a teacher >= 10x the student (a step is ~1 s: 12 measured steps)
    "teacher_heavy": dict(student=SMALL, teacher=TEACHER_10X, prompts=8, samples=4, max_new_tokens=128, forced=True,
                          warmup=2, measure=12),
}
# rayskd as configured here (generation overlapped with learning), and as it ran before the
# pipeline (strictly on-policy) for the before/after ratio in the same run
RAYSKD_VARIANTS = {
    "rayskd": ["algorithm.max_staleness=1", "learner.world_size=1"],
    "rayskd_two_learners": ["algorithm.max_staleness=1", "learner.world_size=2"],
    "rayskd_sequential": ["algorithm.max_staleness=0", "learner.world_size=2"],
}
ENGINES = (*RAYSKD_VARIANTS, "trl_distillation", "trl_gkd", "trl_grpo")
DEFAULT_ENGINES = ("rayskd", "trl_distillation", "trl_gkd", "trl_grpo")
TEACHERLESS = ("trl_grpo",)
TEACHER_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}  # --teacher-dtypes name: torch / rayskd dtype


def runs_of(engines: list[str], dtypes: list[str]) -> list[tuple[str, str, str | None]]:
    """(run name, engine, teacher dtype) of every run: an engine with a teacher once per dtype."""
    return [(engine, engine, None) if engine in TEACHERLESS else (f"{engine}@{d}", engine, d)
            for engine in engines for d in (dtypes if engine not in TEACHERLESS else [None])]
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


def bench_rayskd(run: str, variant: str, dtype: str, name: str, spec: dict, dirs: dict, work: str,
                 extra: list[str]) -> dict:
    from rayskd.metrics import PHASES

    out_dir = os.path.join(work, name, run)
    overrides = [*RAYSKD_VARIANTS[variant], f"teacher.dtype={TEACHER_DTYPES[dtype]}", *extra]
    cmd = [sys.executable, "-m", "rayskd", "train", "configs/demo.yaml", *rayskd_overrides(spec, dirs, out_dir),
           *overrides]
    rc, peak = run_measured(cmd, os.path.join(work, f"{name}-{run}.log"))
    if rc != 0:
        raise RuntimeError(f"{run} failed in setting {name}: see {work}/{name}-{run}.log")
    recs = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    measured = recs[spec["warmup"]:]
    s = statistics.median(r["step_s"] for r in measured)
    seqs = spec["prompts"] * spec["samples"]
    phases = {k: round(statistics.median(r[k] for r in measured), 4) for k, _ in PHASES}
    return {"s_per_step": s, "samples_per_s": seqs / s,
            "tokens_per_s": statistics.median(r["response_tokens"] for r in measured) / s,
            "startup_s": recs[0]["startup_s"], "peak_mem_gib": peak, "phases": phases, "overrides": overrides}


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


def trl_worker(engine: str, name: str, dtype: str | None, result_path: str) -> None:
    """Runs in its own process: one TRL trainer on the setting (its teacher in `dtype`), step
    times to `result_path`."""
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
    teacher = AutoModelForCausalLM.from_pretrained(dirs["teacher"], dtype=getattr(torch, TEACHER_DTYPES[dtype])) \
        if dtype else None
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


def bench_trl(run: str, engine: str, dtype: str | None, name: str, spec: dict, work: str) -> dict:
    result = os.path.join(work, f"{name}-{run}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--trl-worker", engine, "--settings", name, "--result", result,
           *(["--teacher-dtypes", dtype] if dtype else [])]
    rc, peak = run_measured(cmd, os.path.join(work, f"{name}-{run}.log"))
    if rc != 0:
        raise RuntimeError(f"{run} failed in setting {name}: see {work}/{name}-{run}.log")
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
    """An engine's result over the rounds: medians (peak memory: the highest), each round kept,
    and the rounds' spread (slowest / fastest - 1). This machine's speed drifts by tens of
    percent over minutes; rounds in alternating order put every engine at the early and the
    late end of the run."""
    med = lambda key: statistics.median(r[key] for r in rounds)  # noqa: E731
    s = med("s_per_step")
    per_round = [r["s_per_step"] for r in rounds]
    out = {"s_per_step": s, "samples_per_s": seqs / s,
           "tokens_per_s": med("tokens_per_s") if all(r.get("tokens_per_s") for r in rounds) else None,
           "startup_s": med("startup_s"), "peak_mem_gib": max(r["peak_mem_gib"] for r in rounds),
           "rounds_s_per_step": [round(x, 4) for x in per_round],
           "rounds_spread": round(max(per_round) / min(per_round) - 1, 3)}
    if "phases" in rounds[0]:
        out["phases"] = {k: round(statistics.median(r["phases"][k] for r in rounds), 4) for k in rounds[0]["phases"]}
        out["overrides"] = rounds[0]["overrides"]
    return out


def ratios(runs: dict, dtypes: list[str]) -> dict:
    """Equal-work ratios of a setting's runs: every rayskd variant against every TRL trainer at
    the same teacher precision (GRPOTrainer has no teacher: against it at every precision), as
    samples/s (> 1: rayskd is faster); and each engine's teacher-precision effect, s/step in
    fp32 / s/step in bf16."""
    vs = {}
    for variant in RAYSKD_VARIANTS:
        for d in dtypes:
            ours = runs.get(f"{variant}@{d}")
            if ours is None:
                continue
            peers = {e: runs[e] for e in TEACHERLESS if e in runs}
            peers.update({e.split("@")[0]: r for e, r in runs.items()
                          if e.endswith(f"@{d}") and e.split("@")[0] not in RAYSKD_VARIANTS})
            vs[f"{variant}@{d}"] = {e: round(ours["samples_per_s"] / r["samples_per_s"], 2) for e, r in peers.items()}
    effect = {}
    for engine in {run.split("@")[0] for run in runs if "@" in run}:
        if f"{engine}@bf16" in runs and f"{engine}@fp32" in runs:
            effect[engine] = round(runs[f"{engine}@fp32"]["s_per_step"] / runs[f"{engine}@bf16"]["s_per_step"], 2)
    return {"equal_precision": vs, "fp32_over_bf16_s_per_step": effect}


def machine() -> str:
    import psutil

    return (f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, no GPU")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default="demo,long,teacher_heavy")
    p.add_argument("--engines", default=",".join(DEFAULT_ENGINES), help=f"any of {', '.join(ENGINES)}")
    p.add_argument("--teacher-dtypes", default="bf16,fp32", help="the teacher precisions every teacher engine runs at")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "peers.json"))
    p.add_argument("--rayskd-override", action="append", default=[], help="extra rayskd config overrides")
    p.add_argument("--rounds", type=int, default=2, help="times each engine runs, in alternating order (default 2)")
    p.add_argument("--trl-worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    sys.path.insert(0, ROOT)
    if args.trl_worker:
        trl_worker(args.trl_worker, args.settings, args.teacher_dtypes if args.teacher_dtypes in TEACHER_DTYPES
                   else None, args.result)
        return 0
    settings, engines, dtypes = args.settings.split(","), args.engines.split(","), args.teacher_dtypes.split(",")
    bad = [s for s in settings if s not in SETTINGS] + [e for e in engines if e not in ENGINES] + \
        [d for d in dtypes if d not in TEACHER_DTYPES]
    if bad:
        print(f"bench_peers: unknown setting, engine or teacher dtype {bad}; settings: {list(SETTINGS)}, engines: "
              f"{list(ENGINES)}, teacher dtypes: {list(TEACHER_DTYPES)}", file=sys.stderr)
        return 2
    if any(e.startswith("trl") for e in engines):
        ensure_trl()
    if not os.path.isfile(os.path.join(ROOT, "demo_assets", "report.json")):
        subprocess.run([sys.executable, "-m", "rayskd", "prepare-demo", "--out", "demo_assets"], cwd=ROOT, check=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = os.path.join(ROOT, "runs", f"bench-peers-{stamp}")
    os.makedirs(work, exist_ok=True)
    runs = runs_of(engines, dtypes)
    results = {}
    for name in settings:
        spec = SETTINGS[name]
        dirs = model_dirs(name, spec)
        results[name] = {"spec": {**{k: v for k, v in spec.items() if k not in ("student", "teacher")},
                                  "student_params": param_count(dirs["student"]),
                                  "teacher_params": param_count(dirs["teacher"])}, "engines": {}}
        rounds: dict[str, list[dict]] = {run: [] for run, _, _ in runs}
        for round_ in range(args.rounds):  # runs in turn, every other round in reverse order
            for run, engine, dtype in runs if round_ % 2 == 0 else runs[::-1]:
                print(f"[bench] {name}: {run} (round {round_ + 1}/{args.rounds})", flush=True)
                round_dir = os.path.join(work, f"round{round_ + 1}")
                os.makedirs(round_dir, exist_ok=True)
                r = bench_rayskd(run, engine, dtype, name, spec, dirs, round_dir, args.rayskd_override) \
                    if engine in RAYSKD_VARIANTS else bench_trl(run, engine, dtype, name, spec, round_dir)
                rounds[run].append(r)
                print(f"[bench] {name}: {run} round {round_ + 1}: {r['s_per_step']:.3f} s/step, "
                      f"{r['samples_per_s']:.0f} samples/s, startup {r['startup_s']:.1f} s", flush=True)
        for run, _, _ in runs:
            results[name]["engines"][run] = combine(rounds[run], spec["prompts"] * spec["samples"])
        results[name].update(ratios(results[name]["engines"], dtypes))
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
             f"{'setting':<14}{'engine':<24}{'s/step':>8}{'rounds':>16}{'samples/s':>11}{'tokens/s':>10}"
             f"{'startup s':>11}{'peak GiB':>10}"]
    for name, r in report["settings"].items():
        for run, e in r["engines"].items():
            tps = f"{e['tokens_per_s']:.0f}" if e.get("tokens_per_s") else "-"
            per_round = "/".join(f"{x:.3f}" for x in e.get("rounds_s_per_step", []))
            lines.append(f"{name:<14}{run:<24}{e['s_per_step']:>8.3f}{per_round:>16}{e['samples_per_s']:>11.0f}"
                         f"{tps:>10}{e['startup_s']:>11.1f}{e['peak_mem_gib']:>10.2f}")
    for name, r in report["settings"].items():
        for run, vs in r.get("equal_precision", {}).items():
            lines.append(f"{name}: {run} is " + ", ".join(f"{x}x {e}" for e, x in vs.items()))
        if r.get("fp32_over_bf16_s_per_step"):
            lines.append(f"{name}: fp32 teacher / bf16 teacher, s/step: " +
                         ", ".join(f"{e} {x}" for e, x in sorted(r["fp32_over_bf16_s_per_step"].items())))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
