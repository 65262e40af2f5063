"""`rayskd report RUN_DIR [RUN_DIR ...] --out FILE.png`: one picture comparing runs.

Six panels, every run overlaid and labelled: training reward, held-out pass@1 and pass@k
(the largest k evaluated; greedy accuracy, dotted, for runs evaluated without samples), teacher
divergence (with the teacher-hacking monitor's KL to the teacher and to the golden model at each
evaluation, where a run has one), response length,
policy entropy, and the mean seconds per step of each phase (generate, teacher scoring,
learner update, weight sync) as grouped bars. Reads metrics.jsonl and eval.jsonl only.

Seeds of one method (directories METHOD/seed0, METHOD/seed1, ... or METHOD-seed0, ...) are
drawn as one line, their mean at each step, with a band from the lowest to the highest seed.
"""
from __future__ import annotations

import json
import os
import re

from .metrics import PHASES
from .preflight import UsageError



def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def labels_for(run_dirs: list[str]) -> list[str]:
    """Each run's directory name, with its parent's when two runs share a name."""
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    return [os.path.join(os.path.basename(os.path.dirname(os.path.normpath(d))), n) if names.count(n) > 1 else n
            for d, n in zip(run_dirs, names)]


SEED = re.compile(r"[-_/]seed\d+$")


def group_seeds(labels: list[str]) -> dict[str, list[int]]:
    """Method label -> the indices of its runs: labels that differ only in a seed suffix
    (`grpo/seed0`, `grpo/seed1`) form one group named `grpo`; any other label is its own."""
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(SEED.sub("", label), []).append(i)
    return groups


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _band(record_lists: list[list[dict]], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps every run has `key` at, and the mean, lowest and highest value there."""
    per_run = [dict(zip(*_series(records, key))) for records in record_lists]
    steps = sorted(set.intersection(*(set(run) for run in per_run))) if per_run else []
    values = [[run[s] for run in per_run] for s in steps]
    return steps, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def _plot(ax, record_lists, key, color, label, **style):
    steps, mean, low, high = _band(record_lists, key)
    ax.plot(steps, mean, color=color, label=label, **style)
    if len(record_lists) > 1:
        ax.fill_between(steps, low, high, color=color, alpha=0.15, linewidth=0)


def _largest_k(evals: list[dict]) -> str | None:
    ks = sorted({int(key[5:]) for r in evals for key in r if key.startswith("pass@")})
    return f"pass@{ks[-1]}" if ks and ks[-1] > 1 else None


def make_report(run_dirs: list[str], out: str) -> str:
    for d in run_dirs:
        if not os.path.isfile(os.path.join(d, "metrics.jsonl")):
            raise UsageError(f"{d}: no metrics.jsonl (not a rayskd run directory, or no step finished yet)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels_for(run_dirs)
    runs = []  # (label, [metrics of each seed], [evals of each seed])
    for name, members in group_seeds(labels).items():
        label = f"{name} ({len(members)} seeds)" if len(members) > 1 else labels[members[0]]
        runs.append((label, [read_jsonl(os.path.join(run_dirs[i], "metrics.jsonl")) for i in members],
                     [read_jsonl(os.path.join(run_dirs[i], "eval.jsonl")) for i in members]))
    many = len(runs) > 4  # one legend beside the panels instead of one in each
    fig, axes = plt.subplots(2, 3, figsize=(18 if many else 15, 8.5))
    # a colour of its own for each run: the default cycle repeats after 10
    colors = (plt.rcParams["axes.prop_cycle"].by_key()["color"] if len(runs) <= 10 else
              [plt.get_cmap("tab20")(i) for i in range(20)])
    panels = ((axes[0, 0], "reward_mean", "training reward (mean)"),
              (axes[0, 2], "kd_divergence", "teacher divergence"),
              (axes[1, 0], "response_len_mean", "response length (tokens)"),
              (axes[1, 1], "entropy", "policy entropy (nats/token)"))
    largest = "pass@k"
    for i, (label, metrics, evals) in enumerate(runs):
        color = colors[i % len(colors)]
        for ax, key, _ in panels:
            _plot(ax, metrics, key, color, label, linewidth=1.4)
        if all(any("golden_kl" in r for r in e) for e in evals):  # the teacher-hacking monitor's two curves
            _plot(axes[0, 2], evals, "proxy_kl", color, f"{label} eval: to teacher", marker="o", linestyle="")
            _plot(axes[0, 2], evals, "golden_kl", color, f"{label} eval: to golden", marker="^", linestyle="--")
        ax = axes[0, 1]
        if all(any("pass@1" in r for r in e) for e in evals):
            _plot(ax, evals, "pass@1", color, f"{label} pass@1", marker="o")
            if (k := _largest_k(evals[0])) is not None:
                largest = k
                _plot(ax, evals, k, color, None if many else f"{label} {k}", marker="s", linestyle="--")
        elif all(evals):  # evaluations without samples: greedy accuracy
            _plot(ax, evals, "greedy_accuracy", color, f"{label} greedy", marker="o", linestyle=":")
        else:  # a run older than eval.jsonl
            _plot(ax, metrics, "eval_accuracy", color, f"{label} greedy", marker="o", linestyle=":")
    for ax, _, title in panels:
        ax.set_title(title)
    axes[0, 1].set_title(f"held-out pass@1 (solid), {largest} (dashed)")
    axes[1, 0].ticklabel_format(useOffset=False)
    ax = axes[1, 2]
    width = 0.8 / max(len(runs), 1)
    for i, (label, metrics, _) in enumerate(runs):
        records = [r for seed in metrics for r in seed]
        means = [sum(r.get(key) or 0.0 for r in records) / max(len(records), 1) for key, _ in PHASES]
        ax.bar([p + i * width for p in range(len(PHASES))], means, width, label=label, color=colors[i % len(colors)])
    ax.set_xticks([p + 0.4 - width / 2 for p in range(len(PHASES))], [name for _, name in PHASES])
    ax.set_title("seconds per step, by phase (mean)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax is not axes[1, 2]:
            ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0] and not many:
            ax.legend(fontsize=8)
    if many:
        fig.legend(*axes[1, 2].get_legend_handles_labels(), loc="center right", fontsize=9)
        fig.suptitle(f"rayskd: {len(runs)} runs")
        fig.tight_layout(rect=(0, 0, 0.84, 1))
    else:
        fig.suptitle("rayskd: " + ", ".join(label for label, _, _ in runs))
        fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
