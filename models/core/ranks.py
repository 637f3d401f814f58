"""Which share of a data-parallel run this process trains, and the few collectives the loop needs.

A run on N devices trains as N processes (ranks) of one torch.distributed process group. Every rank
draws the whole epoch from the same generator, then trains its contiguous share of each global batch
(`shard_positions`), so the global batch and the sample order are those of the same run on one device.
`models.core.launch` starts and supervises the ranks; a run on one device is `SINGLE` and never touches
torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0 evaluates, reports epochs, writes checkpoints and exports."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1


SINGLE = Ranks()


def shard_positions(size: int, ranks: Ranks) -> torch.Tensor:
    """This rank's positions in a global batch of `size` images: contiguous, shares differ by at most one."""
    if size < ranks.world:
        raise ValueError(f"a batch of {size} image(s) cannot be shared by {ranks.world} devices; choose a batch "
                         f"size whose last batch keeps at least one image per device, or fewer devices")
    return torch.arange(size).tensor_split(ranks.world)[ranks.rank]


def agree(flag: bool, ranks: Ranks, device: torch.device) -> bool:
    """Rank 0's `flag`, on every rank (so all ranks stop at the same epoch)."""
    if not ranks.parallel:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def sum_across(value: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The sum of `value` over all ranks (a new tensor; `value` is left as it was)."""
    if not ranks.parallel:
        return value
    total = value.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total
