"""Verifiable rewards, chosen by name (`exact_match`, `math`) or given as "module:function".

A reward function takes (prompt, completion, answer) and returns one float.
"""
from __future__ import annotations

import importlib
from typing import Callable

RewardFn = Callable[[str, str, str], float]


def exact_match(prompt: str, completion: str, answer: str) -> float:
    """1.0 when the completion, stripped of surrounding white space, equals the answer."""
    return float(completion.strip() == str(answer).strip())


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}) in `text`, braces balanced; None
    when there is none or it is not closed."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
        i += 1
    return None


def final_answer(text: str) -> str:
    """The answer a solution states last: its last \\boxed{...} (MATH style), else what follows
    its last `####` (GSM8K style, thousands separators dropped), else the whole text (then
    math-verify takes the last expression it can parse)."""
    boxed = last_boxed(text)
    if boxed is not None:
        return f"\\boxed{{{boxed}}}"
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    return text


def math(prompt: str, completion: str, answer: str) -> float:
    """1.0 when the completion's final answer (final_answer: \\boxed{...}, `#### 42`, or the
    last expression) is mathematically equivalent to the reference's, which may be a bare
    value or a whole GSM8K / MATH solution (math-verify: LaTeX and plain expressions, e.g.
    "1/2" == "0.5" == "\\frac{1}{2}")."""
    from math_verify import parse, verify

    # math-verify's default timeouts use signals, which only work in a main thread
    gold = parse(final_answer(str(answer)), parsing_timeout=None)
    pred = parse(final_answer(completion), parsing_timeout=None)
    if not gold or not pred:
        return 0.0
    return float(verify(gold, pred, timeout_seconds=None))


def split_sum(prompt: str, completion: str, answer: str) -> float:
    """The `split` demo: 1.0 when the completion is `A+B`, both with as many digits as the
    answer N, and A + B = N (any split is right, carries included)."""
    a, plus, b = completion.strip().partition("+")
    n = str(answer).strip()
    ok = plus and len(a) == len(b) == len(n) and (a + b + n).isdigit() and int(a) + int(b) == int(n)
    return float(bool(ok))


BUILTIN = {"exact_match": exact_match, "math": math, "split_sum": split_sum}


def load_reward(name: str, function: str | None = None) -> RewardFn:
    """The built-in reward `name`, or the callable at "module:function" when `function` is set.
    Raises ValueError naming what could not be found."""
    if function is None:
        if name not in BUILTIN:
            raise ValueError(f"unknown reward {name!r}: built-ins are {', '.join(BUILTIN)}")
        return BUILTIN[name]
    module_name, _, attr = function.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ValueError(f"reward.function {function!r}: cannot import {module_name!r}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward.function {function!r}: {module_name!r} has no callable {attr!r}")
    return fn
