"""The `gaps` demo task: the split task (demo_split.py: write N as A+B, any split right) with the
premise of the KDRL paper, where GRPO alone struggles to explore and a teacher helps.

    prompt  `385172=`        (six digits, 1-9 each)
    answer  `102050+283122`  (any A+B with A + B = N, both six digits)

Written before any method was run on it (issue 30.2); what it is built to have:

- the initial student rarely reaches a reward, because on some facts it has no right
  alternative to sample: for the digits 6, 7, 8 and 9 (its gaps) every (x, a) fact has b one
  too high in its training data (in all of it: `gap_right_rate` 0; version 1 kept 3% right,
  and GRPO alone learned the gaps from them: see the note below). Whatever a_i it picks there,
  b_i is almost always wrong. 97% of problems hold a gap digit,
  most of them several, so most held-out problems have pass@8 at most 0.1: sampling finds a
  right answer rarely, and GRPO's groups are mostly all-wrong (no advantage, no gradient);
- the teacher knows those facts (it learned them right), but is itself wrong on a minority of
  facts the reward can correct: about 20% of the (x, a) facts, spread over the digits 2-9 and
  never all of a digit, have b one too low. Distillation alone copies these (its ceiling is
  the teacher's own sampled solve rate, about 0.8^6); the reward can route around them, as
  every digit keeps right facts;
- four of the teacher's wrong facts are on digits the student has right (2-5): distillation
  alone unlearns them there;
- problems have many right answers (the product of x_i + 1 over the digits, fewer the
  teacher's wrong facts), so pass@k for large k and the distinct right answers per problem
  measure diversity, which a policy narrowed onto a few splits loses.

The claim this task can test: KDRL (GRPO + the teacher term) ahead of GRPO alone (which the
gaps starve) and of distillation alone (which copies the teacher's errors), at equal steps.
The reward (`split_sum`) checks only the sum, as in split.

Note (added after the first results, the premise above otherwise as written before them):
version 1 trained the student with 3% of its gap examples right. Its held-out pass@8 was 0.094
(at most 0.1 on 77% of problems), yet GRPO alone reached pass@1 0.96 in 60 steps (seeds 0
and 1): the few right samples, on facts shared by every problem, sufficed. Version 2 (this)
gives the student no right example of a gap fact, as "no right alternative" says.
"""
from __future__ import annotations

import os
import random

from . import demo, demo_split

RECIPE = dict(task="gaps", version=2, digits=6, n_train=20000, n_eval=128, gap_digits=(6, 7, 8, 9),
              gap_right_rate=0.0, teacher_wrong_fraction=0.2, splits_per_problem=2, teacher=demo.TEACHER,
              student=demo.STUDENT, teacher_steps=600, teacher_lr=2e-3, student_steps=400, student_lr=3e-3,
              batch_size=128, teacher_label_smoothing=0.01, student_label_smoothing=0.0)


def teacher_mistakes(seed: int, fraction: float) -> frozenset:
    """The (x, a) facts the teacher learns wrong (b = x - a - 1): round(`fraction` of each digit's
    x + 1 facts), never all of them (drawn as split's misconceptions are)."""
    return demo_split.misconceptions(seed, fraction)


def answer(n: str, rng: random.Random, b_of) -> str:
    """A uniformly random split `A+B` of the digits of n, b_i = b_of(x_i, a_i) (mod 10)."""
    a = [rng.randint(0, int(x)) for x in n]
    return "".join(map(str, a)) + "+" + "".join(str(b_of(int(x), ai) % 10) for x, ai in zip(n, a))


def student_b(gaps: tuple, right_rate: float, rng: random.Random):
    """The student's data: b right, but one too high on a gap digit (right there `right_rate` of the time)."""
    return lambda x, a: x - a + (x in gaps and rng.random() >= right_rate)


def teacher_b(wrong: frozenset):
    return lambda x, a: x - a - ((x, a) in wrong)


def build(tmp: str, fp: str, seed: int, log, recipe: dict = RECIPE) -> dict:
    R = recipe
    train, evals = demo_split.problems(seed, R["digits"], R["n_train"], R["n_eval"])
    demo.write_jsonl(os.path.join(tmp, "train.jsonl"), train)
    demo.write_jsonl(os.path.join(tmp, "eval.jsonl"), evals)
    tok = demo.build_tokenizer(os.path.join(tmp, "teacher"))
    demo.build_tokenizer(os.path.join(tmp, "student"))
    wrong = teacher_mistakes(seed + 3, R["teacher_wrong_fraction"])
    gaps = tuple(R["gap_digits"])
    report = {"fingerprint": fp, "seed": seed, "task": "gaps: N= -> A+B with A + B = N (six digits 1-9; any split "
              "is right); the student has the digits 6-9 wrong, the teacher 20% of the facts",
              "train_size": len(train), "eval_size": len(evals), "facts": sum(x + 1 for x in range(1, 10)),
              "teacher_wrong_facts": sorted(map(list, wrong)), "student_gap_digits": list(gaps),
              "eval_problems_without_gaps": sum(not set(map(int, r["answer"])) & set(gaps) for r in evals)}
    for name, arch, mseed in (("teacher", demo.TEACHER, seed + 1), ("student", demo.STUDENT, seed + 2)):
        rng = random.Random(mseed)
        b_of = student_b(gaps, R["gap_right_rate"], rng) if name == "student" else teacher_b(wrong)
        rows = [{"prompt": r["prompt"], "answer": answer(r["answer"], rng, b_of)}
                for r in train for _ in range(R["splits_per_problem"])]
        demo_split.train_model(tmp, name, arch, mseed, rows, tok, evals, R, report, log)
    return report


def fact_usage(model_dir: str, rows, seed: int = 0, samples: int = 8) -> dict:
    """How a model's sampled answers treat the task's facts (recipe's seed 0): how often b is
    right on the teacher's wrong facts (`teacher_wrong_right`: the student knows the four on
    digits 2-5, nobody the others), on the student's gap digits' other facts (`gap_right`: the
    initial student ~gap_right_rate, the teacher ~1) and on the rest (`other_right`), and the
    share of digit pairs on a teacher-wrong fact (`teacher_wrong_share`, ~0.2 for a uniform a:
    a policy that routes around them lowers it)."""
    wrong, gaps = teacher_mistakes(3, RECIPE["teacher_wrong_fraction"]), RECIPE["gap_digits"]
    kinds = {"gap": [0, 0], "teacher_wrong": [0, 0], "other": [0, 0]}  # [pairs, right b]
    for row, per in zip(rows, demo_split.sampled_answers(model_dir, rows, seed, samples)):
        for x, ai, bi in (pair for text in per for pair in demo_split.digit_pairs(row, text)):
            counts = kinds["teacher_wrong" if (x, ai) in wrong else "gap" if x in gaps else "other"]
            counts[0] += 1
            counts[1] += bi == x - ai
    pairs = sum(c[0] for c in kinds.values())
    out = {f"{k}_right": c[1] / max(c[0], 1) for k, c in kinds.items()}
    out["teacher_wrong_share"] = kinds["teacher_wrong"][0] / max(pairs, 1)
    return out
