"""Sliding windows, softcap, biases and masks, grouped heads, and all of them together.

What each option means: docs/semantics.md, 'Attention' and 'Masks: causal, sliding window, bias'.
"""

from __future__ import annotations

import pytest
import torch

import flash_softmax as fs

from attention_checks import check_attention, make_inputs
from conftest import DEVICE


@pytest.mark.parametrize(
    "seqlen_q,seqlen_k,window",
    [
        (113, 203, (17, 5)),
        (203, 113, (40, -1)),
        (97, 97, (-1, 20)),
        (70, 130, (0, 0)),
        (130, 70, (33, 64)),
    ],
)
def test_sliding_window(seqlen_q, seqlen_k, window):
    q, k, v = make_inputs(1, 2, 2, seqlen_q, seqlen_k, 32, torch.float16)
    check_attention(q, k, v, window_size=window)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_causal_with_left_window(dtype):
    q, k, v = make_inputs(1, 2, 2, 150, 150, 48, dtype)
    check_attention(q, k, v, causal=True, window_size=(37, -1))


def test_causal_is_window_left_zero_right():
    q, k, v = make_inputs(1, 1, 1, 70, 90, 32, torch.float32)
    causal = fs.flash_attention(q, k, v, causal=True)
    window = fs.flash_attention(q, k, v, window_size=(-1, 0))
    assert torch.equal(causal, window)


def test_window_that_leaves_rows_empty():
    """With Sq > Sk the band starts below the first rows: rows i < Sq - Sk - right see no key."""
    seqlen_q, seqlen_k, right = 90, 40, 5
    q, k, v = make_inputs(1, 2, 2, seqlen_q, seqlen_k, 16, torch.float16)
    out, lse = check_attention(q, k, v, window_size=(10, right))
    empty = seqlen_q - seqlen_k - right
    assert torch.all(out[:, :, :empty] == 0) and torch.all(torch.isneginf(lse[:, :, :empty]))
    assert torch.all(q.grad[:, :, :empty] == 0) and not torch.isnan(q.grad).any()


@pytest.mark.parametrize("softcap", [0.5, 30.0])
def test_softcap(softcap):
    q, k, v = make_inputs(1, 2, 2, 77, 101, 64, torch.float16)
    check_attention(q, k, v, softcap=softcap, causal=True)


def test_softcap_float32():
    q, k, v = make_inputs(1, 2, 1, 40, 55, 32, torch.float32)
    check_attention(q, k, v, softcap=5.0, softmax_scale=0.5)


@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1, 91), (1, 2, 1, 91), (2, 1, 45, 91), (45, 91), (91,)],
    ids=["padding", "per-head", "per-batch", "per-query", "per-key"],
)
def test_additive_bias_broadcast(shape):
    q, k, v = make_inputs(2, 2, 2, 45, 91, 32, torch.float16)
    bias = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(DEVICE, torch.float16)
    check_attention(q, k, v, attn_bias=bias)


def test_bias_is_read_with_stride_zero():
    """A (B, 1, 1, Sk) padding mask is read in place: no (B, H, Sq, Sk) copy is ever made."""
    from flash_softmax.attention.checks import expand_attn_bias

    q, k, v = make_inputs(2, 4, 4, 33, 47, 16, torch.float32)
    mask = torch.ones(2, 1, 1, 47, dtype=torch.bool, device=DEVICE)
    view = expand_attn_bias(mask, q, k)
    assert view.shape == (2, 4, 33, 47)
    assert view.stride()[1:3] == (0, 0) and view.data_ptr() == mask.data_ptr()


def test_float32_bias_with_minus_inf():
    q, k, v = make_inputs(1, 2, 2, 50, 64, 32, torch.float32)
    bias = torch.randn(1, 2, 50, 64, device=DEVICE)
    bias[..., ::3] = float("-inf")
    check_attention(q, k, v, attn_bias=bias)


def test_padding_mask_with_fully_padded_sequence():
    """Left padding per batch element; the second sequence is entirely padding: its rows give 0."""
    batch, seqlen = 3, 41
    q, k, v = make_inputs(batch, 2, 2, seqlen, seqlen, 32, torch.bfloat16)
    keep = torch.ones(batch, 1, 1, seqlen, dtype=torch.bool, device=DEVICE)
    keep[0, ..., :7] = False
    keep[1] = False
    out, lse = check_attention(q, k, v, attn_bias=keep, causal=True)
    assert torch.all(out[1] == 0) and torch.all(torch.isneginf(lse[1]))
    assert torch.all(q.grad[1] == 0) and torch.all(k.grad[1] == 0) and torch.all(v.grad[1] == 0)
    for tensor in (out, q.grad, k.grad, v.grad):
        assert not torch.isnan(tensor).any()


def test_float_bias_gets_its_gradient_and_bool_mask_none():
    """(The gradients of every bias shape are checked in test_score_modifiers.py.)"""
    q, k, v = make_inputs(1, 1, 1, 20, 20, 16, torch.float32)
    bias = torch.randn(1, 1, 20, 20, device=DEVICE, requires_grad=True)
    fs.flash_attention(q, k, v, attn_bias=bias).sum().backward()
    assert bias.grad is not None and bias.grad.shape == bias.shape and q.grad is not None
    mask = torch.ones(1, 1, 20, 20, dtype=torch.bool, device=DEVICE)
    fs.flash_attention(q, k, v, attn_bias=mask).sum().backward()
    assert mask.grad is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_everything_combined(dtype):
    """GQA + window + softcap + bias + causal + odd lengths + Dv != D in one call."""
    q, k, v = make_inputs(2, 4, 2, 67, 131, 40, dtype, head_dim_v=24)
    bias = torch.randn(2, 1, 67, 131, generator=torch.Generator().manual_seed(9)).to(DEVICE, dtype)
    check_attention(q, k, v, causal=True, window_size=(45, -1), softcap=20.0, attn_bias=bias, softmax_scale=0.2)


def test_window_visits_only_the_band():
    """A window of w costs O(S * w): blocks outside the band are never loaded.

    Keys far before the band hold NaN. Masking a loaded block would still spread it (0 * NaN in P V), so
    clean rows show that those blocks were skipped, for every block size the kernels use (<= 128).
    """
    seqlen, left = 512, 8
    q, k, v = make_inputs(1, 1, 1, seqlen, seqlen, 16, torch.float32)
    k, v = k.detach().clone(), v.detach().clone()
    k[..., :64, :] = float("nan")
    v[..., :64, :] = float("nan")
    q = q.detach().requires_grad_()
    out = fs.flash_attention(q, k, v, window_size=(left, 0))
    far = slice(384, None)  # query blocks starting at >= 384 begin at key >= 256
    assert not torch.isnan(out[..., far, :]).any()
    out[..., far, :].sum().backward()
    assert not torch.isnan(q.grad[..., far, :]).any()
