"""One stage on several processes: the ranks of a torchrun gang, FSDP2 sharding and the few collectives
the loop needs.

Every rank runs the same ``train_stage`` over its share of each micro-batch; only rank 0 reports.
Single-process runs use ``SINGLE`` and never touch ``torch.distributed``, so the embedded default
needs no process group and nothing new installed.

Collectives waiting on a rank that died are bounded by the process group's timeout (torchrun also
tears the gang down when one rank exits non-zero), so a dead rank ends the attempt instead of
hanging it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


@dataclass(frozen=True)
class Ranks:
    """Which process of how many this is (rank 0 reports, writes checkpoints and exports)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = Ranks()


def start_process_group(device: torch.device, timeout_seconds: float) -> Ranks:
    """Returns this process's ranks after joining the torchrun gang (NCCL on CUDA, gloo on CPU).

    torchrun's environment (MASTER_ADDR, RANK, WORLD_SIZE) tells torch where the gang meets.
    """
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds))
    return Ranks(dist.get_rank(), dist.get_world_size())


def end_process_group(ranks: Ranks) -> None:
    """Leaves the gang (a no-op for a single process)."""
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    """Waits until every rank got here (a no-op for a single process)."""
    if ranks.distributed:
        dist.barrier()


def shard_model(model: nn.Module, device: torch.device) -> None:
    """Shards ``model`` in place with FSDP2: each decoder layer, then the root (embeddings, norm, head).

    Decoder layers are the classes transformers names in ``_no_split_modules``. The root's weights
    are gathered in the root's forward, so a sharded model always runs it (``output_projection``
    says None for it). On CUDA the
    all-gathered parameters are bf16 (a frozen bf16 base and fp32 LoRA weights share one layer's
    group, which FSDP2 all-gathers in one dtype) and gradients reduce in fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_classes = set(getattr(inner, "_no_split_modules", None) or [])
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if device.type == "cuda" else MixedPrecisionPolicy())
    layers = [m for m in inner.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(f"{type(inner).__name__} names no decoder layer classes (_no_split_modules); "
                         "cannot shard it per layer")
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def reshard(model: nn.Module) -> None:
    """Frees the gathered weights a forward without backward (evaluation, reference log-probs) left.

    FSDP2 keeps the root's weights gathered after its forward until the backward; without one they
    would stay registered in place of the sharded parameters the optimizer holds. A no-op for a
    model that is not sharded.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def sum_across(values: list[float], ranks: Ranks, device: torch.device) -> list[float]:
    """Returns each value summed over every rank (the values themselves for a single process)."""
    if not ranks.distributed:
        return values
    # float64 so counts and sums of per-token losses add up exactly as one process would.
    buffer = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.tolist()


def agree(flag: bool, ranks: Ranks, device: torch.device) -> bool:
    """Returns rank 0's flag on every rank (only rank 0 reads the reporter's stop request)."""
    if not ranks.distributed:
        return flag
    buffer = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.broadcast(buffer, src=0)
    return bool(buffer.item())


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """Returns the whole tensor of a sharded parameter or gradient (a collective for DTensors)."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def copy_full_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copies a whole tensor into a parameter, keeping only this rank's shard of a sharded one."""
    if isinstance(param, DTensor):
        # Every rank holds the same full value, so each slices its shard locally (no communication).
        value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements,
                                  src_data_rank=None)
    param.copy_(value)
