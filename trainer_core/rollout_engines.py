"""Where GRPO/PPO rollouts are sampled: one interface, three engines (the stage's ``rollout.engine``).

- ``local``: the in-process sampler (``trainer_core.generation.sample_completions``), token by
  token with a KV cache through the training model. The embedded default; runs anywhere.
- ``paged``: transformers' continuous batching with a paged KV cache (``generate_batch``), in the
  training process on the training model itself (no weight copy; TRL's ``use_transformers_paged``).
- ``sglang``: an SGLang server (the deployment's, ``TUNEYARD_ROLLOUT_SGLANG_URL``) started with
  ``--enable-lora`` on the same base. Before sampling with new weights the policy adapter is saved
  and loaded under a fresh name, and the previous one unloaded; ``/generate`` returns token ids
  and their log-probs. The server reads the adapter folder by path: worker and server must mount
  the run folders at the same path.

Every engine returns ``Completions`` whose ``logps`` are the engine's own log-probs of the sampled
tokens. The loss always recomputes log-probs with the policy; engines whose numbers can differ from
the trainer's (other kernels, precision, top-p applied before the log-probs) set
``corrects_mismatch`` and the loss weighs each token by the truncated importance ratio
min(pi_train / pi_engine, C) (TRL's vLLM path, verl; REFERENCE "SGLang"). The local sampler is the
training policy itself (weights 1 up to float rounding), so it needs none.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import httpx
import torch
from peft import PeftModel
from torch import nn

from trainer_core.config import RolloutSpec
from trainer_core.errors import TrainingDataError
from trainer_core.generation import Completions, eval_mode, left_pad, sample_completions
from trainer_core.modeling import POLICY_ADAPTER
from trainer_core.reporting import raise_if_stopping


class RolloutEngine(Protocol):
    """Samples completions for prompts with the current policy weights."""

    name: str
    corrects_mismatch: bool

    def sample(
        self, model: nn.Module, prompts: Sequence[Sequence[int]], *, version: int, max_new_tokens: int,
        eos_token_ids: Sequence[int], pad_token_id: int, generator: torch.Generator, temperature: float,
        top_p: float, should_stop: Callable[[], bool] | None = None,
    ) -> Completions:
        """Returns completions for ``prompts``; ``version`` numbers the policy weights (the step).

        ``should_stop`` (a cancel, a lost lease) ends the sampling with StopRequested: the local
        sampler asks it every few tokens, the other engines before they start a batch.
        """

    def close(self) -> None:
        """Releases what the engine holds (server-side adapters)."""


class LocalEngine:
    """The in-process sampler through the training model (see the module docstring)."""

    name = "local"
    corrects_mismatch = False

    def sample(
        self, model: nn.Module, prompts: Sequence[Sequence[int]], *, version: int, max_new_tokens: int,
        eos_token_ids: Sequence[int], pad_token_id: int, generator: torch.Generator, temperature: float,
        top_p: float, should_stop: Callable[[], bool] | None = None,
    ) -> Completions:
        return sample_completions(
            model, prompts, max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids,
            pad_token_id=pad_token_id, generator=generator, temperature=temperature, top_p=top_p,
            should_stop=should_stop,
        )

    def close(self) -> None:
        """Nothing held."""


def completions_from_tokens(
    prompts: Sequence[Sequence[int]], generated: Sequence[Sequence[int]], logps: Sequence[Sequence[float]],
    *, eos_token_ids: Sequence[int], pad_token_id: int, max_new_tokens: int, device: torch.device,
) -> Completions:
    """Returns ``Completions`` from per-prompt generated tokens and their log-probs (engine outputs).

    A completion ends at its first eos (kept); one without eos is ``truncated`` when it used all
    ``max_new_tokens``.
    """
    eos = set(eos_token_ids)
    rows: list[list[int]] = []
    row_logps: list[list[float]] = []
    truncated: list[bool] = []
    for tokens, values in zip(generated, logps, strict=True):
        tokens = list(tokens)[:max_new_tokens]
        end = next((i + 1 for i, t in enumerate(tokens) if t in eos), None)
        kept = tokens if end is None else tokens[:end]
        rows.append(kept)
        row_logps.append(list(values)[: len(kept)])
        truncated.append(end is None and len(kept) >= max_new_tokens)
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    values = torch.zeros((len(rows), width), dtype=torch.float32)
    for b, (row, row_values) in enumerate(zip(rows, row_logps, strict=True)):
        ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, : len(row)] = True
        values[b, : len(row_values)] = torch.tensor(row_values, dtype=torch.float32)
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id)
    return Completions(
        prompt_ids=prompt_ids.to(device), prompt_mask=prompt_mask.to(device), completion_ids=ids.to(device),
        completion_mask=mask.to(device), logps=values.to(device),
        truncated=torch.tensor(truncated, device=device),
    )


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class PagedEngine:
    """Continuous batching with a paged KV cache in the training process (see the module docstring).

    ``generate_batch`` samples with the global torch RNG, so the step's generator seeds a forked RNG
    for the call: a rollout stays a function of (weights, prompts, seed) and resume stays exact.
    Its log-probs are those of the sampling distribution (after top-p), hence ``corrects_mismatch``.
    """

    name = "paged"
    corrects_mismatch = True

    def sample(
        self, model: nn.Module, prompts: Sequence[Sequence[int]], *, version: int, max_new_tokens: int,
        eos_token_ids: Sequence[int], pad_token_id: int, generator: torch.Generator, temperature: float,
        top_p: float, should_stop: Callable[[], bool] | None = None,
    ) -> Completions:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        raise_if_stopping(should_stop)

        device = _device(model)
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=top_p,
            eos_token_id=list(eos_token_ids), pad_token_id=pad_token_id,
        )
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        devices = [device.index or 0] if device.type == "cuda" else []
        inner = model.get_base_model() if isinstance(model, PeftModel) else model
        implementation = inner.config._attn_implementation
        cache = ContinuousBatchingConfig(return_logprobs=True)
        if device.type != "cuda":
            # Off CUDA the cache is not sized from free GPU memory: give it just what this batch needs.
            longest = max(len(p) for p in prompts) + max_new_tokens
            cache = ContinuousBatchingConfig(return_logprobs=True, page_size=64, max_batch_tokens=256,
                                             num_blocks=len(prompts) * math.ceil(longest / 64) + 1)
        with torch.random.fork_rng(devices=devices), eval_mode(model), torch.no_grad():
            torch.manual_seed(seed)
            try:
                outputs = inner.generate_batch(
                    inputs=[list(p) for p in prompts], generation_config=config,
                    continuous_batching_config=cache,
                    progress_bar=False, warmup=False,
                )
            finally:
                # generate_batch switches attention to its paged variant; training needs the original.
                inner.set_attn_implementation(implementation)
        ordered = [outputs[key] for key in sorted(outputs, key=lambda k: int(k.rsplit("_", 1)[-1]))]
        failed = [o.error for o in ordered if o.error]
        if failed:
            raise RuntimeError(f"paged rollout engine failed: {failed[0]}")
        return completions_from_tokens(
            prompts, [o.generated_tokens for o in ordered], [o.logprobs for o in ordered],
            eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, max_new_tokens=max_new_tokens,
            device=device,
        )

    def close(self) -> None:
        """Nothing held: the cache lives for one ``generate_batch`` call."""


class SGLangEngine:
    """Rollouts on an SGLang server with the policy adapter reloaded per weight version.

    Never run in this project's tests (no SGLang here); the HTTP shapes follow SGLang v0.5.4
    (REFERENCE "SGLang"): ``/load_lora_adapter``, ``/unload_lora_adapter``, and ``/generate`` with
    ``input_ids``, ``sampling_params``, ``return_logprob`` and ``lora_path``, answering per prompt
    ``output_ids`` and ``meta_info.output_token_logprobs`` = [(logprob, token_id, text)].
    """

    name = "sglang"
    corrects_mismatch = True

    def __init__(
        self, url: str, adapter_dir: Path, name_prefix: str, timeout: float = 600.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._client = httpx.Client(base_url=url.rstrip("/"), timeout=httpx.Timeout(timeout, connect=5.0),
                                    transport=transport)
        self._adapter_dir = adapter_dir
        self._prefix = name_prefix
        self._loaded: str | None = None
        self._loaded_version: int | None = None

    def _post(self, path: str, body: dict) -> httpx.Response:
        try:
            response = self._client.post(path, json=body)
        except httpx.TransportError as exc:
            where = self._client.base_url
            raise RuntimeError(f"SGLang rollout server at {where} unreachable: {exc}") from exc
        if response.status_code >= 400:
            raise RuntimeError(f"SGLang {path} failed ({response.status_code}): {response.text[:500]}")
        return response

    def _sync(self, model: nn.Module, version: int) -> str:
        """Returns the adapter name serving weights ``version``, loading it first if it is new."""
        if self._loaded is not None and self._loaded_version == version:
            return self._loaded
        if not isinstance(model, PeftModel):
            raise TrainingDataError("rollout.engine 'sglang' reloads a LoRA adapter; this policy has none")
        name = f"{self._prefix}-v{version}"
        folder = self._adapter_dir / name
        shutil.rmtree(folder, ignore_errors=True)
        model.save_pretrained(folder, selected_adapters=[POLICY_ADAPTER], save_embedding_layers=False)
        # peft writes a selected non-default adapter in a sub-folder; the default one at the top.
        self._post("/load_lora_adapter", {"lora_name": name, "lora_path": str(folder)})
        self.close()
        self._loaded, self._loaded_version = name, version
        return name

    def sample(
        self, model: nn.Module, prompts: Sequence[Sequence[int]], *, version: int, max_new_tokens: int,
        eos_token_ids: Sequence[int], pad_token_id: int, generator: torch.Generator, temperature: float,
        top_p: float, should_stop: Callable[[], bool] | None = None,
    ) -> Completions:
        raise_if_stopping(should_stop)
        adapter = self._sync(model, version)
        seed = int(torch.randint(0, 2**31, (1,), generator=generator, device=generator.device))
        body = {
            "input_ids": [list(p) for p in prompts],
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                                "stop_token_ids": list(eos_token_ids), "sampling_seed": seed},
            "return_logprob": True,
            "lora_path": [adapter] * len(prompts),
        }
        replies = self._post("/generate", body).json()
        generated = [reply["output_ids"] for reply in replies]
        logps = [[entry[0] for entry in reply["meta_info"]["output_token_logprobs"]] for reply in replies]
        return completions_from_tokens(
            prompts, generated, logps, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id,
            max_new_tokens=max_new_tokens, device=_device(model),
        )

    def close(self) -> None:
        """Unloads the adapter this engine loaded last (if any)."""
        if self._loaded is not None:
            with contextlib.suppress(RuntimeError):
                self._post("/unload_lora_adapter", {"lora_name": self._loaded})
            shutil.rmtree(self._adapter_dir / self._loaded, ignore_errors=True)
            self._loaded = None


def build_engine(
    spec: RolloutSpec, *, sglang_url: str | None, work_dir: Path, name_prefix: str
) -> RolloutEngine:
    """Returns the engine a stage asks for; raises TrainingDataError when this worker cannot run it."""
    if spec.engine == "local":
        return LocalEngine()
    if spec.engine == "paged":
        return PagedEngine()
    if not sglang_url:
        raise TrainingDataError(
            "rollout.engine 'sglang' needs an SGLang server for rollouts on this worker "
            "(TUNEYARD_ROLLOUT_SGLANG_URL); use engine 'local' or 'paged'"
        )
    return SGLangEngine(sglang_url, work_dir / "rollout-adapters", name_prefix)
