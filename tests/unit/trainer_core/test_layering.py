"""trainer_core stays a pure library: no service imports, and its config imports without torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import trainer_core

FORBIDDEN = ("app", "worker", "migrations", "sqlalchemy", "celery", "fastapi", "starlette", "kombu")
PACKAGE = Path(trainer_core.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return modules


def test_trainer_core_imports_no_service_layer() -> None:
    offenders = {
        f"{path.relative_to(PACKAGE.parent)}: {module}"
        for path in PACKAGE.rglob("*.py")
        for module in _imported_modules(path)
        if module.split(".")[0] in FORBIDDEN
    }
    assert not offenders, sorted(offenders)


def test_config_and_reporting_import_without_torch() -> None:
    script = (
        "import json, sys; import trainer_core.config, trainer_core.reporting, trainer_core.errors; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'peft', 'numpy'))))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == []
