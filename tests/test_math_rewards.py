"""Issue 13.4: the built-in `math` reward on real answer formats, written here: GSM8K references
(a worked solution ending `#### 72`) and MATH references (a solution with `\\boxed{...}`), with
correct, equivalent, wrong and unparsable completions."""
import pytest

from rayskd.rewards import final_answer, last_boxed, math

GSM8K_GOLD = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
              "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
GSM8K_THOUSANDS = "He earns 20 * 50 = <<20*50=1000>>1,000 dollars.\n#### 1,000"
GSM8K_NEGATIVE = "The temperature falls 5 - 8 = <<5-8=-3>>-3 degrees.\n#### -3"
MATH_HALF = "There are 2 outcomes and 1 is favourable, so the probability is $\\boxed{\\frac{1}{2}}$."
MATH_SQUARE = "Expanding, we get $\\boxed{x^2 + 2x + 1}$."
MATH_ROOT = "So the side is $\\boxed{\\frac{\\sqrt{3}}{2}}$."
MATH_INTERVAL = "The solution set is $\\boxed{(0, 1]}$."


@pytest.mark.parametrize("gold, completion, expected", [
    # GSM8K: the answer after ####, stated in any of the usual ways
    (GSM8K_GOLD, "In May she sold 24, so 48 + 24 = 72.\n#### 72", 1.0),
    (GSM8K_GOLD, "#### 72.0", 1.0),
    (GSM8K_GOLD, "Altogether she sold $\\boxed{72}$ clips.", 1.0),
    (GSM8K_GOLD, "48 + 24 = 72, so the answer is 72", 1.0),
    (GSM8K_GOLD, "#### 71", 0.0),
    (GSM8K_GOLD, "In May she sold 24 and in April 48. #### 24 + 48 = 70", 0.0),
    (GSM8K_GOLD, "I am not sure.", 0.0),
    (GSM8K_GOLD, "", 0.0),
    (GSM8K_THOUSANDS, "#### 1000", 1.0),
    (GSM8K_THOUSANDS, "#### 1,000", 1.0),
    (GSM8K_THOUSANDS, "#### 100", 0.0),
    (GSM8K_NEGATIVE, "It ends at $\\boxed{-3}$ degrees.", 1.0),
    (GSM8K_NEGATIVE, "#### 3", 0.0),
    # MATH: the last \boxed{...}, equivalent forms
    (MATH_HALF, "The probability is $\\boxed{\\frac{1}{2}}$.", 1.0),
    (MATH_HALF, "$\\boxed{0.5}$", 1.0),
    (MATH_HALF, "$\\boxed{1/2}$", 1.0),
    (MATH_HALF, "$\\boxed{\\dfrac{2}{4}}$", 1.0),
    (MATH_HALF, "First I thought $\\boxed{1}$, but no: $\\boxed{\\frac12}$.", 1.0),
    (MATH_HALF, "$\\boxed{\\frac{1}{3}}$", 0.0),
    (MATH_HALF, "$\\boxed{2}$", 0.0),
    (MATH_HALF, "$\\boxed{banana}$", 0.0),
    (MATH_HALF, "the answer is \\boxed{", 0.0),
    (MATH_SQUARE, "$\\boxed{(x+1)^2}$", 1.0),
    (MATH_SQUARE, "$\\boxed{x^2 + 1}$", 0.0),
    (MATH_ROOT, "$\\boxed{\\frac{\\sqrt3}{2}}$", 1.0),
    (MATH_ROOT, "$\\boxed{\\frac{\\sqrt{2}}{2}}$", 0.0),
    (MATH_INTERVAL, "$\\boxed{(0,1]}$", 1.0),
    (MATH_INTERVAL, "$\\boxed{[0,1]}$", 0.0),
    # bare references, as simple datasets store them
    ("0.5", "The answer is $\\frac{1}{2}$", 1.0),
    ("72", "#### 72", 1.0),
    ("4", "x = 5", 0.0),
])
def test_math_reward_on_real_formats(gold, completion, expected):
    assert math("", completion, gold) == expected


def test_final_answer_and_last_boxed():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{x^{2}}") == "x^{2}"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("\\boxed{1") is None and last_boxed("no box") is None
    assert final_answer(GSM8K_THOUSANDS) == "1000"
    assert final_answer(MATH_HALF) == "\\boxed{\\frac{1}{2}}"
    assert final_answer("plain 42") == "plain 42"
