"""rayskd command line: print-config, prepare-demo (and, as they land, train / presample /
resume / submit). Bad input exits with status 2 and a one-line message."""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config, to_yaml
from .preflight import UsageError


def cmd_print_config(args) -> int:
    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_prepare_demo(args) -> int:
    from .data.demo import prepare_demo

    report = prepare_demo(args.out, seed=args.seed)
    print(f"demo assets in {args.out}: teacher accuracy {report['teacher_accuracy']:.3f}, "
          f"student accuracy {report['student_accuracy']:.3f} (held-out, greedy, exact match)")
    return 0


def _terminate_on_sigterm():
    """SIGTERM (Ray job stop, a scheduler) unwinds like Ctrl-C so that every actor and vLLM
    engine is shut down."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def cmd_train(args) -> int:
    from .trainer import Trainer, TrainingError

    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg)  # checks every input before anything starts
    _terminate_on_sigterm()
    try:
        trainer.setup()
        summary = trainer.fit()
    except TrainingError as e:
        print(f"rayskd: training stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rayskd: interrupted; actors shut down", file=sys.stderr)
        return 130
    finally:
        trainer.shutdown()
    print(f"run directory: {cfg.run.output_dir}")
    if summary.get("eval_before") is not None:
        print(f"held-out accuracy: {summary['eval_before']:.3f} -> {summary['eval_after']:.3f}")
    return 0


def cmd_presample(args) -> int:
    from .rehearsal import presample

    cfg = load_config(args.config, args.overrides)
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

    s = sub.add_parser("presample", help="DPH-RL: sample the initial student and store reliably solved "
                                         "responses with reference log-probs (algorithm.rehearsal.data_path)")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--max-prompts", type=int, default=0, help="use only the first N training prompts")
    s.add_argument("--explore-out", help="also write the prompts not solved reliably (the exploration set) here")
    s.set_defaults(fn=cmd_presample)

    s = sub.add_parser("prepare-demo", help="write the built-in demo task, tokenizer and models (cached)")
    s.add_argument("--out", default="demo_assets")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_prepare_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"rayskd: config error: {e}", file=sys.stderr)
        return 2
    except UsageError as e:
        print(f"rayskd: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
