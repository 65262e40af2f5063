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


def math(prompt: str, completion: str, answer: str) -> float:
    """1.0 when the completion's final answer is mathematically equivalent to the reference
    (math-verify: LaTeX and plain expressions, e.g. "1/2" == "0.5" == "\\frac{1}{2}")."""
    from math_verify import parse, verify

    # math-verify's default timeouts use signals, which only work in a main thread
    gold = parse(str(answer), parsing_timeout=None)
    pred = parse(completion, parsing_timeout=None)
    if not gold or not pred:
        return 0.0
    return float(verify(gold, pred, timeout_seconds=None))


BUILTIN = {"exact_match": exact_match, "math": math}


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
