"""Each verifier on hand-made right, wrong and tricky completions (called directly, in the main thread)."""

import pytest

from mcpo_jax import rewards
from mcpo_jax.rewards.extract import final_answer, last_boxed, last_code_block

math_score, choice_score, exact_score, code_score = (rewards.get(n) for n in ("math", "choice", "exact", "code"))


def test_extraction_prefers_tag_then_last_box_then_answer_phrase():
  assert last_boxed(r"\boxed{\frac{1}{2}} and \boxed{3}") == "3"
  assert last_boxed(r"\boxed{\sqrt{\frac{a}{b}}}") == r"\sqrt{\frac{a}{b}}"
  assert last_boxed("no box here") is None
  assert final_answer(r"<answer>\boxed{7}</answer> then \boxed{9}") == "7"
  assert final_answer("Let me think.\nThe answer is 12.\nThat was easy") == "12"
  assert final_answer("work\n\n  B.  ") == "B"
  assert final_answer("2 + 0 = 2") == "2" and final_answer("So, 6 + 8 =") is None
  assert last_code_block("x\n```python\nprint(1)\n```\nand\n```py\nprint(2)\n```") == "print(2)\n"


@pytest.mark.parametrize("completion, right", [
    (r"So the result is \boxed{\frac{1}{2}}.", True),
    (r"\boxed{0.5}", True),
    (r"The answer is \boxed{1/2}. Then some text after it mentioning 7.", True),
    (r"First \boxed{3}, no wait, \boxed{\frac12}", True),      # several boxes: the last counts
    (r"\boxed{\frac12} hmm, actually \boxed{3}", False),
    ("<answer>0.50</answer>", True),
    (r"\boxed{\frac{2}{3}}", False),
    ("I have no idea", False),
])
def test_math(completion, right):
  assert math_score(completion, {"answer": r"\frac{1}{2}"}) == float(right)


def test_math_integers_and_expressions():
  assert math_score(r"$x = \boxed{6}$", {"answer": "6"}) == 1.0
  assert math_score(r"\boxed{1,500}", {"answer": "1500"}) == 1.0
  assert math_score(r"\boxed{2\sqrt{2}}", {"answer": r"\sqrt{8}"}) == 1.0
  assert math_score(r"\boxed{43}", {"answer": "44"}) == 0.0


@pytest.mark.parametrize("completion, right", [
    ("(B)", True), ("B.", True), ("answer: b", True), (r"The answer is \boxed{B}", True),
    ("<answer>B) Carbon dioxide</answer>", True), ("I pick carbon dioxide", False),
    ("Carbon dioxide", True), ("A", False), ("(E)", False), ("A or B", False), ("a cat sat", False),
])
def test_choice(completion, right):
  example = {"answer": "B", "choices": ["Oxygen", "Carbon dioxide", "Nitrogen", "Helium"]}
  assert choice_score(completion, example) == float(right)


def test_exact_normalises_case_space_quotes_and_period():
  example = {"answer": "Zoey is a knave, and Oliver is a knight."}
  assert exact_score("<answer>zoey is  a knave, and Oliver is a knight</answer>", example) == 1.0
  assert exact_score(r"\boxed{\text{Zoey is a knave, and Oliver is a knight}}", example) == 1.0
  assert exact_score("<answer>Zoey is a knight, and Oliver is a knave.</answer>", example) == 0.0
  assert exact_score("<answer>'Yes'</answer>", {"answer": ["yes", "y"]}) == 1.0


def test_formats_reward_only_the_requested_format():
  assert rewards.format_score("<answer>4</answer>", "answer_tag") == 1.0
  assert rewards.format_score("<answer> </answer>", "answer_tag") == 0.0
  assert rewards.format_score(r"\boxed{4}", "answer_tag") == 0.0
  assert rewards.format_score(r"\boxed{4}", "boxed") == 1.0
  assert rewards.format_score("```python\nprint(1)\n```", "code_block") == 1.0
  with pytest.raises(ValueError, match="known formats: answer_tag, boxed, code_block"):
    rewards.format_score("x", "xml")


def test_gym_binarises_partial_credit():
  example = {"gym_dataset": "spell_backward", "gym_config": {}, "answer": "tuan", "prompt": "", "metadata": {}}
  assert rewards.get("gym")("Reversed: <answer>tuan</answer>", example) == 1.0
  assert rewards.get("gym")("<answer>tuam</answer>", example) == 0.0  # reasoning-gym gives 0.75 here


CODE_RIGHT = "Here it is:\n```python\ndef larger(a, b):\n    return max(a, b)\n```\n"


def test_code_asserts_io_and_calls():
  asserts = {"tests": "assert larger(3, 5) == 5\nassert larger(-1, -4) == -1"}
  assert code_score(CODE_RIGHT, asserts) == 1.0
  assert code_score("```python\ndef larger(a, b):\n    return a\n```", asserts) == 0.0
  assert code_score("```python\ndef larger(a, b):\n    return a +\n```", asserts) == 0.0  # syntax error
  humaneval = {"tests": "def check(candidate):\n    assert candidate(1, 2) == 2", "entry_point": "larger"}
  assert code_score(CODE_RIGHT, humaneval) == 1.0
  io = {"tests": {"inputs": ["1 2\n", "10 -3\n"], "outputs": ["3\n", "7"]}}
  assert code_score("```python\na, b = map(int, input().split())\nprint(a + b)\n```", io) == 1.0
  assert code_score("```python\nprint(3)\n```", io) == 0.0
  calls = {"tests": {"fn_name": "double_all", "inputs": [[[1, 2]], [[]]], "outputs": [[[2, 4]], [[]]]}}
  assert code_score("```python\ndef double_all(xs):\n    return [2 * x for x in xs]\n```", calls) == 1.0
  leetcode = "```python\nclass Solution:\n    def double_all(self, xs):\n        return [x + x for x in xs]\n```"
  assert code_score(leetcode, calls) == 1.0


def test_code_reward_hacks_fail():
  asserts = {"tests": "assert larger(3, 5) == 5"}
  assert code_score("```python\nimport sys\nsys.exit(0)\n```", asserts) == 0.0
  assert code_score("```python\nimport os\nos._exit(0)\n```", asserts) == 0.0
  always_equal = ("```python\nclass Any:\n    def __eq__(self, other):\n        return True\n"
                  "def double_all(xs):\n    return Any()\n```")
  calls = {"tests": {"fn_name": "double_all", "inputs": [[[1]]], "outputs": [[[2]]]}}
  assert code_score(always_equal, calls) == 0.0


def test_unknown_verifier_lists_known_ones():
  with pytest.raises(rewards.UnknownVerifierError, match=r"'maths'.*'math'.*: math, choice, exact, gym, code"):
    rewards.get("maths")
