"""The `split` demo task: write a number as a sum of two numbers without carrying.

    prompt  `385172=`        (six digits, 1-9 each)
    answer  `102050+283122`  (any A+B with A + B = N, both six digits; here digit by digit)

It is built for what KDRL and DPH-RL are about, where the `arith` demo is not:

- answers are 13 tokens, each digit pair (a_i, b_i) a small decision: a_i is free
  (0..x_i), b_i = x_i - a_i is then forced;
- many right answers per problem (the product of x_i + 1 over the digits), so pass@k can
  exceed pass@1, and a policy that narrows onto a few splits loses the others;
- the teacher learned the rule from uniformly random splits: it is right, and its
  per-token distribution is dense (it puts mass on every valid a_i, and all of it on the
  right b_i);
- the student learned the same kind of data but with misconceptions: for about 30% of the
  (x, a) facts (each digit keeps at least one right fact) its b is one too high. It gets
  most tokens right but, sampling its a_i freely, completes a whole answer rarely (about
  0.7^6 ~ 12%), so sampled rewards are sparse; a right answer needs every a_i to avoid a
  wrong fact, which sampling finds only by luck, while the teacher corrects each wrong b_i
  where it occurs.

The reward (`split_sum`) checks only the sum: splits with carries count as right too.
"""
from __future__ import annotations

import os
import random

from . import demo

RECIPE = dict(task="split", version=1, digits=6, n_train=20000, n_eval=256, wrong_fraction=0.3,
              splits_per_problem=2, teacher=demo.TEACHER, student=demo.STUDENT, teacher_steps=600,
              teacher_lr=2e-3, student_steps=400, student_lr=3e-3, batch_size=128, teacher_label_smoothing=0.01,
              student_label_smoothing=0.0)


def problems(seed: int, digits: int, n_train: int, n_eval: int):
    """Distinct numbers of `digits` digits 1-9 (so each digit has at least two splits),
    as {"prompt": "N=", "answer": "N"} rows: train, held-out eval."""
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < n_train + n_eval:
        n = "".join(str(rng.randint(1, 9)) for _ in range(digits))
        if n not in seen:
            seen.add(n)
            rows.append({"prompt": f"{n}=", "answer": n})
    return rows[n_eval:], rows[:n_eval]


def misconceptions(seed: int, fraction: float) -> frozenset:
    """The (x, a) facts the student learns wrong (b = x - a + 1): about `fraction` of each
    digit's x + 1 facts, never all of them."""
    rng = random.Random(seed)
    wrong = set()
    for x in range(1, 10):
        facts = [(x, a) for a in range(x + 1)]
        wrong.update(rng.sample(facts, min(round(fraction * len(facts)), len(facts) - 1)))
    return frozenset(wrong)


def split(n: str, rng: random.Random, wrong: frozenset = frozenset()) -> str:
    """A uniformly random carry-free split `A+B` of the digits of n, with b one too high
    on the facts in `wrong`."""
    a = [rng.randint(0, int(x)) for x in n]
    b = [(int(x) - ai + ((int(x), ai) in wrong)) % 10 for x, ai in zip(n, a)]
    return "".join(map(str, a)) + "+" + "".join(map(str, b))


def solves(row, text: str) -> bool:
    """`split_sum` on a demo row."""
    from ..rewards import split_sum

    return split_sum(row["prompt"], text, row["answer"]) == 1.0


def sampled_solve_rate(model, tok, rows, samples: int = 8) -> float:
    max_new_tokens = 2 * len(rows[0]["answer"]) + 2  # A + B + EOS, and one spare
    texts = demo.decode(model, tok, [r["prompt"] for r in rows], max_new_tokens, samples=samples)
    return sum(solves(r, t) for r, per in zip(rows, texts) for t in per) / max(len(rows) * samples, 1)


def build(tmp: str, fp: str, seed: int, log, recipe: dict = RECIPE) -> dict:
    R = recipe
    train, evals = problems(seed, R["digits"], R["n_train"], R["n_eval"])
    demo.write_jsonl(os.path.join(tmp, "train.jsonl"), train)
    demo.write_jsonl(os.path.join(tmp, "eval.jsonl"), evals)
    tok = demo.build_tokenizer(os.path.join(tmp, "teacher"))
    demo.build_tokenizer(os.path.join(tmp, "student"))
    wrong = misconceptions(seed + 3, R["wrong_fraction"])
    report = {"fingerprint": fp, "seed": seed, "task": "split: N= -> A+B with A + B = N (six digits 1-9; any split "
              "is right)", "train_size": len(train), "eval_size": len(evals),
              "student_wrong_facts": len(wrong), "facts": sum(x + 1 for x in range(1, 10))}
    for name, arch, mseed in (("teacher", demo.TEACHER, seed + 1), ("student", demo.STUDENT, seed + 2)):
        rng = random.Random(mseed)
        taught = wrong if name == "student" else frozenset()
        rows = [{"prompt": r["prompt"], "answer": split(r["answer"], rng, taught)}
                for r in train for _ in range(R["splits_per_problem"])]
        train_model(tmp, name, arch, mseed, rows, tok, evals, R, report, log)
    return report


def train_model(tmp: str, name: str, arch: dict, mseed: int, rows, tok, evals, R: dict, report: dict, log) -> None:
    """One of a split-style task's models: SFT on `rows` (the recipe's steps, lr and smoothing
    for `name`), saved to tmp/name, its held-out numbers added to `report`."""
    model = demo.make_model(arch, len(tok), tok.eos_token_id, mseed)
    demo.sft(model, tok, rows, R[f"{name}_steps"], R["batch_size"], R[f"{name}_lr"], mseed, log, name,
             R[f"{name}_label_smoothing"])
    model.save_pretrained(os.path.join(tmp, name), safe_serialization=True)
    report[f"{name}_accuracy"] = demo.greedy_accuracy(model, tok, evals, 2 * R["digits"] + 2, solves=solves)
    report[f"{name}_sampled_accuracy"] = sampled_solve_rate(model, tok, evals)
    report[f"{name}_params"] = sum(p.numel() for p in model.parameters())
    report[f"{name}_sft_steps"] = R[f"{name}_steps"]
    log(f"[prepare-demo] {name}: held-out accuracy greedy {report[f'{name}_accuracy']:.3f}, "
        f"sampled (temperature 1) {report[f'{name}_sampled_accuracy']:.3f}")


def sampled_answers(model_dir: str, rows, seed: int, samples: int) -> list[list[str]]:
    """`samples` answers of the model at model_dir to each row's prompt (temperature 1, seeded)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with demo.pinned_numerics():
        return demo.decode(model, tok, [r["prompt"] for r in rows], 2 * len(rows[0]["answer"]) + 2, samples=samples,
                           seed=seed)


def digit_pairs(row, text: str) -> list[tuple[int, int, int]]:
    """(x, a, b) of each digit of a well-formed answer `A+B` to `row` with a <= x (none otherwise)."""
    a, plus, b = text.strip().partition("+")
    if not plus or len(a) != len(b) or len(a) != len(row["answer"]) or not (a + b).isdigit():
        return []
    return [(x, ai, bi) for x, ai, bi in zip(map(int, row["answer"]), map(int, a), map(int, b)) if ai <= x]


def fact_usage(model_dir: str, rows, seed: int = 0, samples: int = 8) -> dict:
    """How a model's sampled answers use the student's misconceived facts (recipe's seed 0):
    the share of digit pairs whose (x, a) is one the initial student has wrong
    (`misconceived_share`; 0.31 if a were uniform), how often b is right on those pairs
    (`misconceived_right`; the initial student ~0) and on the others (`other_right`), and the
    mean number of distinct right answers per problem among the samples (`distinct_right`).
    Tells a policy that learned the facts from one that routes around them."""
    wrong = misconceptions(3, RECIPE["wrong_fraction"])
    pairs = {True: [0, 0], False: [0, 0]}  # misconceived -> [pairs, right b]
    distinct = 0
    for row, per in zip(rows, sampled_answers(model_dir, rows, seed, samples)):
        distinct += len({t.strip() for t in per if solves(row, t)})
        for x, ai, bi in (pair for text in per for pair in digit_pairs(row, text)):
            counts = pairs[(x, ai) in wrong]
            counts[0] += 1
            counts[1] += bi == x - ai
    total = pairs[True][0] + pairs[False][0]
    return {"misconceived_share": pairs[True][0] / max(total, 1),
            "misconceived_right": pairs[True][1] / max(pairs[True][0], 1),
            "other_right": pairs[False][1] / max(pairs[False][0], 1),
            "distinct_right": distinct / max(len(rows), 1)}
