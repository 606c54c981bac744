"""Thin helpers over ``torch.distributed`` that are no-ops in a single process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity without a process group)."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


_HOST_GROUP = None  # a gloo group for host-side decisions when the default group is NCCL


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (``flag`` itself in one process).

    A host-side decision that never waits for the device: a one-integer all-reduce over gloo (the
    default group when it is gloo, else a gloo group made at the first call, which every rank makes
    at the same point because every rank calls this at the same points).
    """
    global _HOST_GROUP
    if not is_dist():
        return flag
    group = None
    if dist.get_backend() != "gloo":
        if _HOST_GROUP is None:
            _HOST_GROUP = dist.new_group(backend="gloo")
        group = _HOST_GROUP
    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK`` under torchrun, else 0)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def init_from_env(device: str = "auto") -> None:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE`` > 1), when not joined yet.

    NCCL bound to this rank's GPU (``LOCAL_RANK``, made current) when CUDA is there and ``device``
    is not "cpu", so it connects eagerly and never guesses the device; else gloo. A single process
    (no torchrun, or ``WORLD_SIZE=1``) stays without a group.
    """
    if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1 and not is_dist():
        if torch.cuda.is_available() and device != "cpu":
            local = torch.device("cuda", local_rank())
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=local)
        else:
            dist.init_process_group("gloo")


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.parallel.DistributedDataParallel:
    """DDP for an :class:`ibot.iBOT` module.

    * no buffer sync before each forward: the only buffers, the centers, are all-reduced
      identically on every rank (they are still synced once, when DDP is built);
    * ``gradient_as_bucket_view=True``: gradients live in the all-reduce buckets (no copy);
    * ``static_graph`` stays off: with it, this module's ranks stop agreeing on the gradients
      (their parameters drift apart from the second step on; ``tests/test_distributed.py`` checks
      that the ranks stay identical).
    """
    import inspect

    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return torch.nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,
        **no_sync,
    )
