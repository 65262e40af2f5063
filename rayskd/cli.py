"""rayskd command line: train, resume, eval, report, submit / status / logs / stop, presample,
print-config, prepare-demo. Bad input exits with status 2 and a one-line message."""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, first_line, load_config, notices, to_yaml
from .preflight import UsageError


def _load(args):
    """The validated config, with its notices on stderr."""
    cfg = load_config(args.config, args.overrides)
    for line in notices(cfg):
        print(f"rayskd: note: {line}", file=sys.stderr)
    return cfg


def cmd_print_config(args) -> int:
    print(to_yaml(_load(args)), end="")
    return 0


def cmd_prepare_demo(args) -> int:
    from .data.demo import DEFAULT_OUT, prepare_demo

    out = args.out or DEFAULT_OUT[args.task]
    report = prepare_demo(out, seed=args.seed, task=args.task)
    print(f"demo assets ({args.task}) in {out}: teacher accuracy {report['teacher_accuracy']:.3f}, "
          f"student accuracy {report['student_accuracy']:.3f} (held-out, greedy)")
    return 0


# exit statuses of a training run
FINISHED, FAILED, USAGE, STOPPED, INTERRUPTED = 0, 1, 2, 3, 130


RESTART_WINDOW_S = 3600  # run.max_restarts counts the automatic restarts within this


def writable(directory: str) -> bool:
    """Whether files can still be created in `directory` (it may have vanished mid-run)."""
    import os
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def _run(cfg) -> int:
    """Train; any stop the driver survives checkpoints the last completed step first, and is
    followed by an automatic resume from the newest intact checkpoint (run.max_restarts within
    an hour). Exit 0 when the run finished, 3 when it stopped on request (SIGTERM, `rayskd
    stop`), 1 on an error, 130 on Ctrl-C: everything but 0 can be continued with `rayskd resume`."""
    import os
    import time

    from .actors import describe_failure
    from .trainer import Trainer, TrainingError

    trainer = Trainer(cfg)  # checks every input before anything starts
    resume = f"continue from the newest checkpoint with `rayskd resume {cfg.run.output_dir}`"
    restarts: list[float] = []
    try:
        while True:
            try:
                trainer.setup()
                summary = trainer.fit()
                break
            except UsageError as e:  # found once connected to a cluster (its GPUs), before any actor started
                print(f"rayskd: {e}", file=sys.stderr)
                return USAGE
            except KeyboardInterrupt:
                print("rayskd: interrupted (Ctrl-C); checkpointing the last completed step", file=sys.stderr)
                trainer.checkpoint_on_stop("interrupted")
                print(f"rayskd: interrupted; {resume}", file=sys.stderr)
                return INTERRUPTED
            except Exception as e:  # an actor raised or died: which one, what, and why
                what = str(e) if isinstance(e, TrainingError) else describe_failure(e)
                # whatever raised (a learner's write of a checkpoint part comes back as its own error
                # type): with the directory gone, that is why
                lost_dir = not writable(cfg.run.output_dir)
                if lost_dir:  # nothing more can be written there: what is committed stays as it is
                    what = (f"the run directory {cfg.run.output_dir} is gone or not writable any more ({what}); "
                            f"its committed checkpoints are as they were")
                else:
                    trainer.checkpoint_on_stop("training stopped")
                print(f"rayskd: training stopped: {what}", file=sys.stderr)
                restarts = [t for t in restarts if time.time() - t < RESTART_WINDOW_S]
                if not lost_dir and getattr(e, "restartable", True) and len(restarts) < cfg.run.max_restarts:
                    restarts.append(time.time())
                    print(f"rayskd: restarting from the newest checkpoint (automatic restart {len(restarts)} of "
                          f"run.max_restarts={cfg.run.max_restarts} within an hour)", file=sys.stderr)
                    try:
                        trainer = trainer.restart()
                    except Exception as again:
                        print(f"rayskd: the restart failed: {describe_failure(again)}", file=sys.stderr)
                    else:
                        continue
                print(f"rayskd: the actors' logs are in {os.path.join(cfg.run.output_dir, 'logs')}", file=sys.stderr)
                print(f"rayskd: {resume}", file=sys.stderr)
                return FAILED
    finally:
        trainer.shutdown()
    print(f"run directory: {cfg.run.output_dir}")
    if summary.get("stopped"):
        return STOPPED
    if summary.get("eval_before") is not None and summary.get("eval_after") is not None:
        print(f"held-out accuracy: {summary['eval_before']:.3f} -> {summary['eval_after']:.3f}")
    return FINISHED


def cmd_train(args) -> int:
    return _run(_load(args))


def cmd_resume(args) -> int:
    import os

    config = os.path.join(args.run_dir, "config.yaml")
    if not os.path.isfile(config):
        raise UsageError(f"{args.run_dir} is not a rayskd run directory (no config.yaml)")
    return _run(load_config(config, [*args.overrides, "run.resume=auto",
                                     f"run.output_dir={os.path.abspath(args.run_dir)}"]))


def cmd_submit(args) -> int:
    from . import jobs

    job_id = jobs.submit(args.address, args.config, args.overrides)
    print(job_id, flush=True)
    if args.follow:
        final = jobs.follow(args.address, job_id)
        print(f"{job_id}: {final}")
        return 0 if final == "SUCCEEDED" else 1
    return 0


def cmd_job(args) -> int:
    from . import jobs

    if args.command == "status":
        print(jobs.status(args.address, args.job_id))
    elif args.command == "logs":
        if args.follow:
            jobs.follow(args.address, args.job_id)
        else:
            print(jobs.logs(args.address, args.job_id), end="")
    else:
        jobs.stop(args.address, args.job_id)
        print(f"{args.job_id}: stop requested (the run checkpoints after its current step)")
    return 0


def _ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k takes comma-separated integers such as 1,4,8, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"--k: every k must be >= 1, got {text!r}")
    return ks


def cmd_eval(args) -> int:
    import json

    from .evaluation import format_eval, run_eval

    if args.samples < max(args.k):
        raise UsageError(f"--samples {args.samples}: pass@{max(args.k)} needs at least {max(args.k)} samples per problem")
    result = run_eval(args.target, args.data, args.k, args.samples, args.overrides,
                      log=lambda m: print(f"[rayskd] {m}", file=sys.stderr, flush=True))
    print(f"{format_eval(result)} | {result['problems']} problems, {result['samples_per_problem']} samples each, "
          f"{result['eval_s']:.1f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def cmd_report(args) -> int:
    from .report import make_report

    print(make_report(args.run_dirs, args.out))
    return 0


def cmd_presample(args) -> int:
    from .presample import presample

    from .preflight import resolve_models

    cfg = resolve_models(load_config(args.config, args.overrides))
    presample(cfg, max_prompts=args.max_prompts, explore_out=args.explore_out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rayskd", description="Ray-based on-policy distillation (GRPO + KDRL / DPH-RL).")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("print-config", help="print the resolved, validated config")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", help="key=value, e.g. learner.lr=1e-5")
    s.set_defaults(fn=cmd_print_config)

    s = sub.add_parser("train", help="train a student (GRPO + teacher divergence) on this machine or cluster")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", help="key=value, e.g. rollout.num_workers=2")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("submit", help="submit a training run to a Ray cluster as a Ray job; prints the job id")
    s.add_argument("--address", help="the cluster's dashboard, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)")
    s.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")
    s.set_defaults(fn=cmd_submit)
    for name, text in (("status", "a job's status"), ("logs", "a job's logs"), ("stop", "stop a job (it checkpoints first)")):
        s = sub.add_parser(name, help=text)
        s.add_argument("job_id")
        s.add_argument("--address")
        if name == "logs":
            s.add_argument("--follow", action="store_true")
        s.set_defaults(fn=cmd_job)

    s = sub.add_parser("resume", help="continue a run from its newest complete checkpoint")
    s.add_argument("run_dir")
    s.add_argument("overrides", nargs="*", help="key=value, e.g. run.steps=200 to train longer")
    s.set_defaults(fn=cmd_resume)

    s = sub.add_parser("eval", help="held-out greedy accuracy, pass@1 and pass@k of a model or a run's newest "
                                    "checkpoint, on vLLM engines")
    s.add_argument("target", help="a Hugging Face model directory or a run directory")
    s.add_argument("--data", help="JSONL of prompts and answers (default: the run's data.eval_path)")
    s.add_argument("--k", type=_ks, default=(1, 4, 8), help="the k of pass@k, comma-separated (default 1,4,8)")
    s.add_argument("--samples", type=int, default=8, help="sampled responses per problem, n >= max k (default 8)")
    s.add_argument("--out", help="also write the numbers to this JSON file")
    s.add_argument("overrides", nargs="*", help="key=value, e.g. rollout.temperature=0.6 rollout.num_workers=2")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("report", help="one picture comparing runs: reward, held-out pass@k, divergence, length, "
                                      "entropy, time per phase")
    s.add_argument("run_dirs", nargs="+")
    s.add_argument("--out", required=True, help="the picture, e.g. report.png")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("presample", help="DPH-RL: sample the initial student and store reliably solved "
                                         "responses with reference log-probs (algorithm.rehearsal.data_path)")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--max-prompts", type=int, default=0, help="use only the first N training prompts")
    s.add_argument("--explore-out", help="also write the prompts not solved reliably (the exploration set) here")
    s.set_defaults(fn=cmd_presample)

    s = sub.add_parser("prepare-demo", help="write the built-in demo task, tokenizer and models (cached)")
    s.add_argument("--task", choices=("arith", "split", "gaps"), default="arith",
                   help="arith: two-digit addition (configs/demo.yaml); split: a number as a carry-free sum, "
                        "many right answers (configs/demo_split.yaml); gaps: split where the student rarely "
                        "reaches a reward and the teacher errs elsewhere (configs/demo_gaps.yaml)")
    s.add_argument("--out", help="default: demo_assets (arith), demo_assets_split (split), demo_assets_gaps (gaps)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_prepare_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may come after options too (`rayskd eval RUN --k 1,4 rollout.top_p=0.9`)
        if not hasattr(args, "overrides") or any("=" not in x or x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"rayskd: config error: {e}", file=sys.stderr)
        return USAGE
    except UsageError as e:
        print(f"rayskd: {e}", file=sys.stderr)
        return USAGE
    except ConnectionError as e:  # submit/status/logs/stop: the cluster's address does not answer
        print(f"rayskd: cannot reach the Ray cluster: {first_line(e)}", file=sys.stderr)
        return USAGE
    except Exception as e:
        from ray.exceptions import AuthenticationError

        if not isinstance(e, AuthenticationError):
            raise
        print("rayskd: the Ray cluster refused the request: authentication failed (token authentication: set "
              "RAY_AUTH_MODE=token and the cluster's token, in ~/.ray/auth_token or RAY_AUTH_TOKEN)", file=sys.stderr)
        return USAGE


if __name__ == "__main__":
    sys.exit(main())
