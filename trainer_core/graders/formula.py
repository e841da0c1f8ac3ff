"""The ``multi`` grader's ``calculate_output``: a safe arithmetic expression over sub-grader scores.

Evaluated by ``simpleeval`` (an AST walker with whitelisted nodes; never ``eval``): numbers, the
sub-graders' names, ``+ - * / // % **`` (``^`` is also a power, as in OpenAI's formulas),
comparisons (True counts as 1), ``a if cond else b`` and the functions in ``FORMULA_FUNCTIONS``.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Mapping

from simpleeval import DEFAULT_OPERATORS, InvalidExpression, SimpleEval

from trainer_core.grader_config import FORMULA_FUNCTIONS

_FUNCTIONS = {
    "min": min, "max": max, "abs": abs, "floor": math.floor, "ceil": math.ceil, "exp": math.exp,
    "sqrt": math.sqrt, "log": math.log, "round": round,
}
assert set(_FUNCTIONS) == set(FORMULA_FUNCTIONS)

_ARITHMETIC = (
    ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub, ast.UAdd, ast.Not,
    ast.Eq, ast.NotEq, ast.Gt, ast.Lt, ast.GtE, ast.LtE,
)
_OPERATORS = {node: DEFAULT_OPERATORS[node] for node in _ARITHMETIC} | {ast.Not: operator.not_}


def _python_syntax(formula: str) -> str:
    # "^" is a power in OpenAI's formulas; rewritten (not mapped to BitXor) so it binds like "**".
    return formula.replace("^", "**").strip()


def _evaluator(names: Mapping[str, float]) -> SimpleEval:
    evaluator = SimpleEval(operators=_OPERATORS, functions=_FUNCTIONS, names=dict(names))
    # No attribute access, subscripts, comprehensions or string literals: numbers and names only.
    evaluator.nodes = {
        node: handler for node, handler in evaluator.nodes.items()
        if node in (ast.Expr, ast.Constant, ast.Name, ast.BinOp, ast.UnaryOp, ast.Compare, ast.Call,
                    ast.IfExp, ast.BoolOp)
    }
    return evaluator


def evaluate_formula(formula: str, scores: Mapping[str, float]) -> float:
    """Returns the formula's value for one sample's sub-grader ``scores``; raises ValueError if it fails."""
    try:
        value = _evaluator(scores).eval(_python_syntax(formula))
    except (InvalidExpression, SyntaxError, ArithmeticError, ValueError, TypeError) as exc:
        raise ValueError(f"calculate_output {formula!r}: {exc}") from None
    if isinstance(value, str) or not isinstance(value, int | float):
        raise ValueError(f"calculate_output {formula!r} gave {value!r}, not a number")
    return float(value)


def check_formula(formula: str, names: set[str]) -> None:
    """Raises ValueError when ``formula`` does not parse or uses a name that is no sub-grader."""
    try:
        tree = ast.parse(_python_syntax(formula), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"calculate_output does not parse: {exc.msg} (column {exc.offset})") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and (isinstance(node.value, bool) or not isinstance(
                node.value, int | float)):
            raise ValueError(f"calculate_output: only numbers may be literals, not {node.value!r}")
        if isinstance(node, ast.Name) and node.id not in names and node.id not in _FUNCTIONS:
            known = ", ".join(sorted(names))
            raise ValueError(f"calculate_output uses {node.id!r}, which is not one of the graders ({known})")
    try:
        _evaluator({name: 0.5 for name in names}).eval(_python_syntax(formula))
    except InvalidExpression as exc:
        raise ValueError(f"calculate_output: {exc}") from None
    except (ArithmeticError, ValueError, TypeError):
        pass  # depends on the scores (e.g. log(0)): a per-sample error at grading time, counted there
