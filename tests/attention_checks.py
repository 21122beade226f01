"""Checking attention results against the materialised reference: the helpers every attention test uses.

A result is judged by the accuracy policy of ``flash_softmax.testing`` (docs/semantics.md, 'Accuracy
policy'): against the float64 truth, with the reference computed in the input dtype as the yardstick for
16-bit inputs; ``OUTPUT_FACTOR`` for out and lse, ``GRADIENT_FACTOR`` for dq, dk and dv.

Results and references are dicts keyed by ``NAMES``; a check judges the names it is given, so a test that
has only some of them (no lse, gradients of some inputs only) passes just those.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

import flash_softmax as fs
from flash_softmax import reference
from flash_softmax.testing import GRADIENT_FACTOR, OUTPUT_FACTOR, Comparison, assert_close

from conftest import DEVICE

NAMES = ("out", "lse", "dq", "dk", "dv")
FACTORS = dict(out=OUTPUT_FACTOR, lse=OUTPUT_FACTOR, dq=GRADIENT_FACTOR, dk=GRADIENT_FACTOR, dv=GRADIENT_FACTOR)


def make_inputs(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, dtype, head_dim_v=None, seed=0):
    """Seeded random ``q (B, Hq, Sq, D)``, ``k (B, Hkv, Sk, D)``, ``v (B, Hkv, Sk, Dv)`` on the test device:
    leaves that require grad."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    head_dim_v = head_dim if head_dim_v is None else head_dim_v

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=DEVICE, dtype=dtype).requires_grad_()

    q = randn(batch, heads_q, seqlen_q, head_dim)
    k = randn(batch, heads_kv, seqlen_k, head_dim)
    v = randn(batch, heads_kv, seqlen_k, head_dim_v)
    return q, k, v


def grads_of(q, k, v) -> dict[str, torch.Tensor]:
    """``dq``, ``dk``, ``dv``: the ``.grad`` of q, k and v."""
    return dict(dq=q.grad, dk=k.grad, dv=v.grad)


def kernel_results(q, k, v, dout, **options) -> dict[str, torch.Tensor]:
    """Out, lse and input gradients of one ``flash_attention`` forward and backward (``dout``), run on fresh
    leaves with q, k, v's values (the callers' tensors get no ``.grad``)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = fs.flash_attention(*leaves, return_lse=True, **options)
    out.backward(dout)
    return dict(out=out.detach(), lse=lse, **grads_of(*leaves))


def reference_results(q, k, v, dout, dtype, **options) -> dict[str, torch.Tensor]:
    """Out, lse and input gradients of ``reference.attention`` computed from copies of q, k, v in ``dtype``:
    upcast (the truth) when ``dtype`` is not q's, in q's dtype (``upcast=False``) when it is."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    upcast = dtype != q.dtype
    out, lse = reference.attention(*leaves, return_lse=True, upcast=upcast, **options)
    out.backward(dout.to(dtype))
    return dict(out=out.detach(), lse=lse.detach(), **grads_of(*leaves))


def references(q, k, v, dout, **options) -> tuple[dict, dict]:
    """The float64 truth and the input-dtype reference of q, k, v under ``options``; for float32 inputs the
    second is all None (float32 results are judged against the truth alone)."""
    truth = reference_results(q, k, v, dout, torch.float64, **options)
    if q.dtype == torch.float32:
        return truth, dict.fromkeys(NAMES)
    return truth, reference_results(q, k, v, dout, q.dtype, **options)


def judge(results: Mapping[str, torch.Tensor], truth: Mapping, lowp: Mapping) -> dict[str, Comparison]:
    """``assert_close`` each tensor of ``results`` against ``truth`` and ``lowp`` of the same name, with the
    factor of that name (``FACTORS``). Raises ``AssertionError`` with the report of the first that fails."""
    return {name: assert_close(name, tensor, truth[name], lowp[name], factor=FACTORS[name])
            for name, tensor in results.items()}


def assert_matches_reference(results: Mapping[str, torch.Tensor], q, k, v, dout, **options) -> dict[str, Comparison]:
    """``results`` (any of out, lse, dq, dk, dv) of q, k, v with output gradient ``dout`` under ``options``
    meet the accuracy policy against the references (``references``)."""
    return judge(results, *references(q, k, v, dout, **options))


def check_attention(q, k, v, dout=None, check_grads=True, **options):
    """Run ``flash_attention`` on q, k, v and assert out and lse meet the accuracy policy, with out in q's
    dtype and shape ``(B, Hq, Sq, Dv)`` and lse float32 ``(B, Hq, Sq)``; with ``check_grads``, run the
    backward of ``dout`` (random when None) into q, k, v's ``.grad`` and assert the same for dq, dk, dv,
    each of its input's shape. Returns ``(out, lse)``."""
    out, lse = fs.flash_attention(q, k, v, return_lse=True, **options)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert out.shape == (*q.shape[:3], v.shape[-1]) and lse.shape == q.shape[:3]
    if dout is None:
        dout = torch.randn_like(out)
    truth, lowp = references(q, k, v, dout, **options)
    judge(dict(out=out, lse=lse), truth, lowp)
    if check_grads:
        out.backward(dout)
        for tensor in (q, k, v):
            assert tensor.grad.shape == tensor.shape
        judge(grads_of(q, k, v), truth, lowp)
    return out, lse
