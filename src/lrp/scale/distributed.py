"""Many processes: the rank, world size and device from torchrun's environment, and how chunks are shared.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and the rendezvous address) for every process; the
same command then works on one machine and across nodes. The backend is NCCL when the ranks run on CUDA and
gloo on the CPU. Without ``WORLD_SIZE`` (or with 1) nothing is initialised: one process does all the chunks.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

# generous: rank 0 lists the inputs while the others wait, and ranks may end a few chunks apart
TIMEOUT = datetime.timedelta(hours=4)


@dataclass
class Ranks:
    """This process's place among the ranks of a run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value``, on every rank (a picklable object)."""
        if not self.initialised:
            return value
        box = [value if self.main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.initialised:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.initialised:
            torch.distributed.destroy_process_group()
            self.initialised = False


def from_environment() -> Ranks:
    """This process's :class:`Ranks` from torchrun's variables (all 0 / 1 when run without torchrun)."""
    return Ranks(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def rank_device(device: str) -> str:
    """The device of this rank: ``cuda`` without an index becomes ``cuda:LOCAL_RANK`` when there are ranks."""
    ranks = from_environment()
    if device == "cuda" and ranks.world > 1:
        return f"cuda:{ranks.local_rank % max(1, torch.cuda.device_count())}"
    return device


def start(device: torch.device) -> Ranks:
    """Join the process group when torchrun started several ranks (NCCL on CUDA, else gloo)."""
    ranks = from_environment()
    if ranks.world > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.distributed.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
        else:
            torch.distributed.init_process_group("gloo", timeout=TIMEOUT)
        ranks.initialised = True
    return ranks


def share(chunks: Sequence[int], ranks: Ranks) -> list[int]:
    """This rank's chunks: every ``world``-th of those left to do, so that no two ranks write one chunk and
    the work stays even after a resume."""
    return list(chunks)[ranks.rank::ranks.world]
