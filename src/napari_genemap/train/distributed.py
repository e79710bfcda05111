"""Training on several processes with ``torchrun --nproc_per_node N`` (DistributedDataParallel), unchanged
otherwise: without torchrun's environment (``WORLD_SIZE`` unset or 1) everything here is a no-op.

The scheme, chosen so that N processes compute the same step as one process with the same global batch:
every rank draws the *whole* batch's random choices from identically seeded generators, then computes the loss
on its own equal shard (`Ranks.shard`); DDP averages the gradients, which equals the gradient of the global
batch's mean loss. Only rank 0 writes checkpoints, previews and progress; a cancel on any rank stops all
(`Ranks.any`), so none waits forever for the others. Backend: gloo on CPUs, NCCL on CUDA (one GPU per rank,
``LOCAL_RANK``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import GenemapInputError


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """The process that writes (checkpoints, previews, progress)."""
        return self.rank == 0

    def shard(self, batch: int) -> slice:
        """This rank's share of a global batch of ``batch`` samples."""
        size = batch // self.world
        return slice(self.rank * size, (self.rank + 1) * size)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (cancelling)."""
        if not self.active:
            return flag
        import torch
        import torch.distributed as dist

        value = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def mean(self, value: float) -> float:
        """The mean of a number over the ranks (a shard's loss -> the global batch's)."""
        if not self.active:
            return value
        import torch
        import torch.distributed as dist

        total = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(total)
        return float(total.item()) / self.world

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()


def environment_ranks() -> Ranks:
    """This process's place as torchrun's environment variables say (no process group is joined)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    return Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def start(device, batch: int) -> Ranks:
    """Join torchrun's process group when launched by it (``device``: this process's torch device, moved to
    its own GPU on CUDA); ``batch`` must split evenly over the ranks."""
    ranks = environment_ranks()
    if not ranks.active:
        return ranks
    import torch
    import torch.distributed as dist

    world = ranks.world
    if batch % world:
        raise GenemapInputError(f"batch {batch} does not split over {world} processes; use a multiple of {world}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(ranks.local_rank)
    return ranks


def device_for(device, ranks: Ranks):
    """This rank's device: its own GPU under torchrun on CUDA, else ``device``."""
    import torch

    if ranks.active and device.type == "cuda":
        return torch.device("cuda", ranks.local_rank)
    return device


def stop(ranks: Ranks) -> None:
    """Leave the process group together: the others wait while rank 0 validates and saves, so none exits
    (closing its connections) while another still talks to it."""
    if ranks.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
