"""The production stack description: docker compose accepts it and it wires what DESIGN.md asks for."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


def _compose_command() -> list[str] | None:
    plugin = shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True)
    if plugin and plugin.returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.parametrize("profile", [None, "serve"])
def test_docker_compose_config_validates(profile: str | None) -> None:
    command = _compose_command()
    if command is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have docker compose or docker-compose (make system-deps installs it)")
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    args = [*command, "-f", str(COMPOSE), *(["--profile", profile] if profile else []), "config", "-q"]
    result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_stack_has_the_services_and_gpu_wiring() -> None:
    stack = yaml.safe_load(COMPOSE.read_text())
    services = stack["services"]
    assert {"postgres", "redis", "api", "worker-gpu0", "sglang"} <= set(services)
    assert services["sglang"]["profiles"] == ["serve"]
    assert "--enable-lora" in services["sglang"]["command"]
    gpu = services["worker-gpu0"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and len(gpu["device_ids"]) == 1  # one worker per GPU
    assert "train" in " ".join(services["worker-gpu0"]["command"])
    # One storage volume shared by the API, the workers and SGLang (checkpoints are read by path).
    for name in ("api", "worker-cpu", "worker-gpu0", "sglang"):
        assert any(v.startswith("storage:/data") for v in services[name]["volumes"]), name
