"""Benchmark (not a test): the training methods side by side on a built-in demo task, at the
same budget (the task's config: steps, prompts, samples, learning rate), each with several
seeds, one after another on this machine, in this process (rayskd.sweep: the runs of a seed
share the actors, which start once per seed; each run is the one `rayskd train` makes of its
config, tests/test_sweep.py). Every run of a seed starts from the same student with the same
sampling seed, so the seed's first run alone evaluates it before step 1 (run.eval_before).

    ./scripts/compare_demo.sh --task split --seeds 3      # or: python scripts/compare_demo.py ...
    ./scripts/compare_demo.sh --task gaps --seeds 3       # the eleven methods first below (~37 min)
    ./scripts/compare_demo.sh --task gaps --seeds 3 --methods kdrl_js,skew_fkl,skew_rkl,gkd_teacher,seqkd,minillm_mix \
        --out benchmarks/compare_gaps_more.json          # the others that apply (~23 min)

Methods (overrides of the task's config; nothing else differs):
  grpo              GRPO only                                algorithm.kd.coef=0
  distill_rkl       on-policy distillation only, reverse KL  algorithm.pg_coef=0
  kdrl              KDRL: GRPO + k2 reverse KL to the teacher (the config as it is)
  kdrl_anneal_mask  KDRL, the coefficient annealed linearly from kd.coef to a tenth of it
                    over the run, the teacher term on failed responses only (incorrect_only)
  dph_fkl           GRPO + DPH-RL rehearsal, forward KL to the initial student (coef 0.05)
  dph_js            GRPO + DPH-RL rehearsal, Jensen-Shannon (coef 0.2)
  kdrl_fkl          GRPO + forward KL on the teacher's top-8 (+ tail), at kd.coef
  gkd_jsd           distillation only: GKD's generalised JSD, beta 0.5, on the top-8 (on-policy)
  taid              distillation only: TAID on the top-8 (its defaults: t 0.4 -> 1)
  minillm           distillation only: MiniLLM's sequence-level reverse KL (gamma 0.95, length norm)
  skd               distillation only: speculative KD, top-2, blocks of 2, forward KL on the top-8
The methods table's other objectives that apply to a one-teacher task, when asked for (--methods;
each as its row in the README's methods table, at kd.coef):
  kdrl_js           GRPO + Jensen-Shannon to the teacher on its top-8
  skew_fkl          GRPO + skew forward KL (skew 0.1) on the top-8 (DistiLLM's objective)
  skew_rkl          GRPO + skew reverse KL (skew 0.1) on the top-8
  gkd_teacher       GKD: half the prompts' sequences the teacher's own samples (its vLLM engine),
                    generalised JSD (beta 0.5) on the top-8 on all, GRPO on the student's
  seqkd             sequence-level KD: the teacher's samples only, forward KL on the top-8
  minillm_mix       MiniLLM with teacher-mixed sampling (alpha 0.2)
The rehearsal coefficients are the top of DPH-RL's reported ranges (forward KL 0.01-0.05,
JS 0.05-0.2). Its data (`rayskd presample`, once, seed 0, the first --presample-prompts
training prompts): the initial student's correct responses among 8 per prompt, kept for
prompts it solved at least --min-correct times. DPH-RL keeps prompts solved 8 of 8 times;
the split student solves almost none that reliably (its sampled rewards are sparse by
design: of 4000 prompts, 27 are solved 4 or more times of 8, none 8 of 8), so the default
here keeps every correct response: the rehearsal covers all the initial student could solve.

Writes benchmarks/compare_TASK.json: the initial student's held-out pass@k, and per method
the final pass@k of each seed, mean and spread (max - min) by step with the training seconds
to reach it, each seed's pass@1 curve, pass@1 at equal wall-clock (the fastest method's
training seconds), and training seconds (for split and gaps also how each final model uses the
task's facts: rayskd.data.demo_split / demo_gaps .fact_usage); and benchmarks/compare_TASK.png
(`rayskd report`, seeds drawn as a band). `--from runs/compare-TASK-STAMP` summarises runs
already made.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"arith": "configs/demo.yaml", "split": "configs/demo_split.yaml", "gaps": "configs/demo_gaps.yaml"}
ASSETS = {"arith": "demo_assets", "split": "demo_assets_split", "gaps": "demo_assets_gaps"}
METHODS = ("grpo", "distill_rkl", "kdrl", "kdrl_anneal_mask", "dph_fkl", "dph_js")
# the methods table's other objectives on the student's own samples (the gaps comparison runs
# them too; their coefficients are the table's, fixed before any run), those whose teacher sends
# its top-k last (runs in a row share a teacher when they ask the same of it)
MORE_METHODS = ("minillm", "kdrl_fkl", "gkd_jsd", "taid", "skd")
DEFAULT_METHODS = {"arith": METHODS, "split": METHODS, "gaps": METHODS + MORE_METHODS}
# the rest of the table's objectives that apply to one teacher and no reference responses (the
# teacher's own samples, the teacher in the sampling loop, the other divergences on its top-k)
OTHER_METHODS = ("kdrl_js", "skew_fkl", "skew_rkl", "gkd_teacher", "seqkd", "minillm_mix")
LABELS = {"grpo": "GRPO only", "distill_rkl": "distillation only (reverse KL)", "kdrl": "KDRL (GRPO + k2 reverse KL)",
          "kdrl_anneal_mask": "KDRL, annealed + reward-guided mask", "dph_fkl": "GRPO + DPH-RL forward KL",
          "dph_js": "GRPO + DPH-RL JS", "kdrl_fkl": "GRPO + forward KL on the teacher's top-8",
          "gkd_jsd": "GKD: distillation only, generalised JSD (beta 0.5) on the top-8",
          "taid": "TAID: distillation only, on the top-8", "minillm": "MiniLLM: distillation only, sequence-level",
          "skd": "speculative KD: distillation only, forward KL on the top-8",
          "kdrl_js": "GRPO + Jensen-Shannon on the teacher's top-8", "skew_fkl": "GRPO + skew forward KL (0.1), top-8",
          "skew_rkl": "GRPO + skew reverse KL (0.1), top-8",
          "gkd_teacher": "GKD on the teacher's samples (lambda 0.5), generalised JSD, top-8",
          "seqkd": "sequence-level KD: the teacher's samples, forward KL, top-8",
          "minillm_mix": "MiniLLM, teacher-mixed sampling (alpha 0.2)"}
KEYS = ("greedy_accuracy", "pass@1", "pass@4", "pass@8", "pass@16", "pass@64", "distinct_right")


def overrides(method: str, steps: int, coef: float, rehearsal_data: str) -> list[str]:
    rehearsal = [f"algorithm.rehearsal.data_path={rehearsal_data}", "algorithm.kd.coef=0"]
    return {
        "grpo": ["algorithm.kd.coef=0"],
        "distill_rkl": ["algorithm.pg_coef=0"],
        "kdrl": [],
        "kdrl_anneal_mask": ["algorithm.kd.schedule=linear", f"algorithm.kd.coef_min={coef / 10}",
                             f"algorithm.kd.decay={0.9 * coef / steps}", "algorithm.kd.mask=incorrect_only"],
        "dph_fkl": [*rehearsal, "algorithm.rehearsal.divergence=forward_kl", "algorithm.rehearsal.coef=0.05"],
        "dph_js": [*rehearsal, "algorithm.rehearsal.divergence=js", "algorithm.rehearsal.coef=0.2"],
        "kdrl_fkl": [*TOPK, "algorithm.kd.divergence=forward_kl"],
        "gkd_jsd": ["algorithm.pg_coef=0", *TOPK, "algorithm.kd.divergence=generalized_jsd", "algorithm.kd.beta=0.5"],
        "taid": ["algorithm.pg_coef=0", *TOPK, "algorithm.kd.divergence=taid"],
        "minillm": ["algorithm.pg_coef=0", "algorithm.kd.estimator=minillm"],
        "skd": ["algorithm.pg_coef=0", *TOPK, "algorithm.kd.divergence=forward_kl", "algorithm.skd.top_k=2",
                "algorithm.skd.block=2"],
        "kdrl_js": [*TOPK, "algorithm.kd.divergence=js"],
        "skew_fkl": [*TOPK, "algorithm.kd.divergence=skew_forward_kl", "algorithm.kd.skew=0.1"],
        "skew_rkl": [*TOPK, "algorithm.kd.divergence=skew_reverse_kl", "algorithm.kd.skew=0.1"],
        "gkd_teacher": [*TEACHER_SAMPLES, "algorithm.gkd.lmbda=0.5", "algorithm.kd.divergence=generalized_jsd",
                        "algorithm.kd.beta=0.5"],
        "seqkd": [*TEACHER_SAMPLES, "algorithm.gkd.lmbda=0", "algorithm.kd.divergence=forward_kl"],
        "minillm_mix": ["algorithm.kd.estimator=minillm", "algorithm.kd.minillm.mix_alpha=0.2"],
    }[method]


TOPK = ("algorithm.kd.estimator=topk", "teacher.top_k=8")
TEACHER_SAMPLES = ("algorithm.gkd.off_policy=teacher", "teacher.generation.num_workers=1", *TOPK)


def rayskd(*args: str, quiet: bool = False) -> None:
    cmd = [sys.executable, "-m", "rayskd", *args]
    print("$ rayskd " + " ".join(args), flush=True)
    out = subprocess.run(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in out.stdout.splitlines():
        if not quiet or "[presample]" in line:
            print("   " + line, flush=True)
    if out.returncode != 0:
        print(out.stdout[-3000:], file=sys.stderr)
        raise SystemExit(f"rayskd {args[0]} failed with exit status {out.returncode}")


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def with_initial(evals: list[dict], initial: dict) -> list[dict]:
    """A run's evaluations, the seed's evaluation of the initial student first where the run
    made none of its own (run.eval_before=false: the same model, seed and samples)."""
    return evals if evals and evals[0]["step"] == 0 else [initial, *evals]


def summarize(run_dirs: list[str], initial: list[dict]) -> dict:
    """One method over its seeds (`initial`: each seed's step-0 evaluation): final numbers per
    seed, mean and spread by step."""
    evals = [with_initial(read_jsonl(os.path.join(d, "eval.jsonl")), i) for d, i in zip(run_dirs, initial)]
    metrics = [read_jsonl(os.path.join(d, "metrics.jsonl")) for d in run_dirs]
    steps = sorted(set.intersection(*({e["step"] for e in per} for per in evals)))
    by_step = {}
    for step in steps:
        at = [next(e for e in per if e["step"] == step) for per in evals]
        by_step[step] = {k: {"mean": statistics.fmean(e[k] for e in at), "spread": max(e[k] for e in at) - min(e[k] for e in at)}
                         for k in KEYS if k in at[0]}
        # training seconds to reach the step (the steps' step_s: generation, scoring, update, sync)
        by_step[step]["train_s"] = statistics.fmean(sum(r["step_s"] for r in per if r["step"] <= step)
                                                    for per in metrics)
    return {"final": {k: [per[-1][k] for per in evals] for k in KEYS if k in evals[0][-1]},
            "by_step": by_step,
            "train_s": [round(sum(r["step_s"] for r in per), 1) for per in metrics],
            "startup_s": [round(per[0].get("startup_s") or 0.0, 1) for per in metrics],
            "curves": [[(round(sum(r["step_s"] for r in m if r["step"] <= e["step"]), 2), e["pass@1"]) for e in per]
                       for per, m in zip(evals, metrics)]}


def train(config: str, methods: list[str], seeds: int, dirs: dict, extra: list[str], cfg, rehearsal_data: str) -> None:
    """Every (seed, method) run, seed by seed, in this process on shared actors (rayskd.sweep);
    one line per run; each run's driver output in RUN_DIR/driver.log."""
    from rayskd.config import load_config
    from rayskd.sweep import train_all

    def done(run_cfg, summary):
        m = read_jsonl(os.path.join(run_cfg.run.output_dir, "metrics.jsonl"))
        e = read_jsonl(os.path.join(run_cfg.run.output_dir, "eval.jsonl"))[-1]
        method, seed = run_cfg.run.output_dir.split(os.sep)[-2:]
        print(f"{method} {seed}: training {sum(r['step_s'] for r in m):.0f} s (start-up "
              f"{m[0].get('startup_s') or 0:.0f} s), final pass@1 {e['pass@1']:.3f}", flush=True)

    os.chdir(ROOT)  # the configs' relative paths
    train_all([load_config(os.path.join(ROOT, config), [
        f"run.output_dir={dirs[method][seed]}", f"run.seed={seed}", f"run.eval_before={i == 0}",
        *overrides(method, cfg.run.steps, cfg.algorithm.kd.coef, rehearsal_data), *extra])
        for seed in range(seeds) for i, method in enumerate(methods)], driver_log=True, after=done)


def at_time(curve: list, t: float) -> float:
    """pass@1 at training seconds t on one run's curve [(seconds, pass@1), ...] (step 0 at 0 s),
    linear between its evaluations; its last value past its end."""
    for (t0, v0), (t1, v1) in zip(curve, curve[1:]):
        if t <= t1:
            return v0 + (v1 - v0) * (t - t0) / max(t1 - t0, 1e-9)
    return curve[-1][1]


def equal_time(runs: dict) -> dict:
    """Accuracy at equal wall-clock: every method's pass@1 at the training seconds the fastest
    method needed for all its steps (mean over seeds, and the seeds' values)."""
    budget = min(statistics.fmean(run["train_s"]) for run in runs.values())
    return {"train_s": round(budget, 1),
            "pass@1": {m: [round(at_time(c, budget), 4) for c in run["curves"]] for m, run in runs.items()}}


def facts(task: str, model_dir: str) -> dict:
    """The task's fact_usage (rayskd.data.demo_split or demo_gaps) on its held-out problems."""
    import importlib

    fact_usage = importlib.import_module(f"rayskd.data.demo_{task}").fact_usage
    with open(os.path.join(ROOT, ASSETS[task], "eval.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {k: round(v, 4) for k, v in fact_usage(model_dir, rows).items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=sorted(CONFIGS), default="split")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", help="comma-separated subset of " + ",".join(METHODS + MORE_METHODS + OTHER_METHODS) +
                   " (default: the first six; for gaps the first eleven)")
    p.add_argument("--min-correct", type=int, default=1,
                   help="DPH-RL: keep a prompt's presampled responses when it solved at least this many of 8")
    p.add_argument("--presample-prompts", type=int, default=4000, help="DPH-RL: presample this many training prompts")
    p.add_argument("--out", help="default: benchmarks/compare_TASK.json (and .png beside it)")
    p.add_argument("--from", dest="from_dir", help="summarise the runs in this directory instead of training")
    p.add_argument("extra", nargs="*", help="key=value overrides for every run")
    args = p.parse_args()
    methods = args.methods.split(",") if args.methods else list(DEFAULT_METHODS[args.task])
    if unknown := set(methods) - set(METHODS + MORE_METHODS + OTHER_METHODS):
        p.error(f"unknown methods: {', '.join(sorted(unknown))}")
    sys.path.insert(0, ROOT)
    from rayskd.config import load_config

    config = CONFIGS[args.task]
    cfg = load_config(os.path.join(ROOT, config), args.extra)
    out = args.out or os.path.join(ROOT, "benchmarks", f"compare_{args.task}.json")
    t0 = time.time()
    base = args.from_dir or os.path.join("runs", f"compare-{args.task}-{time.strftime('%Y%m%d-%H%M%S')}")
    if not args.from_dir:
        rayskd("prepare-demo", "--task", args.task)
    rehearsal_data = os.path.join(base, "rehearsal.jsonl")
    if {"dph_fkl", "dph_js"} & set(methods) and not args.from_dir:
        rayskd("presample", config, f"algorithm.rehearsal.data_path={rehearsal_data}",
               f"algorithm.rehearsal.presample_min_correct={args.min_correct}", "--max-prompts",
               str(args.presample_prompts), *args.extra, quiet=True)
    dirs = {method: [os.path.join(ROOT, base, method, f"seed{seed}") for seed in range(args.seeds)] for method in methods}
    t_train = time.time()
    if not args.from_dir:
        train(config, methods, args.seeds, dirs, [*args.extra], cfg, rehearsal_data)
    train_wall_s = time.time() - t_train
    # each seed's evaluation of the initial student: its first run's
    initial = [read_jsonl(os.path.join(dirs[methods[0]][seed], "eval.jsonl"))[0] for seed in range(args.seeds)]
    assert all(i["step"] == 0 for i in initial), "a seed's first run has no evaluation before step 1"
    runs = {}
    for method in methods:
        runs[method] = {"label": LABELS[method], "overrides": overrides(method, cfg.run.steps, cfg.algorithm.kd.coef,
                                                                         rehearsal_data), **summarize(dirs[method], initial)}
        if args.task in ("split", "gaps"):
            runs[method]["facts"] = [facts(args.task, os.path.join(d, "final")) for d in dirs[method]]
    with open(os.path.join(ROOT, ASSETS[args.task], "report.json")) as f:
        assets = json.load(f)
    result = {
        "task": args.task, "config": config, "date": time.strftime("%Y-%m-%d"), "seeds": args.seeds,
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}", "overrides": args.extra,
        "steps": cfg.run.steps, "prompts_per_step": cfg.algorithm.prompts_per_step,
        "samples_per_prompt": cfg.rollout.samples_per_prompt, "eval_problems": initial[0]["problems"],
        "eval_samples": initial[0].get("samples_per_problem", 0),
        "teacher": {k: assets[k] for k in ("teacher_accuracy", "teacher_sampled_accuracy") if k in assets},
        # every run evaluates the same initial student at step 0 (its own sampling seed): the mean
        "initial": {k: statistics.fmean(e[k] for e in initial) for k in KEYS if k in initial[0]},
        "initial_spread": {k: max(e[k] for e in initial) - min(e[k] for e in initial) for k in KEYS if k in initial[0]},
        "runs": runs, "equal_time": equal_time(runs),
        # the whole comparison (assets, presampling, every run, this summary) and its runs alone
        "wall_s": None if args.from_dir else round(time.time() - t0, 1),
        "train_wall_s": None if args.from_dir else round(train_wall_s, 1),
    }
    if args.task in ("split", "gaps"):
        result["initial_facts"] = facts(args.task, os.path.join(ROOT, ASSETS[args.task], "student"))
        result["teacher_facts"] = facts(args.task, os.path.join(ROOT, ASSETS[args.task], "teacher"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    picture = os.path.splitext(out)[0] + ".png"
    rayskd("report", *[d for method in methods for d in dirs[method]], "--out", picture)
    print(table(result))
    print(f"\n{out}\n{picture}")
    return 0


def table(result: dict) -> str:
    """The README's tables: the final held-out numbers, mean [lowest, highest] over seeds; the
    pass@1 curve with each step's training seconds, and pass@1 at equal wall-clock; what the
    final models do with the task's facts."""
    keys = [k for k in KEYS if k in result["initial"]]
    cell = lambda v: f"{statistics.fmean(v):.3f} [{min(v):.3f}, {max(v):.3f}]"  # noqa: E731
    lines = [f"| {result['task']}, step {result['steps']}, {result['seeds']} seeds | " + " | ".join(keys) + " | training s |",
             "|---" * (len(keys) + 2) + "|",
             "| initial student | " + " | ".join(f"{result['initial'][k]:.3f}" for k in keys) + " | |"]
    for method, run in result["runs"].items():
        cells = [cell(run["final"][k]) for k in keys]
        lines.append(f"| {run['label']} (`{method}`) | " + " | ".join(cells) + f" | {statistics.fmean(run['train_s']):.0f} |")
    steps = sorted({int(s) for run in result["runs"].values() for s in run["by_step"]})
    budget = result.get("equal_time")
    lines += ["", "| pass@1 by step (mean of seeds; training s to reach it) | " + " | ".join(f"step {s}" for s in steps) +
              (f" | at {budget['train_s']:.0f} s |" if budget else " |"), "|---" * (len(steps) + 1 + bool(budget)) + "|"]
    for method, run in result["runs"].items():
        by = {int(s): v for s, v in run["by_step"].items()}
        cells = [f"{by[s]['pass@1']['mean']:.3f} ({by[s]['train_s']:.0f} s)" if s in by else "" for s in steps]
        if budget:
            cells.append(cell(budget["pass@1"][method]))
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    if "initial_facts" in result:
        fkeys = list(result["initial_facts"])
        lines += ["", f"| {result['task']}: sampled answers (8 per held-out problem) | " + " | ".join(fkeys) + " |",
                  "|---" * (len(fkeys) + 1) + "|"]
        rows = [("initial student", [result["initial_facts"]]), ("teacher", [result["teacher_facts"]])]
        rows += [(f"`{method}`", run["facts"]) for method, run in result["runs"].items()]
        for name, per_seed in rows:
            lines.append(f"| {name} | " + " | ".join(f"{statistics.fmean(f[k] for f in per_seed):.3f}" for k in fkeys) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
