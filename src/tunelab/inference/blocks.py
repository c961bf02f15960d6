"""The KV cache's memory: one preallocated pool of fixed-size blocks per layer, and its allocator.

PagedAttention (Kwon et al., 2023, §4.1–4.2): a sequence's keys and values live in blocks of
`page` tokens anywhere in the pool, listed in order by its block table. Blocks are handed out
as a sequence grows and taken back when it ends or is preempted, so what a sequence holds is
its live tokens plus less than one block.
"""

from __future__ import annotations

from tunelab.errors import TunelabError

CPU_KV_BUDGET_TOKENS = 8192  # the CPU has no free-memory probe worth trusting; a fixed, small pool
GPU_MEMORY_FRACTION = 0.9  # of the memory free when the engine starts, for KV + workspace


class BlockPool:
    """Free-list allocator over block ids 1..num_blocks-1. Block 0 is scratch, never handed out:
    the padded rows of a captured decode step write their keys there."""

    def __init__(self, num_blocks: int, page: int):
        if num_blocks < 2:
            raise TunelabError(f"kv_budget_tokens: the KV pool needs at least one block of {page} tokens")
        self.num_blocks, self.page = num_blocks, page
        self._free = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first

    @property
    def capacity(self) -> int:
        """Blocks that sequences can hold."""
        return self.num_blocks - 1

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.capacity - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.page)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"KV pool: {n} blocks asked, {len(self._free)} free")  # the scheduler checks first
        return [self._free.pop() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


def pool_blocks(kv_budget_tokens: int | None, page: int, bytes_per_token: int, device, workspace_bytes: int,
                demand_tokens: int | None = None) -> int:
    """Blocks for a budget in tokens; without one, CPU_KV_BUDGET_TOKENS on the CPU, and on a GPU
    what GPU_MEMORY_FRACTION of the free memory holds once the workspace is set aside — in both
    cases no more than `demand_tokens` (a known workload's total) needs."""
    import torch

    if kv_budget_tokens is None:
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            kv_budget_tokens = int(free * GPU_MEMORY_FRACTION - workspace_bytes) // bytes_per_token
            if kv_budget_tokens < 4 * page:
                raise TunelabError(f"the GPU has {free / 2**30:.1f} GiB free, too little for a KV cache after the "
                                   f"engine's {workspace_bytes / 2**30:.1f} GiB workspace; set --kv-budget-tokens "
                                   "lower or free memory")
        else:
            kv_budget_tokens = CPU_KV_BUDGET_TOKENS
        if demand_tokens:
            kv_budget_tokens = min(kv_budget_tokens, -(-demand_tokens // page) * page)
    if kv_budget_tokens < page:
        raise TunelabError(f"kv_budget_tokens: {kv_budget_tokens} is less than one block of {page} tokens")
    return kv_budget_tokens // page + 1  # + the scratch block
