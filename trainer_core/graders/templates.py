"""Samples and items as graders see them, and ``{{item.x}}`` / ``{{sample.output_text}}`` templates."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from trainer_core.grader_config import TEMPLATE


class GradingError(ValueError):
    """One sample could not be graded (missing field, sandbox error, bad judge reply): it scores 0."""


def make_sample(output_text: str) -> dict[str, Any]:
    """Returns the ``sample`` a grader sees: the completion text and, when it parses, its JSON."""
    try:
        output_json = json.loads(output_text)
    except ValueError:
        output_json = None
    return {"output_text": output_text, "output_json": output_json}


def _lookup(path: str, sample: Mapping[str, Any], item: Mapping[str, Any]) -> Any:
    root, *fields = path.split(".")
    value: Any = sample if root == "sample" else item
    for depth, name in enumerate(fields):
        if not isinstance(value, Mapping) or name not in value or value[name] is None:
            where = ".".join([root, *fields[: depth + 1]])
            if root == "sample" and fields[0] == "output_json" and depth == 0:
                raise GradingError("{{sample.output_json}}: the completion is not valid JSON")
            raise GradingError(f"template field {{{{{where}}}}} is missing from the {root}")
        value = value[name]
    return value


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def render(template: str, sample: Mapping[str, Any], item: Mapping[str, Any]) -> str:
    """Returns ``template`` with every placeholder filled; raises GradingError for a missing field."""
    return TEMPLATE.sub(lambda match: _text(_lookup(match.group(1), sample, item)), template)
