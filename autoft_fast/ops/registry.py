"""The backends of the gated embedding op, one row each: the only list of them.

``available_backends``, ``backend="auto"``, ``GatedEmbedding``'s check, the error messages and
the tests' parametrisation all read :data:`REGISTRY`. A backend is a :class:`Backend` row: the
device types it serves, a probe that says whether it can run there now, and its forward and
backward ops (kernel-level, with the schemas of :mod:`autoft_fast.ops.interface`). Rows are
kept in order of preference: ``auto`` picks the first available row for the tensors' device.

Example::

    >>> from autoft_fast.ops import registry
    >>> registry.backend_names()[0], "reference" in registry.backend_names()
    ('auto', True)
    >>> registry.check_backend_name("cpu")
    'cpu'
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import _extension as ext
from . import library, validate

log = logging.getLogger("autoft_fast")

AUTO = "auto"
AUTO_MEANS = "the first backend available for the tensors' device, in the registry's order"


@dataclass
class Backend:
    """One backend of the op.

    ``probe(device)`` says whether it can run on ``device`` now (only asked for the device types
    in ``devices``); ``unavailable(device)`` says why not, in words. ``forward`` / ``backward``
    return the kernel-level op handles (``None`` for ``forward`` means the plain-PyTorch
    reference path); they are looked up once, on first use. ``coalesced``: whether the sparse
    gradient of ``backward`` comes back with sorted unique rows; ``touched_only``: whether those
    rows leave out the rows that no lookup's gate gave a nonzero weight.
    """

    name: str
    devices: tuple[str, ...]
    probe: Callable[[torch.device], bool]
    forward: Optional[Callable[[], object]] = None
    backward: Optional[Callable[[], object]] = None
    coalesced: bool = False
    unavailable: Callable[[torch.device], str] = lambda device: "it is not available"
    notes: str = ""
    double_backward: bool = False
    # Whether the sparse-mode rows leave out the rows whose every hard gate chose the frozen
    # row (the fused optimizer then need not filter them itself).
    touched_only: bool = False
    # Whether its kernels read a frozen table stored in another dtype than the tuned one
    # (bfloat16 / float16 / int8 row-quantised, ops/quant.py), dequantising as they load.
    low_precision_frozen: bool = False
    # The backward that applies the fused optimizer's row update itself (the
    # gated_embedding_bwd_update op of ops/interface.py), served on ``update_devices``;
    # without it the update is applied with torch ops to the backward's sparse row sums.
    fused_backward: Optional[Callable[[], object]] = None
    update_devices: tuple[str, ...] = ()
    # The fused optimizer's update of a plain table's rows (the rows_update op of
    # ops/interface.py), served on ``update_devices``.
    rows_update: Optional[Callable[[], object]] = None
    # The bag ops (multi-hot fields: gated_embedding_bag_fwd / _bwd of ops/interface.py); a
    # row without them does not serve bags (the reference always does, in plain PyTorch).
    bag_forward: Optional[Callable[[], object]] = None
    bag_backward: Optional[Callable[[], object]] = None
    _ops: Optional[tuple] = field(default=None, repr=False)
    _bag_ops: Optional[tuple] = field(default=None, repr=False)

    @property
    def is_reference(self) -> bool:
        return self.forward is None

    def ops(self):
        """(forward op, backward op), resolved once; the forward gets the autograd formula."""
        if self._ops is None:
            fwd, bwd = self.forward(), self.backward()
            _attach_autograd(self, fwd, bwd)
            self._ops = (fwd, bwd)
        return self._ops

    @property
    def serves_bags(self) -> bool:
        return self.is_reference or self.bag_forward is not None

    def bag_ops(self):
        """(bag forward op, bag backward op), resolved once; the forward gets the autograd formula."""
        if self._bag_ops is None:
            fwd, bwd = self.bag_forward(), self.bag_backward()
            _attach_autograd(self, fwd, bwd, library.register_bag_autograd_for)
            self._bag_ops = (fwd, bwd)
        return self._bag_ops

    def serves(self, device: torch.device) -> bool:
        return device.type in self.devices


REGISTRY: dict[str, Backend] = {}
# Per forward op: device type -> (backend name, coalesced) of the rows that op serves (the C++
# op serves both 'cpu' and 'cuda'); read by the op's backward.
_OP_ROWS: dict[str, dict[str, tuple[str, bool]]] = {}


def _attach_autograd(row: Backend, fwd, bwd, register_for=None) -> None:
    name = fwd._qualified_op_name if hasattr(fwd, "_qualified_op_name") else str(fwd)
    rows = _OP_ROWS.get(name)
    if rows is None:
        rows = _OP_ROWS[name] = {}
        (register_for or library.register_autograd_for)(name, bwd, rows.__getitem__)
    for dev in row.devices:
        rows[dev] = (row.name, row.coalesced)


def register(backend: Backend) -> Backend:
    """Add a backend row (or replace the row of that name) and forget cached choices.

    Example::

        >>> from autoft_fast.ops import registry
        >>> row = registry.REGISTRY["reference"]
        >>> registry.register(row) is row
        True
    """
    if backend.name == AUTO:
        raise ValueError(f"backend name {AUTO!r} is reserved: it means {AUTO_MEANS}")
    REGISTRY[backend.name] = backend
    _cache.clear()
    _rows_update_cache.clear()
    return backend


def unregister(name: str) -> None:
    """Remove a backend row (tests that add one take it away again)."""
    REGISTRY.pop(name, None)
    _cache.clear()
    _rows_update_cache.clear()


def backend_names() -> tuple[str, ...]:
    """Every value ``backend=`` accepts: 'auto' (see :data:`AUTO_MEANS`), then each row.

    Example::

        >>> from autoft_fast.ops.registry import backend_names
        >>> backend_names()[:2]
        ('auto', 'cpu')
    """
    return (AUTO,) + tuple(REGISTRY)


def check_backend_name(name) -> str:
    """``name`` if it is a known backend or 'auto', else a ValueError naming it and the choices.

    Example::

        >>> from autoft_fast.ops.registry import check_backend_name
        >>> check_backend_name("auto")
        'auto'
    """
    if not isinstance(name, str) or (name != AUTO and name not in REGISTRY):
        raise ValueError(f"backend = {name!r} is not one of {backend_names()} "
                         f"('{AUTO}' = {AUTO_MEANS})")
    return name


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends usable for tensors on ``device`` (default: the CPU), fastest first.

    ``backend="auto"`` picks the first one. Example::

        >>> import autoft_fast
        >>> autoft_fast.available_backends("cpu")[-1]
        'reference'
    """
    device = torch.device("cpu" if device is None else device)
    return [row.name for row in REGISTRY.values() if row.serves(device) and row.probe(device)]


_cache: dict[tuple[str, str, bool], Backend] = {}
_rows_update_cache: dict[str, object] = {}


def rows_update_op(device: torch.device):
    """The kernel op that updates a plain table's rows on ``device`` (the first available
    backend with ``rows_update`` served there), or None: the torch-ops update then runs.

    Example::

        >>> import torch
        >>> from autoft_fast.ops import registry
        >>> op = registry.rows_update_op(torch.device("meta"))
        >>> op is None
        True
    """
    key = str(device)
    if key not in _rows_update_cache:
        op = None
        for row in REGISTRY.values():
            if (row.rows_update is not None and device.type in row.update_devices
                    and row.serves(device) and row.probe(device)):
                op = row.rows_update()
                break
        _rows_update_cache[key] = op
    return _rows_update_cache[key]


def resolve(backend: str, device: torch.device, low_precision: bool = False) -> Backend:
    """The row to run for ``backend`` on ``device`` (cached: a dict read after the first call).

    ``low_precision``: the frozen table is stored in another dtype than the tuned one, so only
    rows with ``low_precision_frozen`` qualify (``auto`` skips the others).
    """
    key = (backend, str(device), low_precision)
    row = _cache.get(key)
    if row is None:
        row = _cache[key] = _resolve_uncached(backend, device, low_precision)
    return row


def low_precision_backends(device: torch.device | str | None = None) -> list[str]:
    """The available backends that read a low-precision frozen table on ``device``.

    Example::

        >>> from autoft_fast.ops.registry import low_precision_backends
        >>> low_precision_backends("cpu")[-1]
        'reference'
    """
    return [n for n in available_backends(device) if REGISTRY[n].low_precision_frozen]


def _resolve_uncached(backend: str, device: torch.device, low_precision: bool) -> Backend:
    check_backend_name(backend)
    usable = available_backends(device)
    if low_precision and backend != AUTO and backend in usable \
            and not REGISTRY[backend].low_precision_frozen:
        raise LowPrecisionNotServed(backend, low_precision_backends(device))
    if low_precision:
        usable = [n for n in usable if REGISTRY[n].low_precision_frozen]
    if backend == AUTO:
        chosen = usable[0]
        if REGISTRY[chosen].is_reference and device.type == "cpu":
            ext.warn_missing_extension_once()
        log.debug("gated_embedding: backend 'auto' picked %r for device %s (available: %s)",
                  chosen, device, usable)
        return REGISTRY[chosen]
    if backend not in usable:
        row = REGISTRY[backend]
        why = row.unavailable(device) if row.serves(device) else f"it serves {_served(row)}"
        raise ValueError(f"backend = {backend!r} is not available for tensors on {device}: "
                         f"{why}; available there: {usable}")
    log.debug("gated_embedding: backend %r for device %s", backend, device)
    return REGISTRY[backend]


class LowPrecisionNotServed(Exception):
    """Raised by :func:`resolve`; the caller words it with the tensors' dtypes."""

    def __init__(self, backend, served):
        super().__init__(backend, served)
        self.backend, self.served = backend, served


def bag_backends(device: torch.device | str | None = None) -> list[str]:
    """The available backends that serve the bag op on ``device``, fastest first.

    Example::

        >>> from autoft_fast.ops.registry import bag_backends
        >>> bag_backends("cpu")[-1]
        'reference'
    """
    return [n for n in available_backends(device) if REGISTRY[n].serves_bags]


def resolve_bag(backend: str, device: torch.device, low_precision: bool = False) -> Backend:
    """The row to run the bag op with: as :func:`resolve`, among the rows that serve bags."""
    if backend == AUTO:
        usable = [n for n in bag_backends(device)
                  if not low_precision or REGISTRY[n].low_precision_frozen]
        return REGISTRY[usable[0]]
    row = resolve(backend, device, low_precision)
    if not row.serves_bags:
        raise ValueError(f"backend = {backend!r} does not serve the bag op (multi-hot fields); "
                         f"backends that do on {device}: {bag_backends(device)}")
    return row


def _served(row: Backend) -> str:
    return " and ".join(f"{d.upper()} tensors" for d in row.devices) + (
        f" ({row.notes})" if row.notes else "")


def check_serves(backend: str, tensor: torch.Tensor, name: str) -> None:
    """ValueError unless backend ``backend`` serves ``tensor``'s device (for kernel-level calls)."""
    row = REGISTRY[backend]
    if not (row.serves(tensor.device) and row.probe(tensor.device)):
        raise validate.device_not_served(backend, name, tensor.device, _served(row))


# ---------------------------------------------------------------------------------------------
# The rows
# ---------------------------------------------------------------------------------------------

def _not_built(device) -> str:
    return f"the compiled extension is not built ({ext.BUILD_HINT})"


def _triton_missing(device) -> str:
    if ext.load_triton() is None:
        return f"the Triton kernels could not be loaded ({ext.TRITON_ERROR})"
    return "Triton serves CPU tensors only under TRITON_INTERPRET=1"


register(Backend(
    name="cpu", devices=("cpu",), probe=lambda device: ext.has_kernel("CPU"),
    forward=lambda: torch.ops.autoft_fast.gated_embedding_fwd,
    backward=lambda: torch.ops.autoft_fast.gated_embedding_bwd,
    coalesced=True, touched_only=True, low_precision_frozen=True, unavailable=_not_built,
    fused_backward=lambda: torch.ops.autoft_fast.gated_embedding_bwd_update, update_devices=("cpu",),
    rows_update=lambda: torch.ops.autoft_fast.rows_update,
    bag_forward=lambda: torch.ops.autoft_fast.gated_embedding_bag_fwd,
    bag_backward=lambda: torch.ops.autoft_fast.gated_embedding_bag_bwd,
    notes="C++ extension, OpenMP, vectorised"))
register(Backend(
    # CUDA C++ before Triton: it has no per-call JIT dispatch cost. Not yet measured against
    # Triton on a GPU (benchmarks/gpu_check.sh does that); revisit with its numbers.
    name="cuda", devices=("cuda",), probe=lambda device: ext.has_kernel("CUDA"),
    forward=lambda: torch.ops.autoft_fast.gated_embedding_fwd,
    backward=lambda: torch.ops.autoft_fast.gated_embedding_bwd,
    coalesced=False, unavailable=_not_built,
    fused_backward=lambda: torch.ops.autoft_fast.gated_embedding_bwd_update,
    rows_update=lambda: torch.ops.autoft_fast.rows_update, update_devices=("cuda",),
    bag_forward=lambda: torch.ops.autoft_fast.gated_embedding_bag_fwd,
    bag_backward=lambda: torch.ops.autoft_fast.gated_embedding_bag_bwd,
    notes="C++/CUDA extension"))
register(Backend(
    # On the CPU only the interpreter (correct but slow), so it never beats 'cpu' there.
    name="triton", devices=("cuda", "cpu"), probe=ext.triton_usable,
    forward=lambda: torch.ops.autoft_fast.gated_embedding_fwd_triton,
    backward=lambda: torch.ops.autoft_fast.gated_embedding_bwd_triton,
    coalesced=True, low_precision_frozen=True, unavailable=_triton_missing,
    fused_backward=lambda: torch.ops.autoft_fast.gated_embedding_bwd_update_triton,
    rows_update=lambda: torch.ops.autoft_fast.rows_update_triton, update_devices=("cuda", "cpu"),
    bag_forward=lambda: torch.ops.autoft_fast.gated_embedding_bag_fwd_triton,
    bag_backward=lambda: torch.ops.autoft_fast.gated_embedding_bag_bwd_triton,
    notes="CPU tensors only under TRITON_INTERPRET=1"))
register(Backend(
    name="reference", devices=("cpu", "cuda", "meta"), probe=lambda device: True,
    double_backward=True, low_precision_frozen=True, notes="plain PyTorch, the oracle of the tests"))
