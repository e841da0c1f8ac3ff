"""Reward registry: each function, extraction rules, combination, errors, and no torch import."""

import subprocess
import sys

import pytest

from trainer_core.rewards import (
    REWARD_TYPES,
    combined_reward,
    contains,
    exact_match,
    extract_final_answer,
    format_reward,
    get_reward,
    length_penalty,
    normalize_answer,
    numeric_match,
    regex,
)


def test_reward_types_match_the_config_names() -> None:
    assert REWARD_TYPES == ("exact_match", "numeric_match", "regex", "contains", "format", "length_penalty")


def test_rewards_module_does_not_import_torch() -> None:
    code = "import sys, trainer_core.rewards; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The result is \\boxed{\\frac{1}{2}} so done", "\\frac{1}{2}"),
        ("Natalia sold 48 + 24 = 72 clips.\n#### 72", " 72"),
        ("<think>Answer: 3</think>\nreasoning...\nFinal answer: Paris.\nThanks", " Paris."),
        ("just text", "just text"),
    ],
)
def test_extract_final_answer(text: str, expected: str) -> None:
    assert extract_final_answer(text) == expected


def test_normalize_answer() -> None:
    assert normalize_answer("  The   Eiffel\nTower!. ") == "the eiffel tower"


def test_exact_match() -> None:
    assert exact_match("  paris. ", "Paris") == 1.0
    assert exact_match("<think>maybe Rome</think> Answer: PARIS", "#### paris") == 1.0
    assert exact_match("\\boxed{42}", "42") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0
    with pytest.raises(ValueError, match="answer"):
        exact_match("x", None)


def test_numeric_match() -> None:
    assert numeric_match("so 3 + 4 = 7, total 1,234.0 apples", "1234") == 1.0
    assert numeric_match("#### -0.5", "-1/2 is -0.5") == 1.0
    assert numeric_match("about 3.14", "3.14159") == 0.0
    assert numeric_match("about 3.14", "3.14159", tolerance=0.01) == 1.0
    assert numeric_match("no digits here", "5") == 0.0
    with pytest.raises(ValueError, match="no number"):
        numeric_match("5", "five")


def test_regex_and_contains() -> None:
    assert regex("call tool(x=1)", None, pattern=r"tool\(x=\d\)") == 1.0
    assert regex("nothing", None, pattern=r"tool") == 0.0
    assert contains("The  Capital is PARIS.", "paris") == 1.0
    assert contains("The capital is Paris.", None, text="capital   is") == 1.0
    assert contains("The capital is Paris.", "Rome") == 0.0


def test_format_reward() -> None:
    assert format_reward("<think>\nstep 1\nstep 2\n</think>\nThe answer is 4.", None) == 1.0
    assert format_reward("The answer is 4.", None) == 0.0
    assert format_reward("<think>only thinking</think>   ", None) == 0.0
    custom = r"<answer>\d+</answer>"
    assert format_reward("<answer>12</answer>", None, pattern=custom) == 1.0
    assert format_reward("text <answer>12</answer>", None, pattern=custom) == 0.0


def test_length_penalty() -> None:
    assert length_penalty("x" * 10, None, max_length=10, penalty_per_char=0.5) == 0.0
    # 4 characters beyond 10, 0.5 each.
    assert length_penalty("x" * 14, None, max_length=10, penalty_per_char=0.5) == -2.0


def test_combined_reward_weights_and_reports_each_function() -> None:
    score = combined_reward(
        [
            ("exact_match", 2.0, {}),
            ("format", 0.5, {}),
            ("length_penalty", 1.0, {"max_length": 20, "penalty_per_char": 0.1}),
            ("regex", 1.0, {"pattern": "think"}),
            ("regex", 3.0, {"pattern": "nope"}),
        ]
    )
    completion = "<think>hmm</think> Answer: 7"  # 7 + 3 + 8 + 1 + 7 + 2 = 28 characters: 8 beyond 20
    total, per_function = score(completion, "7")
    assert per_function == pytest.approx(
        {"exact_match": 1.0, "format": 1.0, "length_penalty": -0.8, "regex": 1.0, "regex_2": 0.0}
    )
    assert total == pytest.approx(2.0 * 1.0 + 0.5 * 1.0 - 0.8 + 1.0 + 0.0)


def test_unknown_names_and_bad_params_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="'bleu'"):
        get_reward("bleu")
    with pytest.raises(ValueError, match="'bleu'"):
        combined_reward([("bleu", 1.0, {})])
    with pytest.raises(ValueError, match="numeric_match"):
        combined_reward([("numeric_match", 1.0, {"tol": 0.1})])
    with pytest.raises(ValueError, match="regex"):
        combined_reward([("regex", 1.0, {})])  # pattern is required
    with pytest.raises(ValueError, match="not a valid regex"):
        combined_reward([("format", 1.0, {"pattern": "(unclosed"})])
    with pytest.raises(ValueError):
        combined_reward([])


_SCORE_IN_CHILD = """
import sys, threading, time
from trainer_core.rewards import combined_reward
from trainer_core.errors import TrainingDataError
beats = []
threading.Thread(target=lambda: [beats.append(time.sleep(0.05)) for _ in range(400)], daemon=True).start()
score = combined_reward([("regex", 1.0, {"pattern": sys.argv[1]})])
try:
    print(score(sys.argv[2], None)[0])
except TrainingDataError as exc:
    print("user error:", exc)
print("heartbeats", len(beats))
"""


@pytest.mark.parametrize(("pattern", "completion"), [
    ("(.+)+\u2603", "a b c " * 400 + "\u2600"),  # the attack: Python's re backtracks for ever here
    ("(a|aa)+$", "a" * 60 + "b"),  # exponential on every engine: the time bound ends it
])
def test_user_patterns_are_time_bound_and_leave_the_heartbeat_running(pattern: str, completion: str) -> None:
    done = subprocess.run([sys.executable, "-c", _SCORE_IN_CHILD, pattern, completion], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    first, beats = done.stdout.strip().splitlines()
    assert first == "0.0" or (first.startswith("user error:") and "catastrophic backtracking" in first)
    if first != "0.0":
        assert int(beats.split()[1]) >= 10  # the matcher released the GIL while it ran


def test_reward_errors_from_the_data_are_user_errors() -> None:
    from trainer_core.errors import TrainingDataError

    with pytest.raises(TrainingDataError, match="reference answer"):
        exact_match("4", None)
