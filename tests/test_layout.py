"""Outputs and gradients come back in the callers' memory layout.

A model that keeps activations as ``(B, S, H, D)`` passes them as ``.transpose(1, 2)`` views; ``out`` is then
a ``(B, S, H, Dv)``-contiguous tensor seen the same way, so the model's ``.transpose(1, 2).reshape(B, S, H * Dv)``
copies nothing. ``dq, dk, dv`` keep the stride order of q, k, v, also for the non-dense slices of a packed
``qkv``. The fake implementations must give exactly the strides the kernels' launchers give.
"""

from __future__ import annotations

import pytest
import torch

import flash_softmax as fs

from flash_softmax.testing import assert_close

from attention_checks import assert_matches_reference, check_attention, make_inputs
from conftest import DEVICE


def bshd_views(batch, heads, lengths, head_dims, dtype, seed=0):
    """For each (length, head dim): a ``(B, S, H, D)`` tensor seen as ``(B, H, S, D)``, requiring grad."""
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, length, heads, head_dim, generator=generator).to(DEVICE, dtype).transpose(1, 2)
        .requires_grad_()
        for length, head_dim in zip(lengths, head_dims)
    ]


def is_bshd(tensor):
    """Whether a ``(B, H, S, D)`` tensor lies in memory as a contiguous ``(B, S, H, D)`` one."""
    return tensor.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("causal", [False, True])
def test_bshd_views_give_a_bshd_output(causal):
    batch, heads, seqlen_q, seqlen_k = 2, 3, 37, 45
    q, k, v = bshd_views(batch, heads, (seqlen_q, seqlen_k, seqlen_k), (32, 32, 24), torch.float16)
    dout = torch.randn(batch, heads, seqlen_q, 24, generator=torch.Generator().manual_seed(1)).to(DEVICE, q.dtype)
    out, lse = check_attention(q, k, v, dout=dout, causal=causal)  # values and gradients against the truth
    assert is_bshd(out) and not out.is_contiguous()
    assert lse.is_contiguous()
    # The reshape a model does next is a view of the output, not a copy.
    merged = out.transpose(1, 2).reshape(batch, seqlen_q, heads * 24)
    assert merged.data_ptr() == out.data_ptr() and merged._is_view()
    for tensor in (q, k, v):
        assert tensor.grad.stride() == tensor.stride()


def test_contiguous_inputs_give_a_contiguous_output():
    q, k, v = make_inputs(2, 4, 2, 29, 40, 16, torch.float32)
    out, lse = fs.flash_attention(q, k, v, causal=True, return_lse=True)
    assert out.is_contiguous() and lse.is_contiguous()
    out.backward(torch.randn_like(out))
    assert all(t.grad.is_contiguous() for t in (q, k, v))


def test_the_output_follows_q_when_k_and_v_differ():
    (q,) = bshd_views(1, 2, (21,), (16,), torch.float32)
    _, k, v = make_inputs(1, 2, 2, 21, 30, 16, torch.float32)
    out = fs.flash_attention(q, k, v)
    assert is_bshd(out)
    expected = fs.reference.attention(q.detach(), k.detach(), v.detach(), upcast=True)
    assert_close("out", out, expected, None)
    out.backward(torch.randn_like(out))
    assert is_bshd(q.grad) and k.grad.is_contiguous() and v.grad.is_contiguous()


def test_size_one_dims_keep_the_layout():
    """B = 1 and H = 1 make several layouts equal; whatever strides come out, the reshape stays free."""
    for batch, heads in ((1, 3), (2, 1), (1, 1)):
        q, k, v = bshd_views(batch, heads, (19, 19, 19), (16, 16, 16), torch.float32, seed=batch + heads)
        out = fs.flash_attention(q, k, v, causal=True)
        assert is_bshd(out)
        assert out.transpose(1, 2).reshape(batch, 19, heads * 16).data_ptr() == out.data_ptr()


def test_the_output_can_be_modified_in_place():
    """The output in a permuted layout is a tensor of its own, not a view of one: autograd forbids in-place
    changes to views made inside a custom function, and a caller may well scale or add to the output (as
    to a contiguous one: out is saved for backward, so only where no backward follows)."""
    q, k, v = bshd_views(1, 2, (17, 23, 23), (16, 16, 16), torch.float32)
    out = fs.flash_attention(q, k, v)
    assert is_bshd(out) and not out._is_view() and out.requires_grad
    out.mul_(2.0)
    expected = fs.reference.attention(q.detach(), k.detach(), v.detach(), upcast=True) * 2.0
    assert_close("out", out.detach(), expected, None)


@pytest.mark.parametrize("causal", [False, True])
def test_packed_qkv_slices(causal):
    """q, k, v as the slices of one ``(B, S, 3, H, D)`` projection: not dense, read in place, out in BSHD
    order, and dq/dk/dv each in their slice's (B, S, H) order."""
    batch, seqlen, heads, head_dim = 2, 33, 2, 16
    generator = torch.Generator().manual_seed(2)
    qkv = torch.randn(batch, seqlen, 3, heads, head_dim, generator=generator).to(DEVICE, torch.float16)
    qkv.requires_grad_()
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    assert q.stride() == (seqlen * 3 * heads * head_dim, head_dim, 3 * heads * head_dim, 1)
    dout = torch.randn(batch, heads, seqlen, head_dim, generator=generator).to(DEVICE, qkv.dtype)

    out = fs.flash_attention(q, k, v, causal=causal)
    assert is_bshd(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    for grad in (dq, dk, dv):
        assert grad.shape == q.shape and is_bshd(grad), grad.stride()

    assert_matches_reference(dict(out=out, dq=dq, dk=dk, dv=dv), q, k, v, dout, causal=causal)


def _layouts():
    generator = torch.Generator().manual_seed(3)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(DEVICE)

    qkv = randn(2, 11, 3, 2, 8)
    return {
        "contiguous": (randn(2, 2, 11, 8), randn(2, 1, 13, 8), randn(2, 1, 13, 8)),
        "bshd": (randn(2, 11, 2, 8).transpose(1, 2), randn(2, 13, 1, 8).transpose(1, 2),
                 randn(2, 13, 1, 4).transpose(1, 2)),
        "packed-qkv": tuple(t.transpose(1, 2) for t in qkv.unbind(2)),
        "last-dim-strided": (randn(2, 2, 11, 16)[..., ::2], randn(2, 13, 1, 8).transpose(1, 2),
                             randn(2, 1, 13, 8)),
        "size-one-dims": (randn(1, 11, 1, 8).transpose(1, 2), randn(1, 13, 1, 8).transpose(1, 2),
                          randn(1, 1, 13, 8)),
    }


@pytest.mark.parametrize("name", list(_layouts()))
def test_fake_strides_equal_real_strides(name):
    """What torch.compile plans with (the fake results) is what the launchers allocate, for every layout."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = _layouts()[name]
    ops = torch.ops.flash_softmax
    scalars = (0.3, -1, -1, 0.0, 0.0)
    real_out, real_lse = ops.attention_forward(q, k, v, None, None, None, None, *scalars)
    dout = torch.randn_like(real_out)
    real_grads = ops.attention_backward(dout, None, q, k, v, real_out, real_lse, None, None, None,
        None, *scalars, False)[:3]
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fq, fk, fv, fdout = (mode.from_tensor(t) for t in (q, k, v, dout))
        fake_out, fake_lse = ops.attention_forward(fq, fk, fv, None, None, None, None, *scalars)
        fake_grads = ops.attention_backward(fdout, None, fq, fk, fv, fake_out, fake_lse, None, None, None,
            None, *scalars, False)[:3]
    for label, real, fake in zip(("out", "lse", "dq", "dk", "dv"), (real_out, real_lse, *real_grads),
                                 (fake_out, fake_lse, *fake_grads)):
        assert (real.shape, real.stride(), real.dtype) == (fake.shape, fake.stride(), fake.dtype), label
    if name != "last-dim-strided":  # a strided last dim is copied (contiguous) before the kernels
        assert dim_order_matches(real_out, q)


def dim_order_matches(out, like):
    """Whether ``out``'s (B, H, S) dims of size > 1 are ordered in memory as ``like``'s."""
    def order(tensor):
        dims = [d for d in range(3) if tensor.shape[d] > 1]
        return sorted(dims, key=lambda d: -tensor.stride(d))

    return order(out) == order(like)


def test_opcheck_with_a_bshd_view():
    """torch.library.opcheck compares the fake implementation's strides with the real ones, among others."""
    q, k, v = _layouts()["bshd"]
    bias = torch.randn(2, 1, 1, 13, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    torch.library.opcheck(torch.ops.flash_softmax.attention_forward.default,
                          (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), bias, None, None, None, 0.4, -1, 0,
                           0.0, 0.0))


def test_compiled_bshd_view_equals_eager():
    torch._dynamo.reset()
    try:
        q, k, v = bshd_views(2, 2, (23, 31, 31), (16, 16, 16), torch.float16, seed=5)
        dout = torch.randn(2, 23, 2, 16, generator=torch.Generator().manual_seed(6)).to(DEVICE, q.dtype)
        dout = dout.transpose(1, 2)

        def attention(q, k, v):
            return fs.flash_attention(q, k, v, causal=True)

        compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
        results = []
        for fn in (compiled, attention):
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            out = fn(*leaves)
            out.backward(dout)
            results.append((out, [t.grad for t in leaves]))
        (compiled_out, compiled_grads), (eager_out, eager_grads) = results
        assert is_bshd(compiled_out) and compiled_out.stride() == eager_out.stride()
        assert torch.equal(compiled_out, eager_out)
        for got, expected in zip(compiled_grads, eager_grads):
            assert got.stride() == expected.stride() and torch.equal(got, expected)
    finally:
        torch._dynamo.reset()
