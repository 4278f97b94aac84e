"""torchrun detection, process groups, rank-0 I/O, BN statistics averaged across ranks."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..errors import InputError

log = logging.getLogger(__name__)

__all__ = [
    "DistInfo",
    "any_rank",
    "average_bn_stats",
    "barrier",
    "ranks_agree",
    "setup",
    "teardown",
]


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def _device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError("device cuda was requested but no CUDA device is available",
                             params=("device",))
        if requested == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device(requested)
    return torch.device("cpu")


def setup(requested_device: str = "auto") -> DistInfo:
    """Read torchrun's environment; start the process group (nccl on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(requested_device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        log.debug("rank %d/%d on %s (%s)", rank, world, device, backend)
    return DistInfo(rank, world, local_rank, device)


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def average_bn_stats(model: nn.Module, info: DistInfo) -> None:
    """Average every BatchNorm's running mean/var over the ranks (before eval and deploy)."""
    if not info.enabled:
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            for buf in (m.running_mean, m.running_var):
                if buf is None:
                    continue
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                buf.div_(info.world)


def state_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer's bytes (bitwise identity check)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def ranks_agree(model: nn.Module, info: DistInfo) -> bool:
    """True when every rank holds bitwise the same parameters and buffers."""
    if not info.enabled:
        return True
    digest = state_digest(model)
    gathered: list[str | None] = [None] * info.world
    dist.all_gather_object(gathered, digest)
    return all(g == digest for g in gathered)


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True when ``flag`` is true on at least one rank (every rank gets the same answer)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
