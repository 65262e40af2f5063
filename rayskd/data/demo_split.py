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
MAX_NEW_TOKENS = 2 * RECIPE["digits"] + 2  # A + B + EOS, and one spare


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
    texts = demo.decode(model, tok, [r["prompt"] for r in rows], MAX_NEW_TOKENS, samples=samples)
    return sum(solves(r, t) for r, per in zip(rows, texts) for t in per) / max(len(rows) * samples, 1)


def build(tmp: str, fp: str, seed: int, log) -> dict:
    R = RECIPE
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
        model = demo.make_model(arch, len(tok), tok.eos_token_id, mseed)
        demo.sft(model, tok, rows, R[f"{name}_steps"], R["batch_size"], R[f"{name}_lr"], mseed, log, name,
                 R[f"{name}_label_smoothing"])
        model.save_pretrained(os.path.join(tmp, name), safe_serialization=True)
        report[f"{name}_accuracy"] = demo.greedy_accuracy(model, tok, evals, MAX_NEW_TOKENS, solves=solves)
        report[f"{name}_sampled_accuracy"] = sampled_solve_rate(model, tok, evals)
        report[f"{name}_params"] = sum(p.numel() for p in model.parameters())
        report[f"{name}_sft_steps"] = R[f"{name}_steps"]
        log(f"[prepare-demo] {name}: held-out accuracy greedy {report[f'{name}_accuracy']:.3f}, "
            f"sampled (temperature 1) {report[f'{name}_sampled_accuracy']:.3f}")
    return report
