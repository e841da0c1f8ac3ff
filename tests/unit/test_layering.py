"""The layering rules of DESIGN.md, checked on every import statement of the tree.

- `trainer_core` is a pure library: none of the service (app, worker, the CLI, migrations) and no
  web, database or queue library; its config imports without torch.
- `app` never imports `worker` (nor the CLI that starts both).
- `worker` imports `trainer_core` and, of `app`, only the modules listed in WORKER_MAY_IMPORT from
  app: the database, storage, settings, the broker configuration, the job-execution domain and the
  services that write what a job produces — never the HTTP layer (routes, main, deps).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICE = ("app", "worker", "tuneyard_cli", "migrations")
TRAINER_CORE_FORBIDDEN = (*SERVICE, "sqlalchemy", "celery", "fastapi", "starlette", "kombu")
APP_FORBIDDEN = ("worker", "tuneyard_cli")
# The modules of `app` a worker may use (a module or a package prefix).
WORKER_MAY_IMPORT = (
    "app.db", "app.storage", "app.settings", "app.broker", "app.jobs", "app.errors",
    "app.services.checkpoints", "app.services.metrics", "app.services.models", "app.services.datasets",
    "app.inference.loading", "app.inference.resolution", "app.schemas.evals",
    # fine-tuning jobs start when their files validate; the deliverer signs with the endpoints' secrets
    "app.services.fine_tuning", "app.services.webhooks",
)


def imported_modules(path: Path) -> set[str]:
    """Returns the absolute module names a file imports (relative imports are not used in the tree)."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
            # `from app import storage` imports the module app.storage
            modules.update(f"{node.module}.{alias.name}" for alias in node.names
                           if (ROOT / node.module.replace(".", "/") / f"{alias.name}.py").is_file())
    return modules


def offenders(package: str, allowed: Callable[[str], bool]) -> list[str]:
    return sorted(f"{path.relative_to(ROOT)}: {module}"
                  for path in (ROOT / package).rglob("*.py")
                  for module in imported_modules(path) if not allowed(module))


def _top(module: str) -> str:
    return module.split(".")[0]


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_trainer_core_imports_no_service_layer() -> None:
    assert not offenders("trainer_core", lambda m: _top(m) not in TRAINER_CORE_FORBIDDEN)


def test_app_never_imports_worker_or_cli() -> None:
    assert not offenders("app", lambda m: _top(m) not in APP_FORBIDDEN)


def test_worker_imports_only_what_design_allows() -> None:
    def allowed(module: str) -> bool:
        if _top(module) in ("tuneyard_cli", "migrations", "fastapi", "starlette"):
            return False
        return _top(module) != "app" or module == "app" or _within(module, WORKER_MAY_IMPORT)

    assert not offenders("worker", allowed)


def test_the_rules_catch_a_violation(tmp_path: Path) -> None:
    """The checker itself: a worker module importing a route, and one importing a package member."""
    bad = tmp_path / "bad.py"
    bad.write_text("from app.routes.runs import router\nfrom app import main\nimport worker.runs\n")
    found = imported_modules(bad)
    assert {"app.routes.runs", "app.main", "worker.runs"} <= found
    assert not _within("app.routes.runs", WORKER_MAY_IMPORT)


def test_config_and_reporting_import_without_torch() -> None:
    script = (
        "import json, sys; import trainer_core.config, trainer_core.reporting, trainer_core.errors; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'peft', 'numpy'))))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == []
