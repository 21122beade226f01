"""``FLASH_SOFTMAX_AUTOTUNE=1``: the pruning hook run exactly as Triton's autotuner runs it.

Triton 3.6's ``Autotuner.run(*args, **kwargs)`` sets ``self.nargs = dict(zip(arg_names, args))`` (the
positional arguments only) and calls ``early_config_prune(configs, self.nargs, **kwargs)``; the launchers
pass HEAD_DIM and the other constexprs by keyword. The tests below put an autotuner over the sm_90a space
where the launchers look for the tuned kernel, let the real launch reach it, and call the autotuner's own
``prune_configs`` with the arguments of that launch. No GPU is needed: nothing is compiled or timed.
"""

from __future__ import annotations

import pytest
import torch
import triton

import flash_softmax as fs
from flash_softmax.attention import backward, configs, forward
from flash_softmax.attention.options import KernelOptions


class _Pruned(Exception):
    """Raised by the stand-in autotuner once it has pruned: the launch goes no further."""

    def __init__(self, kernel: str, named_args: dict, kept: list):
        super().__init__(kernel)
        self.kernel, self.named_args, self.kept = kernel, named_args, kept


def _hopper_autotuner(kernel: str, jit_function):
    """An autotuner over ``kernel``'s sm_90a space with the package's hook, stopping after the pruning."""
    candidates = [c for c in configs.all_configs(kernel, "sm_90a") if not c.split_dkdv and not c.persistent]

    class Stopping(triton.runtime.Autotuner):
        def run(self, *args, **kwargs):
            self.nargs = dict(zip(self.arg_names, args))  # what Triton 3.6's run() does first
            kept = self.prune_configs(kwargs)
            raise _Pruned(kernel, self.nargs, [configs._from_triton(c) for c in kept])

    return Stopping(
        jit_function, jit_function.arg_names, [c.as_triton_config() for c in candidates], configs.AUTOTUNE_KEY,
        reset_to_zero=None, restore_value=None,
        prune_configs_by={"early_config_prune": configs._pruner(kernel)},
    )


@pytest.fixture
def autotuning(monkeypatch):
    """Launches take the autotuned path (as on a GPU with FLASH_SOFTMAX_AUTOTUNE=1), with Hopper spaces."""
    monkeypatch.setattr(configs, "AUTOTUNE", True)
    monkeypatch.setattr(configs, "INTERPRETED", False)
    monkeypatch.setattr(configs, "ensure_descriptor_allocator", lambda: None)
    monkeypatch.setattr(configs, "device_arch", lambda: "sm_90a")
    monkeypatch.setattr(forward, "_attn_fwd_kernel_tuned", _hopper_autotuner("forward", forward._attn_fwd_kernel))
    monkeypatch.setattr(backward, "_attn_bwd_dkdv_kernel_tuned",
                        _hopper_autotuner("backward_dkdv", backward._attn_bwd_dkdv_kernel))
    monkeypatch.setattr(backward, "_attn_bwd_dq_kernel_tuned",
                        _hopper_autotuner("backward_dq", backward._attn_bwd_dq_kernel))


def _inputs(head_dim: int, dtype=torch.bfloat16):
    q = torch.randn(1, 2, 100, head_dim, dtype=dtype)
    k = torch.randn(1, 2, 120, head_dim, dtype=dtype)
    v = torch.randn(1, 2, 120, head_dim, dtype=dtype)
    return q, k, v


def _expected(kernel: str, head_dim: int, element_size: int, tma_allowed: bool) -> set:
    kept = configs.prune(kernel, head_dim, head_dim, element_size, configs._shared_memory_limit(), "sm_90a")
    return {c for c in kept if not c.split_dkdv and not c.persistent and (tma_allowed or not c.tma)}


@pytest.mark.parametrize("head_dim", [64, 128, 59])
def test_forward_pruning_hook_reads_keyword_arguments(autotuning, head_dim):
    q, k, v = _inputs(head_dim)
    with pytest.raises(_Pruned) as pruned:
        fs.flash_attention(q, k, v, causal=True)
    # The bug this guards against: HEAD_DIM reaches the hook through kwargs, never through named_args.
    assert "HEAD_DIM" not in pruned.value.named_args
    kept = pruned.value.kept
    assert kept and set(kept) == _expected("forward", head_dim, 2, tma_allowed=head_dim != 59)
    if head_dim == 59:  # rows of 118 bytes: no tensor descriptor can describe them
        assert not any(c.tma for c in kept)
    else:
        assert any(c.tma for c in kept)


@pytest.mark.parametrize("kernel", ["backward_dkdv", "backward_dq"])
def test_backward_pruning_hooks_read_keyword_arguments(autotuning, monkeypatch, kernel):
    q, k, v = _inputs(128)
    options = KernelOptions(softmax_scale=0.1, window_right=0)
    # Backward needs real forward results: compute them on the interpreter's fixed configuration first.
    with monkeypatch.context() as interpreted:
        interpreted.setattr(configs, "AUTOTUNE", False)
        interpreted.setattr(configs, "INTERPRETED", True)
        out, lse = forward.attention_forward(q, k, v, options)
    if kernel == "backward_dq":
        # dK/dV is launched first; let it do nothing so that the dQ launch is reached.
        monkeypatch.setattr(backward, "_attn_bwd_dkdv_kernel_tuned", _NoLaunch())
    with pytest.raises(_Pruned) as pruned:
        backward.attention_backward(torch.randn_like(out), q, k, v, out, lse, options)
    assert pruned.value.kernel == kernel
    assert "HEAD_DIM" not in pruned.value.named_args
    assert set(pruned.value.kept) == _expected(kernel, 128, 2, tma_allowed=True)


class _NoLaunch:
    """A launch target that does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None
