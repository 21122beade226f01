"""Which engine runs a call: compiled Triton, Triton's interpreter, or plain PyTorch.

Triton decides once, when a kernel is decorated, whether ``@triton.jit`` builds a compiled kernel or an
interpreted one (from ``TRITON_INTERPRET``). We read the same switch once, at import, so the dispatch
below always agrees with the kernels that were actually built.
"""

from __future__ import annotations

import contextlib

import torch
import triton

#: True when every ``@triton.jit`` kernel of this process runs in Triton's CPU interpreter.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)


def backend_for(device: torch.device) -> str:
    """Return ``"triton"``, ``"triton-interpreter"`` or ``"torch"`` for tensors on ``device``."""
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and INTERPRETED:
        return "triton-interpreter"
    return "torch"


#: Reused for every call that needs no device switch: a ``nullcontext`` holds no state.
_NO_SWITCH = contextlib.nullcontext()


def device_guard(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``tensor``'s GPU the current one, on which Triton launches; nothing to do on a CPU, or when it
    already is the current one (the common case, where entering and leaving ``torch.cuda.device`` would
    only cost two device exchanges per call)."""
    if tensor.is_cuda and tensor.get_device() != torch.cuda.current_device():
        return torch.cuda.device(tensor.device)
    return _NO_SWITCH
