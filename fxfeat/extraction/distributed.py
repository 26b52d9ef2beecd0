"""The processes of one extraction: one, or many under ``torchrun`` (one machine or several).

Under ``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment) the process group is initialised with the gloo
backend, which carries the few Python objects the ranks exchange outside the loop (the manifest check, the parts
to redo, the final counts) on CPUs and GPUs alike; the loop itself uses no collectives. A process group the caller
already initialised is used as it is and left open.

Example:
    >>> ranks = Ranks.from_environment()   # no torchrun here: one process
    >>> ranks.rank, ranks.world, ranks.all_gather("counts"), ranks.share(lambda: 42)
    (0, 1, ['counts'], 42)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist

__all__ = ["Ranks"]


class Ranks:
    """This process's rank among ``world`` processes, and the few collectives the extraction needs."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, local_world: int = 1,
                 group: Any = None, owned: bool = False):
        self.rank, self.world, self.local_rank, self.local_world = rank, world, local_rank, local_world
        self._group, self._owned = group, owned

    @classmethod
    def from_environment(cls) -> Ranks:
        """One process, the process group already initialised, or the one ``torchrun``'s environment describes."""
        local = (int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        if dist.is_available() and dist.is_initialized():
            group = dist.new_group(backend="gloo")
            return cls(dist.get_rank(), dist.get_world_size(), *local, group=group)
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            dist.init_process_group(backend="gloo", timeout=timedelta(hours=6))  # the final barrier waits for all
            return cls(dist.get_rank(), dist.get_world_size(), *local, group=dist.group.WORLD, owned=True)
        return cls()

    def share(self, compute: Callable[[], Any]) -> Any:
        """``compute()`` run on rank 0 and its result given to every rank; an exception raised there is raised on
        every rank (the others would otherwise wait for rank 0 forever)."""
        result: list[Any] = [None]
        if self.rank == 0:
            try:
                result = [("value", compute())]
            except Exception as error:  # handed to every rank, raised there
                result = [("error", error)]
        if self.world > 1:
            dist.broadcast_object_list(result, src=0, group=self._group)
        kind, value = result[0]
        if kind == "error":
            raise value
        return value

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order."""
        if self.world == 1:
            return [value]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, value, group=self._group)
        return gathered

    def close(self) -> None:
        """Leave the process group if this object created it."""
        if self._owned and dist.is_initialized():
            dist.destroy_process_group()
