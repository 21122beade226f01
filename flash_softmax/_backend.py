"""Which engine runs a call (compiled Triton, Triton's interpreter, or plain PyTorch), and a record of it.

Triton decides once, when a kernel is decorated, whether ``@triton.jit`` builds a compiled kernel or an
interpreted one (from ``TRITON_INTERPRET``). We read the same switch once, at import, so the dispatch
below always agrees with the kernels that were actually built.

Every call is counted by the path it took (:func:`stats`), and every call that leaves the kernels for
PyTorch warns once per reason (:class:`FallbackWarning`), so a user can always tell, and prove, what ran.
The kernels' own calls are counted inside the custom ops, which run eagerly even inside a compiled graph;
the Python-level entries (``scaled_dot_product_attention`` and the fallbacks) are not counted while
``torch.compile`` traces them, since a traced side effect would not replay per call.
"""

from __future__ import annotations

import collections
import contextlib
import warnings

import torch
import triton

__all__ = [
    "INTERPRETED", "FallbackWarning", "backend_for", "backend_reason", "device_guard", "record", "record_fallback",
    "reset_stats", "stats",
]

#: True when every ``@triton.jit`` kernel of this process runs in Triton's CPU interpreter.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

#: The paths a call can take, as :func:`backend_for` and :func:`stats` name them.
PATHS = ("triton", "triton-interpreter", "torch")


class FallbackWarning(UserWarning):
    """A call ran on PyTorch instead of the Triton kernels; the message names the reason. Issued once
    per reason and process (``warnings.simplefilter("error", FallbackWarning)`` turns fallbacks into errors)."""


def backend_for(device: torch.device) -> str:
    """``"triton"`` (compiled kernels), ``"triton-interpreter"`` or ``"torch"`` for tensors on ``device``."""
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and INTERPRETED:
        return "triton-interpreter"
    return "torch"


def backend_reason(device: torch.device) -> str:
    """Why :func:`backend_for` answers what it does for ``device``, in words a user can act on."""
    if device.type == "cuda":
        return "CUDA tensors run the compiled Triton kernels"
    if device.type == "cpu" and INTERPRETED:
        return "TRITON_INTERPRET=1 was set when triton was imported: the Triton kernels run in its CPU interpreter"
    if device.type == "cpu":
        return ("TRITON_INTERPRET=1 was not set before triton was imported, so cpu tensors take the PyTorch path "
                "(set it to run the Triton kernels in the interpreter)")
    return f"{device.type} tensors have no Triton backend here and run the PyTorch path"


_calls: collections.Counter = collections.Counter()
_fallbacks: collections.Counter = collections.Counter()
_warned: set[str] = set()


def record(op: str, path: str) -> None:
    """Count one call of ``op`` on ``path`` (one of ``PATHS``)."""
    if torch.compiler.is_compiling():
        return
    _calls[op, path] += 1


def record_fallback(op: str, reason: str, stacklevel: int = 3) -> None:
    """Count a call of ``op`` that runs on PyTorch because of ``reason``, and warn the first time."""
    if torch.compiler.is_compiling():
        return
    _calls[op, "torch"] += 1
    key = f"{op}: {reason}"
    _fallbacks[key] += 1
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"{op} runs on PyTorch, not the flash_softmax kernels: {reason}", FallbackWarning,
                      stacklevel=stacklevel)


def stats() -> dict[str, dict[str, int]]:
    """Calls so far, by op and path, and the fallbacks by reason.

    Returns ``{op: {path: calls}}`` for the ops ``attention_forward``, ``attention_backward``,
    ``attention_varlen_forward``, ``attention_varlen_backward``, ``softmax_forward``, ``softmax_backward`` and ``scaled_dot_product_attention`` (paths ``"triton"``:
    compiled kernels, ``"triton-interpreter"``, ``"torch"``), only those with calls, and under
    ``"fallbacks"`` ``{"op: reason": calls}``. A backward on the PyTorch path is PyTorch's autograd and is
    not counted. A fresh dict each time; :func:`reset_stats` zeroes the counts.
    """
    result: dict[str, dict[str, int]] = {}
    for (op, path), count in sorted(_calls.items()):
        result.setdefault(op, {})[path] = count
    result["fallbacks"] = dict(sorted(_fallbacks.items()))
    return result


def reset_stats(warnings_too: bool = False) -> None:
    """Zero the counts of :func:`stats`; with ``warnings_too``, each fallback reason warns again once."""
    _calls.clear()
    _fallbacks.clear()
    if warnings_too:
        _warned.clear()


#: Reused for every call that needs no device switch: a ``nullcontext`` holds no state.
_NO_SWITCH = contextlib.nullcontext()


def device_guard(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``tensor``'s GPU the current one, on which Triton launches; nothing to do on a CPU, or when it
    already is the current one (the common case, where entering and leaving ``torch.cuda.device`` would
    only cost two device exchanges per call)."""
    if tensor.is_cuda and tensor.get_device() != torch.cuda.current_device():
        return torch.cuda.device(tensor.device)
    return _NO_SWITCH
