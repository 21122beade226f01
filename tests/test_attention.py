"""Attention kernels against the materialised reference, judged by the accuracy policy (docs/semantics.md,
'Accuracy policy').

On a CPU these run the real Triton kernels in the interpreter; on a GPU, compiled. Lengths are chosen
around the block sizes (the interpreter uses 32, GPUs 32..128), odd, and on both sides of Sq == Sk.
"""

from __future__ import annotations

import math

import pytest
import torch

import flash_softmax as fs
from flash_softmax import reference
from flash_softmax.attention.ops import attention_forward_op
from flash_softmax.testing import assert_close

from attention_checks import check_attention, make_inputs
from conftest import DEVICE

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
LENGTH_PAIRS = [(1, 1), (1, 239), (113, 203), (127, 513), (203, 113)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlen_q,seqlen_k", LENGTH_PAIRS)
def test_lengths(seqlen_q, seqlen_k, causal, dtype):
    q, k, v = make_inputs(1, 2, 2, seqlen_q, seqlen_k, 64, dtype)
    check_attention(q, k, v, causal=causal)


@pytest.mark.parametrize("head_dim", [16, 40, 59, 64, 80, 96, 128, 256])
def test_head_dims(head_dim):
    dtype = torch.bfloat16 if head_dim % 2 else torch.float16
    q, k, v = make_inputs(1, 1, 1, 65, 97, head_dim, dtype)
    check_attention(q, k, v, causal=True)


@pytest.mark.parametrize("head_dim", [1, 3, 8])
def test_tiny_head_dims(head_dim):
    q, k, v = make_inputs(1, 2, 2, 37, 45, head_dim, torch.float32)
    check_attention(q, k, v, causal=False)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(31, 32), (32, 33), (33, 31), (64, 64), (96, 65)])
def test_block_boundaries(seqlen_q, seqlen_k):
    q, k, v = make_inputs(2, 1, 1, seqlen_q, seqlen_k, 32, torch.float16)
    check_attention(q, k, v, causal=True)


def test_softmax_scale():
    q, k, v = make_inputs(1, 2, 2, 50, 70, 48, torch.float32)
    check_attention(q, k, v, causal=True, softmax_scale=0.37)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = make_inputs(1, 1, 1, 20, 20, 36, torch.float32)
    explicit = fs.flash_attention(q, k, v, softmax_scale=1 / math.sqrt(36))
    default = fs.flash_attention(q, k, v)
    assert torch.equal(explicit, default)


@pytest.mark.parametrize("heads_q,heads_kv", [(4, 2), (6, 1)], ids=["gqa", "mqa"])
def test_grouped_query_heads(heads_q, heads_kv):
    q, k, v = make_inputs(2, heads_q, heads_kv, 45, 70, 32, torch.float16)
    check_attention(q, k, v, causal=True)


def test_value_head_dim_differs():
    q, k, v = make_inputs(1, 2, 2, 40, 77, 48, torch.float16, head_dim_v=24)
    check_attention(q, k, v, causal=False)


@pytest.mark.parametrize("causal", [False, True])
def test_bshd_views_and_strided_dout(causal):
    """(B, S, H, D) tensors passed as transposed views are read in place; dout may be strided too."""
    batch, seqlen_q, seqlen_k, heads, head_dim = 2, 70, 45, 3, 40
    generator = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(batch, length, heads, head_dim, generator=generator)
        .to(DEVICE, torch.float16).transpose(1, 2).requires_grad_()
        for length in (seqlen_q, seqlen_k, seqlen_k)
    )
    assert not q.is_contiguous() and q.stride(-1) == 1
    dout = torch.randn(batch, seqlen_q, heads, head_dim, generator=generator).to(DEVICE, torch.float16)
    dout = dout.transpose(1, 2)
    check_attention(q, k, v, dout=dout, causal=causal)
    assert q.grad.stride() == q.stride()  # gradients come back in the inputs' layout


def test_last_dim_strided_inputs_are_copied():
    q, k, v = make_inputs(1, 2, 2, 33, 41, 32, torch.float32)
    q_wide = torch.randn(1, 2, 33, 64, device=DEVICE)[..., ::2].requires_grad_()
    assert q_wide.stride(-1) == 2
    check_attention(q_wide, k, v, causal=True)


def test_lse_is_logsumexp_of_scaled_scores():
    q, k, v = make_inputs(2, 2, 2, 57, 91, 64, torch.float32)
    _, lse = fs.flash_attention(q, k, v, softmax_scale=0.2, return_lse=True)
    scores = (q.detach().double() @ k.detach().double().transpose(-1, -2)) * 0.2
    expected = torch.logsumexp(scores, dim=-1)
    torch.testing.assert_close(lse.double(), expected, rtol=1e-6, atol=1e-6)


def test_fully_masked_rows_give_zero_output_and_gradients():
    """causal with Sq > Sk: the first Sq - Sk rows see no key."""
    seqlen_q, seqlen_k = 75, 30
    q, k, v = make_inputs(1, 2, 2, seqlen_q, seqlen_k, 32, torch.float16)
    out, lse = check_attention(q, k, v, causal=True)
    empty = seqlen_q - seqlen_k
    assert torch.all(out[:, :, :empty] == 0)
    assert torch.all(torch.isneginf(lse[:, :, :empty]))
    assert torch.all(q.grad[:, :, :empty] == 0)
    for tensor in (out, q.grad, k.grad, v.grad):
        assert not torch.isnan(tensor).any()


def test_nan_propagates_to_the_rows_it_touches():
    q, k, v = make_inputs(1, 1, 1, 40, 40, 16, torch.float32)
    q = q.detach().clone()
    q[0, 0, 5, 3] = float("nan")
    out = fs.flash_attention(q, k.detach(), v.detach(), causal=True)
    assert torch.isnan(out[0, 0, 5]).all()
    rows = torch.arange(40, device=DEVICE) != 5
    assert not torch.isnan(out[0, 0, rows]).any()


@pytest.mark.parametrize(
    "shape_q,shape_k",
    [((1, 2, 0, 32), (1, 2, 17, 32)), ((1, 2, 17, 32), (1, 2, 0, 32)), ((0, 2, 5, 32), (0, 2, 5, 32))],
    ids=["empty-queries", "empty-keys", "empty-batch"],
)
def test_empty_lengths(shape_q, shape_k):
    q = torch.randn(shape_q, device=DEVICE, requires_grad=True)
    k = torch.randn(shape_k, device=DEVICE, requires_grad=True)
    v = torch.randn(shape_k, device=DEVICE, requires_grad=True)
    out, lse = fs.flash_attention(q, k, v, return_lse=True)
    assert out.shape == shape_q and lse.shape == shape_q[:3]
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    out.sum().backward()
    for tensor in (q, k, v):
        assert tensor.grad.shape == tensor.shape and torch.all(tensor.grad == 0)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(window_left=-1, window_right=0), dict(window_left=2, window_right=1, softcap=1.5, bias=True)],
    ids=["full", "causal", "window-softcap-bias"],
)
def test_gradcheck_float64(options):
    """Backward is the derivative of forward: float64 finite differences of the kernels' own forward.

    The public functions take 16- and 32-bit inputs (docs/semantics.md, 'Attention'); the custom op under
    them also runs the kernels in float64 (float64 accumulation), which is what a gradient check needs.
    Grouped heads (2 query heads on 1 K/V head) and Dv != D are part of every case.
    """
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(*shape, generator=generator, dtype=torch.float64).to(DEVICE).requires_grad_()
               for shape in ((1, 2, 5, 3), (1, 1, 7, 3), (1, 1, 7, 4)))
    bias = torch.randn(1, 2, 5, 7, generator=generator, dtype=torch.float64).to(DEVICE) if options.get("bias") else None

    def attention(q, k, v):
        out, _ = attention_forward_op(q, k, v, bias, None, None, None, 0.6, options.get("window_left", -1),
                                      options.get("window_right", -1), options.get("softcap", 0.0), 0.0)
        return out

    assert torch.autograd.gradcheck(attention, (q, k, v), fast_mode=True)


def test_nothing_of_size_sq_by_sk_is_saved():
    seqlen = 96
    q, k, v = make_inputs(1, 1, 1, seqlen, seqlen, 16, torch.float16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = fs.flash_attention(q, k, v, causal=True)
    assert saved, "the autograd graph saved nothing"
    assert max(saved) < seqlen * seqlen
    assert sum(saved) == 4 * q.numel() + seqlen  # q, k, v, out and the (1, 1, Sq) lse
    out.sum().backward()


def test_backward_is_bitwise_deterministic():
    q, k, v = make_inputs(1, 4, 2, 100, 77, 32, torch.bfloat16)
    dout = torch.randn(1, 4, 100, 32, device=DEVICE).to(torch.bfloat16)
    grads = []
    for _ in range(2):
        for tensor in (q, k, v):
            tensor.grad = None
        fs.flash_attention(q, k, v, causal=True).backward(dout)
        grads.append([tensor.grad.clone() for tensor in (q, k, v)])
    for first, second in zip(*grads):
        assert torch.equal(first, second)


def test_module_matches_functional():
    q, k, v = make_inputs(1, 2, 2, 30, 30, 16, torch.float32)
    module = fs.FlashAttention(causal=True, softmax_scale=0.3)
    assert "causal=True" in repr(module)
    assert torch.equal(module(q, k, v), fs.flash_attention(q, k, v, causal=True, softmax_scale=0.3))


def test_lse_is_differentiable():
    """A loss on lse alone (out unused) reaches q and k, and gives v no gradient (d lse / d v = 0)."""
    q, k, v = make_inputs(1, 2, 1, 10, 13, 16, torch.float32)
    out, lse = fs.flash_attention(q, k, v, return_lse=True)
    assert out.requires_grad and lse.requires_grad
    lse.sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    _, expected = fs.reference.attention(*leaves, return_lse=True)
    expected.sum().backward()
    for name, tensor, leaf in zip(("dq", "dk"), (q, k), leaves):
        assert_close(name, tensor.grad, leaf.grad, None)
    assert torch.equal(v.grad, torch.zeros_like(v))


def test_torch_path_has_the_same_semantics(monkeypatch):
    """Where no Triton backend applies, the PyTorch path gives the reference's results and gradients."""
    import flash_softmax.attention.function as function

    monkeypatch.setattr(function, "backend_for", lambda device: "torch")
    q, k, v = make_inputs(1, 2, 2, 40, 25, 16, torch.float32)
    check_attention(q, k, v, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_long_sequences(dtype, causal):
    q, k, v = make_inputs(2, 4, 2, 2049, 4097, 128, dtype)
    check_attention(q, k, v, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("long_axis", ["keys", "batch"])
def test_offsets_beyond_int32(long_axis):
    """More than 2**31 elements in one tensor (and more than 65535 heads in a grid): 64-bit offsets."""
    head_dim = 64
    if long_axis == "keys":
        batch, seqlen_q, seqlen_k = 1, 16, (1 << 31) // head_dim + 1000
    else:
        batch, seqlen_q, seqlen_k = (1 << 31) // (16 * head_dim) + 3, 16, 16
    q = torch.randn(batch, 1, seqlen_q, head_dim, device=DEVICE, dtype=torch.float16)
    k = torch.randn(batch, 1, seqlen_k, head_dim, device=DEVICE, dtype=torch.float16)
    v = torch.randn(batch, 1, seqlen_k, head_dim, device=DEVICE, dtype=torch.float16)
    out = fs.flash_attention(q, k, v)
    # Check the far end of every tensor: the last two batch elements, the last queries.
    tail = slice(batch - 2, batch)
    q_tail, k_tail, v_tail = q[tail, :, -2:], k[tail], v[tail]
    truth = reference.attention(q_tail.double(), k_tail.double(), v_tail.double())
    lowp = reference.attention(q_tail, k_tail, v_tail, upcast=False)
    assert_close("out", out[tail, :, -2:], truth, lowp)
