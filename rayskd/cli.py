"""rayskd command line: print-config, prepare-demo (and, as they land, train / presample /
resume / submit). Bad input exits with status 2 and a one-line message."""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config, to_yaml


class UsageError(Exception):
    """Bad input found before anything expensive started: exit status 2."""


def cmd_print_config(args) -> int:
    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_prepare_demo(args) -> int:
    from .data.demo import prepare_demo

    report = prepare_demo(args.out, seed=args.seed)
    print(f"demo assets in {args.out}: teacher accuracy {report['teacher_accuracy']:.3f}, "
          f"student accuracy {report['student_accuracy']:.3f} (held-out, greedy, exact match)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rayskd", description="Ray-based on-policy distillation (GRPO + KDRL / DPH-RL).")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("print-config", help="print the resolved, validated config")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", help="key=value, e.g. learner.lr=1e-5")
    s.set_defaults(fn=cmd_print_config)

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
