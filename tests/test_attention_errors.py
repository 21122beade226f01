"""Bad input raises ValueError/TypeError naming the argument, the expected and the given.

The errors are listed in docs/semantics.md, 'Errors'.
"""

from __future__ import annotations

import pytest
import torch

import flash_softmax as fs

from conftest import DEVICE


def tensors(q_shape=(1, 2, 8, 16), k_shape=(1, 2, 8, 16), v_shape=None, dtype=torch.float16):
    v_shape = k_shape if v_shape is None else v_shape
    return tuple(torch.randn(shape, device=DEVICE).to(dtype) for shape in (q_shape, k_shape, v_shape))


@pytest.mark.parametrize(
    "shapes,error,message",
    [
        (((2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), ValueError, r"q must have 4 dims.*got 3"),
        (((1, 2, 8, 16), (1, 2, 1, 8, 16), (1, 2, 8, 16)), ValueError, r"k must have 4 dims.*got 5"),
        (((1, 2, 8, 16), (2, 2, 8, 16), (2, 2, 8, 16)), ValueError, r"same batch size.*q 1, k 2"),
        (((1, 3, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), ValueError, r"Hq % Hkv.*3 heads.*2"),
        (((1, 2, 8, 16), (1, 2, 8, 16), (1, 1, 8, 16)), ValueError, r"same number of heads.*k 2, v 1"),
        (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 9, 16)), ValueError, r"same sequence length.*k 8, v 9"),
        (((1, 2, 8, 16), (1, 2, 8, 32), (1, 2, 8, 32)), ValueError, r"same head dim.*q 16, k 32"),
        (((1, 2, 8, 257), (1, 2, 8, 257), (1, 2, 8, 16)), ValueError, r"between 1 and 256, got 257"),
        (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 300)), ValueError, r"head dim of v.*got 300"),
        (((1, 2, 8, 0), (1, 2, 8, 0), (1, 2, 8, 16)), ValueError, r"between 1 and 256, got 0"),
    ],
)
def test_shape_errors(shapes, error, message):
    q, k, v = tensors(*shapes)
    with pytest.raises(error, match=message):
        fs.flash_attention(q, k, v)


def test_not_a_tensor():
    q, k, v = tensors()
    with pytest.raises(TypeError, match=r"k must be a torch.Tensor, got list"):
        fs.flash_attention(q, [1, 2], v)


def test_unsupported_dtype():
    q, k, v = tensors(dtype=torch.float64)
    with pytest.raises(TypeError, match=r"q must have dtype float16, bfloat16, float32, got torch.float64"):
        fs.flash_attention(q, k, v)


def test_mixed_dtypes():
    q, k, v = tensors()
    with pytest.raises(TypeError, match=r"share one dtype.*q torch.float16, k torch.float32"):
        fs.flash_attention(q, k.float(), v)


def test_different_devices():
    q, k, v = tensors()
    with pytest.raises(ValueError, match=r"one device.*meta"):
        fs.flash_attention(q, k.to("meta"), v)


@pytest.mark.parametrize(
    "options,error,message",
    [
        (dict(causal=1), TypeError, r"causal must be a bool, got int 1"),
        (dict(return_lse="yes"), TypeError, r"return_lse must be a bool"),
        (dict(softmax_scale="0.1"), TypeError, r"softmax_scale must be a float or None, got str"),
        (dict(softmax_scale=float("nan")), ValueError, r"softmax_scale must be finite, got nan"),
        (dict(window_size=(3,)), TypeError, r"window_size must be a \(left, right\) pair"),
        (dict(window_size=(1.5, 2)), TypeError, r"window_size left must be an int, got float"),
        (dict(window_size=(4, -2)), ValueError, r"window_size right must be -1 \(unbounded\) or >= 0, got -2"),
        (dict(softcap=-1.0), ValueError, r"softcap must be 0 \(off\) or a finite positive number, got -1.0"),
        (dict(softcap=None), TypeError, r"softcap must be a float, got NoneType"),
    ],
)
def test_option_errors(options, error, message):
    q, k, v = tensors()
    with pytest.raises(error, match=message):
        fs.flash_attention(q, k, v, **options)


@pytest.mark.parametrize(
    "bias,error,message",
    [
        (torch.zeros(1, 2, 8, 9), ValueError, r"attn_bias of shape \(1, 2, 8, 9\) does not broadcast to .*\(1, 2, 8, 8\)"),
        (torch.zeros(2, 1, 1, 8), ValueError, r"does not broadcast"),
        (torch.zeros(1, 1, 1, 1, 8), ValueError, r"does not broadcast"),
        (torch.zeros(8, 8, dtype=torch.int32), TypeError, r"bool mask or a floating tensor, got torch.int32"),
        ("mask", TypeError, r"attn_bias must be a torch.Tensor or None, got str"),
    ],
)
def test_bias_errors(bias, error, message):
    q, k, v = tensors()
    if isinstance(bias, torch.Tensor):
        bias = bias.to(DEVICE)
    with pytest.raises(error, match=message):
        fs.flash_attention(q, k, v, attn_bias=bias)
