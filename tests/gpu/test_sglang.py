"""A REAL SGLang server on the GPU: the SGLang inference backend (dynamic LoRA loading, chat, stream,
LRU unloading) and the SGLang teacher for SAD (prompt top-k log-probs vs the same model run locally).

SGLang pins its own torch/CUDA build, so it never lives in the project's environment: set
`TUNEYARD_SGLANG_PYTHON` to an interpreter that has it (default: `python3` on PATH). Skipped where
there is no CUDA GPU or no such interpreter.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from app.inference.local import LocalBackend
from app.inference.sglang import SGLangBackend
from app.inference.types import ResolvedModel
from tests.e2e.service import free_port
from tests.inference_support import finetuned_exports, greeting_records
from trainer_core.config import SamplingParams

SGLANG_PYTHON = os.environ.get("TUNEYARD_SGLANG_PYTHON", shutil.which("python3") or "python3")
START_TIMEOUT_S = 600
HELLO = [{"role": "user", "content": "what is the city hello"}]


def _sglang_available() -> bool:
    try:
        return (
            subprocess.run(
                [SGLANG_PYTHON, "-c", "import sglang"], capture_output=True, timeout=120
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        torch.cuda.is_available() and not _sglang_available(),
        reason=f"no sglang for {SGLANG_PYTHON} (set TUNEYARD_SGLANG_PYTHON)",
    ),
]


@pytest.fixture(scope="module")
def gpu_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Returns a tiny Llama with head_dim 64, a size SGLang's attention kernels support."""
    from trainer_core.tiny import build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("sglang-base") / "tiny-llama", hidden_size=256, num_heads=4
    )


@pytest.fixture(scope="module")
def adapters(gpu_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Returns two LoRA adapters of the greeting task over the base (trained with the real pipeline)."""
    first = finetuned_exports(gpu_base_dir, tmp_path_factory.mktemp("sglang-ft-a"))["adapter"]
    second = tmp_path_factory.mktemp("sglang-ft-b") / "adapter"
    shutil.copytree(first, second)
    return {"ckpt_a": first, "ckpt_b": second}


@pytest.fixture(scope="module")
def sglang_url(
    gpu_base_dir: Path, adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("sglang-log") / "sglang.log"
    process = subprocess.Popen(
        [
            SGLANG_PYTHON,
            "-m",
            "sglang.launch_server",
            "--model-path",
            str(gpu_base_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--enable-lora",
            "--max-lora-rank",
            "8",
            "--lora-target-modules",
            "all",
            "--max-loras-per-batch",
            "2",
            "--mem-fraction-static",
            "0.3",
            "--disable-cuda-graph",
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"sglang exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"sglang did not start in {START_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _models(base_dir: Path, adapters: dict[str, Path]) -> tuple[ResolvedModel, dict[str, ResolvedModel]]:
    base = ResolvedModel(id="tiny-llama", kind="base", base_model="tiny-llama", base_path=base_dir)
    tuned = {
        name: ResolvedModel(
            id=name, kind="adapter", base_model="tiny-llama", base_path=base_dir, checkpoint_path=path
        )
        for name, path in adapters.items()
    }
    return base, tuned


def test_backend_serves_base_and_adapters_loaded_on_demand(
    sglang_url: str, gpu_base_dir: Path, adapters: dict[str, Path]
) -> None:
    base, tuned = _models(gpu_base_dir, adapters)
    greedy = SamplingParams(max_tokens=8, temperature=0)

    async def scenario() -> tuple[str, list[str], str, list[str]]:
        backend = SGLangBackend(sglang_url, max_loaded_adapters=1)
        try:
            base_text = (await backend.generate(base, HELLO, greedy)).choices[0].text
            texts = [
                (await backend.generate(tuned[n], HELLO, greedy)).choices[0].text
                for n in ("ckpt_a", "ckpt_b")
            ]
            streamed = "".join([d.text async for d in backend.stream(tuned["ckpt_a"], HELLO, greedy)])
            return base_text, texts, streamed, [m.id for m in backend.loaded_models()]
        finally:
            await backend.aclose()

    base_text, texts, streamed, loaded = asyncio.run(scenario())
    local = LocalBackend(cache_bytes=10**9)
    reference = asyncio.run(local.generate(tuned["ckpt_a"], HELLO, greedy)).choices[0].text
    assert texts == [reference] * 2, "SGLang with the adapter answers as transformers + peft does"
    assert streamed == reference
    assert base_text != reference, "the adapter changes the answer"
    assert loaded == ["ckpt_a"], "with one adapter slot, ckpt_b was unloaded when ckpt_a came back"


def test_sglang_teacher_matches_the_local_models_top_k(sglang_url: str, gpu_base_dir: Path) -> None:
    from trainer_core.data.render import render_sft
    from trainer_core.modeling import load_tokenizer
    from trainer_core.teachers import LocalTeacher, SGLangTeacher

    tokenizer = load_tokenizer(gpu_base_dir)
    teacher = SGLangTeacher(sglang_url, top_k=5)
    teacher.check_vocabulary(tokenizer)

    examples = [render_sft(tokenizer, r, 256, "right") for r in greeting_records(4, seed=3)]
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, : len(example)] = torch.tensor(example.input_ids)
        mask[row, : len(example)] = 1

    served = teacher.distributions(ids, mask)
    local = (
        LocalTeacher(gpu_base_dir, top_k=5, device="cuda")
        .distributions(ids.cuda(), mask.cuda())
        .to(torch.device("cpu"))
    )
    both = served.available & local.available
    assert both.sum() > 0
    top1_agree = (served.teacher.token_ids[..., 0] == local.teacher.token_ids[..., 0])[both].float().mean()
    assert top1_agree >= 0.9, f"top-1 agreement {float(top1_agree):.2f}"
    gap = (served.teacher.logprobs[..., 0] - local.teacher.logprobs[..., 0])[both].abs().max()
    assert gap < 0.1, f"top-1 log-prob differs by {float(gap):.3f} (bf16 serving vs local)"
