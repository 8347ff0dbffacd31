"""Tensor parallelism on torch.distributed: one process per GPU (NCCL), or per CPU process (gloo).

Launch with ``torchrun --nproc-per-node N ...`` (or the CLIs' ``--tp N``, which runs torchrun's own
launcher): each process joins the group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and loads only its slices of the weights.

The split (Megatron-LM's, as vLLM and gpt-fast use it): q/k/v and gate/up are column-parallel
(each rank holds its heads and its FFN columns), o and down are row-parallel (each rank multiplies
its input slice; one all-reduce per projection sums the partial outputs, two per layer, before the
residual add in the next norm). The embedding is replicated; the LM head is split over the
vocabulary and all-gathered, so every rank holds the full logits. Each rank's KV cache holds its
KV heads.
"""
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from minillama.config import LlamaConfig

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class TensorParallel:
    """This process's place in the tensor-parallel group."""

    rank: int
    world_size: int
    group: Optional[dist.ProcessGroup] = None  # None: the default group

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place (every rank gets the same bits)."""
        dist.all_reduce(t, group=self.group)
        return t

    def all_reduce_max_(self, t: torch.Tensor) -> torch.Tensor:
        """The elementwise max of ``t`` over the ranks, in place."""
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """The ranks' ``t`` (..., n) side by side: (..., world_size * n), in rank order."""
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        dist.broadcast(t, src=src, group=self.group)
        return t

    def broadcast_object(self, obj=None, src: int = 0):
        """Rank ``src``'s ``obj`` on every rank (e.g. the line the chat read from stdin)."""
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def is_follower() -> bool:
    """True in every torchrun process but rank 0: such a process prints nothing and reads no stdin."""
    return launched_by_torchrun() and int(os.environ["RANK"]) != 0


def degrees_that_work(config: LlamaConfig, limit: int = 64) -> List[int]:
    return [n for n in range(1, limit + 1)
            if config.num_attention_heads % n == 0 and config.num_key_value_heads % n == 0
            and config.intermediate_size % n == 0]


def check_degree(config: LlamaConfig, tp: int) -> None:
    """A ValueError naming the numbers when ``tp`` does not divide the heads, KV heads or FFN width."""
    bad = [f"{name} {value}" for name, value in (
        ("num_attention_heads", config.num_attention_heads),
        ("num_key_value_heads", config.num_key_value_heads),
        ("intermediate_size", config.intermediate_size)) if value % tp]
    if bad:
        raise ValueError(
            f"tensor-parallel degree {tp} does not divide {', '.join(bad)}; degrees that work for this model: "
            f"{degrees_that_work(config)}"
        )


def join_from_environment(device_type: str) -> Optional[TensorParallel]:
    """Join the process group torchrun describes (once per process); None when not under torchrun.

    Returns the group with this process's rank. NCCL for CUDA, gloo for the CPU.
    """
    if not launched_by_torchrun():
        return None
    missing = [v for v in TORCHRUN_VARIABLES if v not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE > 1 but {missing} are not set: launch with torchrun --nproc-per-node N")
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return TensorParallel(rank=dist.get_rank(), world_size=dist.get_world_size())


def leave(wait_for_all: bool = True) -> None:
    """Leave the process group, if this process joined one: first wait until every rank is done
    (``wait_for_all``; skip it after an error, when another rank may never come), then tear the
    group down (before the interpreter exits: one torn down during its shutdown can abort it)."""
    if dist.is_available() and dist.is_initialized():
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()
