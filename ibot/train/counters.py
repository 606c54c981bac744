"""Count what a piece of code asks of the device: kernel-launching ops and host syncs.

:class:`OpCounter` is a ``TorchDispatchMode`` that sees every ATen op below autograd (forward,
backward and optimizer alike). Ops that only make a view or read metadata launch no kernel and are
not counted as launches. A host sync is ``aten._local_scalar_dense`` (what ``.item()``,
``float(t)``, ``bool(t)`` and ``int(t)`` of a tensor run) or an op whose output shape depends on
the data (``nonzero``, ``unique``, boolean-mask indexing...). On the CPU the counts are the same
as on a GPU for the same code path, so they are measured without one.
"""

from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

# data-dependent output shapes: the host must wait for the device to know the size
SYNC_OPS = {"_local_scalar_dense", "nonzero", "unique", "_unique2", "masked_select", "item"}
# no kernel: metadata, views, and ops that only allocate
NO_KERNEL = {"detach", "alias", "lift_fresh", "empty", "empty_like", "empty_strided", "_to_copy_noop", "set_"}


def _is_view(func) -> bool:
    try:
        return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
    except AttributeError:
        return False


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as c: ...`` then ``c.launches``, ``c.syncs`` and ``c.by_op``.

    ``launches`` counts dispatched ops that can launch a kernel (a fused ``_foreach`` op counts
    once, as it launches one or a few kernels); ``syncs`` counts host-device synchronisations.
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter = Counter()
        self.launches = 0
        self.syncs = 0
        self.sync_ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.syncs += 1
            self.sync_ops[name] += 1
        if name not in NO_KERNEL and not _is_view(func):
            self.launches += 1
            self.by_op[name] += 1
        return func(*args, **(kwargs or {}))


__all__ = ["OpCounter", "SYNC_OPS"]
