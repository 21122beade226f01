"""Edges of the attention contract (docs/semantics.md, 'Attention'), judged by the accuracy policy
(docs/semantics.md, 'Accuracy policy') through ``attention_checks``.

Empty lengths with every option, head dims 1 and 2, biases in odd layouts, dtypes and values (NaN,
-inf rows, all-False masks), grouped heads with biases and empty rows, windows at and past the ends,
extreme softcaps and scales, partial ``requires_grad``, odd ``dout`` layouts, packed and offset views,
and inf / NaN in the inputs. Shapes stay small: every kernel here runs in the interpreter on a CPU.
"""

from __future__ import annotations

import pytest
import torch

import flash_softmax as fs
from flash_softmax import reference
from flash_softmax.testing import GRADIENT_FACTOR, assert_close

from attention_checks import (
    assert_matches_reference,
    check_attention,
    grads_of,
    judge,
    make_inputs,
    reference_results,
)
from conftest import DEVICE

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


def randn(*shape, dtype=F32, seed=7):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


# --- empty lengths, combined with every option ------------------------------------------------------


EMPTY_OPTIONS = {
    "window": dict(window_size=(2, 1)),
    "causal": dict(causal=True),
    "softcap": dict(softcap=2.0),
    "bool-bias": dict(attn_bias="bool"),
    "float-bias": dict(attn_bias="float"),
    "everything": dict(causal=True, window_size=(3, -1), softcap=4.0, attn_bias="float"),
}


def _materialise_bias(options, shape, dtype):
    options = dict(options)
    kind = options.get("attn_bias")
    if kind == "bool":
        options["attn_bias"] = randn(*shape) > -0.5
    elif kind == "float":
        options["attn_bias"] = randn(*shape, dtype=dtype)
    return options


@pytest.mark.parametrize("heads_q,heads_kv", [(2, 2), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("option", list(EMPTY_OPTIONS))
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(0, 9), (9, 0), (0, 0)])
def test_empty_lengths_with_options(seqlen_q, seqlen_k, option, heads_q, heads_kv):
    q, k, v = make_inputs(2, heads_q, heads_kv, seqlen_q, seqlen_k, 8, F16, head_dim_v=5)
    options = _materialise_bias(EMPTY_OPTIONS[option], (2, heads_q, seqlen_q, seqlen_k), F16)
    out, lse = check_attention(q, k, v, **options)
    if seqlen_q:  # Sk == 0: zeros, lse -inf, zero gradients
        assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
        assert torch.all(q.grad == 0)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("batch,heads", [(0, 2), (2, 0)], ids=["no-batch", "no-heads"])
def test_no_batch_or_heads_with_bias(batch, heads, kind):
    q, k, v = make_inputs(batch, heads, heads, 5, 6, 8, F32)
    options = _materialise_bias(dict(attn_bias=kind), (batch, heads, 5, 6), F32)
    out, lse = check_attention(q, k, v, causal=True, **options)
    assert out.shape == (batch, heads, 5, 8) and lse.shape == (batch, heads, 5)


# --- head dims ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=str)
@pytest.mark.parametrize("head_dim", [1, 2])
def test_tiny_head_dims_with_every_option(head_dim, dtype):
    q, k, v = make_inputs(1, 4, 2, 19, 23, head_dim, dtype)
    bias = randn(1, 4, 19, 23, dtype=dtype)
    check_attention(q, k, v, causal=True, window_size=(7, -1), softcap=3.0, attn_bias=bias, softmax_scale=0.8)


@pytest.mark.parametrize("dtype", [F16, F32], ids=str)
@pytest.mark.parametrize("head_dim,head_dim_v", [(256, 1), (3, 256), (1, 256), (256, 2)])
def test_lopsided_head_dims(head_dim, head_dim_v, dtype):
    q, k, v = make_inputs(1, 1, 1, 9, 35, head_dim, dtype, head_dim_v=head_dim_v)
    check_attention(q, k, v, causal=True)


def test_head_dim_one_with_any_last_stride():
    """A last dim of size 1 has a meaningless stride: it need not be 1."""
    q = randn(1, 2, 9, 5)[..., ::5].requires_grad_()
    k = randn(1, 2, 11, 3, seed=8)[..., 1:2].requires_grad_()
    v = randn(1, 2, 11, 7, seed=9)[..., ::7].requires_grad_()
    assert q.stride(-1) == 5 and v.stride(-1) == 7
    check_attention(q, k, v, causal=True)


# --- biases: layouts, dtypes, broadcast shapes, special values ------------------------------------


SHAPE = (1, 2, 2, 19, 37, 16)  # B, Hq, Hkv, Sq, Sk, D


@pytest.mark.parametrize(
    "make_bias,dtype",
    [
        (lambda: randn(1, 2, 37, 19, dtype=F16).transpose(-1, -2), F16),
        (lambda: (randn(1, 2, 37, 19) > -1).transpose(-1, -2), F16),
        (lambda: randn(1, 37, 2, 19).permute(0, 2, 3, 1) * 3, F32),
        (lambda: randn(1, 2, 19, 37) * 3, F16),
        (lambda: randn(1, 2, 19, 37, dtype=BF16), F32),
        (lambda: randn(1, 2, 19, 37, dtype=F16), BF16),
        (lambda: randn(1, 2, 19, 37, dtype=torch.float64), F32),
        (lambda: randn(37, dtype=F16), F16),
        (lambda: randn(1, 37, dtype=F16), F16),
        (lambda: randn(2, 1, 37, dtype=F16), F16),
        (lambda: randn(19, 1, dtype=F16), F16),
        (lambda: randn(2, 19, 37, dtype=F16), F16),
        (lambda: torch.tensor(1.5, device=DEVICE), F16),
        (lambda: torch.tensor(True, device=DEVICE), F16),
        (lambda: randn(2, 5, 19, 37)[:1, 2:4], F32),
    ],
    ids=[
        "float-last-dim-strided", "bool-last-dim-strided", "float-permuted", "float32-bias-float16-q",
        "bfloat16-bias-float32-q", "float16-bias-bfloat16-q", "float64-bias-float32-q", "(Sk,)", "(1,Sk)",
        "(Hq,1,Sk)", "(Sq,1)", "(Hq,Sq,Sk)", "scalar", "scalar-bool", "storage-offset",
    ],
)
def test_bias_layouts_and_dtypes(make_bias, dtype):
    batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim = SHAPE
    q, k, v = make_inputs(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, dtype)
    check_attention(q, k, v, attn_bias=make_bias())


def test_bias_gradient_in_another_dtype():
    """A float32 bias that requires grad next to float16 q: it gets a float32 gradient, as accurate (once
    rounded to float16) as the float16 reference's; q, k, v get theirs."""
    q, k, v = make_inputs(1, 2, 2, 19, 37, 16, F16)
    bias = randn(1, 2, 19, 37).requires_grad_()
    out = fs.flash_attention(q, k, v, attn_bias=bias)
    dout = randn(*out.shape, dtype=F16, seed=3)
    out.backward(dout)
    assert bias.grad.dtype == F32 and bias.grad.shape == bias.shape
    assert_matches_reference(dict(out=out, **grads_of(q, k, v)), q, k, v, dout, attn_bias=bias.detach())
    bias_grads = []
    for dtype, upcast in ((torch.float64, True), (F16, False)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, bias)]
        fs.reference.attention(*leaves[:3], attn_bias=leaves[3], upcast=upcast).backward(dout.to(dtype))
        bias_grads.append(leaves[3].grad)
    assert_close("dbias", bias.grad.to(F16), *bias_grads, factor=GRADIENT_FACTOR)


def test_bias_nan_reaches_exactly_its_rows():
    q, k, v = make_inputs(1, 2, 2, 19, 37, 16, F32)
    bias = randn(1, 2, 19, 37)
    bias[0, 0, 3, 5] = float("nan")
    bias[0, 1, 10, 0] = float("nan")
    out, lse = check_attention(q, k, v, attn_bias=bias)
    nan_rows = torch.isnan(out).any(-1)
    expected = torch.zeros_like(nan_rows)
    expected[0, 0, 3] = expected[0, 1, 10] = True
    assert torch.equal(nan_rows, expected) and torch.equal(torch.isnan(lse), expected)
    assert torch.isnan(out[expected]).all()


def _nan_bias_under_causal():
    """Causal Sq = Sk = 8: row 2 sees keys 0..2 only; its bias holds NaN at key 1."""
    q, k, v = make_inputs(1, 1, 1, 8, 8, 4, F32)
    bias = randn(8, 8)
    bias[2, 1] = float("nan")
    out, lse = fs.flash_attention(q, k, v, causal=True, attn_bias=bias, return_lse=True)
    dout = randn(*out.shape, seed=4)
    out.backward(dout)
    return q, k, v, bias, out, lse, dout


def test_nan_bias_under_causal_forward_and_dv():
    q, k, v, bias, out, lse, dout = _nan_bias_under_causal()
    assert_matches_reference(dict(out=out, lse=lse, dq=q.grad), q, k, v, dout, causal=True, attn_bias=bias)
    # Keys 3.. are not seen by row 2: their dV is a sum over the other (clean) rows.
    assert not torch.isnan(v.grad[..., 3:, :]).any()
    assert torch.isnan(v.grad[..., :3, :]).all()


def test_nan_bias_under_causal_dk_stays_in_the_rows_it_touches():
    q, k, v, bias, out, lse, dout = _nan_bias_under_causal()
    truth = reference_results(q, k, v, dout, torch.float64, causal=True, attn_bias=bias)
    assert not torch.isnan(truth["dk"][..., 3:, :]).any()  # the reference keeps keys 3.. clean
    assert_close("dk", k.grad, truth["dk"], None)


@pytest.mark.parametrize("dtype", [F16, F32], ids=str)
def test_float_bias_minus_inf_on_whole_rows(dtype):
    """Rows whose float bias is -inf everywhere see no key: output 0, lse -inf, zero gradients.

    Such rows contribute nothing, so the truth for the other rows is the reference run without them.
    """
    q, k, v = make_inputs(1, 2, 2, 19, 37, 16, dtype)
    bias = randn(1, 2, 19, 37)
    bias[..., 3, :] = float("-inf")
    bias[..., 12:15, :] = float("-inf")
    bias[..., 0, ::2] = float("-inf")  # a partly masked row next to them
    bias = bias.to(dtype)
    out, lse = check_attention(q, k, v, attn_bias=bias, check_grads=False)
    dout = randn(*out.shape, dtype=dtype, seed=2)
    out.backward(dout)
    empty = torch.isneginf(bias).all(-1)[0, 0]
    assert torch.all(out[:, :, empty] == 0) and torch.all(torch.isneginf(lse[:, :, empty]))
    assert torch.all(q.grad[:, :, empty] == 0)
    rows = ~empty
    sub = [t.detach()[:, :, rows] if name == "q" else t.detach() for name, t in zip("qkv", (q, k, v))]
    assert_matches_reference(dict(dq=q.grad[:, :, rows], dk=k.grad, dv=v.grad), *sub, dout[:, :, rows],
                             attn_bias=bias[:, :, rows])


def test_float_bias_minus_inf_row_reference_gradients():
    q, k, v = make_inputs(1, 1, 1, 4, 6, 4, F32)
    bias = randn(4, 6)
    bias[1] = float("-inf")
    check_attention(q, k, v, attn_bias=bias)


def test_only_visible_key_minus_inf_matches_reference_gradients():
    q, k, v = make_inputs(1, 1, 1, 6, 6, 4, F32)
    bias = randn(6, 6)
    bias[0, 0] = float("-inf")  # causal row 0 sees key 0 only
    check_attention(q, k, v, causal=True, attn_bias=bias)


@pytest.mark.parametrize("dtype", [F16, F32], ids=str)
def test_only_visible_key_minus_inf(dtype):
    """Causal row 0 sees key 0 only, whose bias is -inf: an empty row (output 0, lse -inf, zero dq)."""
    q, k, v = make_inputs(1, 1, 1, 6, 6, 4, dtype)
    bias = randn(6, 6, dtype=dtype)
    bias[0, 0] = float("-inf")
    out, lse = check_attention(q, k, v, causal=True, attn_bias=bias, check_grads=False)
    assert torch.isneginf(lse[0, 0, 0]) and torch.all(out[0, 0, 0] == 0)
    out.backward(randn(*out.shape, dtype=dtype))
    assert torch.all(q.grad[0, 0, 0] == 0)
    for t in (q, k, v):
        assert not torch.isnan(t.grad).any()


@pytest.mark.parametrize("shape", [(1, 2, 19, 37), (1,)], ids=["full", "broadcast"])
def test_all_false_mask(shape):
    q, k, v = make_inputs(1, 2, 2, 19, 37, 16, F16)
    mask = torch.zeros(shape, dtype=torch.bool, device=DEVICE)
    out, lse = check_attention(q, k, v, attn_bias=mask)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    for t in (q, k, v):
        assert torch.all(t.grad == 0)


# --- grouped-query attention ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["float", "bool"])
def test_gqa_with_per_query_head_bias(kind):
    q, k, v = make_inputs(2, 6, 2, 19, 37, 16, F16)
    bias = randn(2, 6, 1, 37, dtype=F16)
    check_attention(q, k, v, attn_bias=bias > 0 if kind == "bool" else bias)


def test_gqa_one_kv_head_seven_query_heads():
    q, k, v = make_inputs(2, 7, 1, 19, 37, 16, BF16)
    check_attention(q, k, v, causal=True, attn_bias=randn(2, 7, 19, 37, dtype=BF16))


def test_gqa_with_empty_causal_rows():
    q, k, v = make_inputs(1, 4, 2, 45, 13, 16, F16)
    out, lse = check_attention(q, k, v, causal=True)
    assert torch.all(out[:, :, :32] == 0) and torch.all(q.grad[:, :, :32] == 0)
    assert not torch.isnan(k.grad).any() and not torch.isnan(v.grad).any()


# --- windows -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(19, 37), (37, 19), (5, 5)])
@pytest.mark.parametrize(
    "causal,window",
    [(False, (1000, 1000)), (False, (0, 0)), (False, (0, -1)), (True, (3, 5)), (True, (-1, 7))],
    ids=["wider-than-both", "diagonal-only", "left-zero", "causal-wins-over-right", "causal-right-only"],
)
def test_window_edges(seqlen_q, seqlen_k, causal, window):
    q, k, v = make_inputs(1, 2, 2, seqlen_q, seqlen_k, 16, F16)
    check_attention(q, k, v, causal=causal, window_size=window)


def test_causal_overrides_right_bound():
    q, k, v = make_inputs(1, 1, 1, 19, 37, 16, F32)
    assert torch.equal(
        fs.flash_attention(q, k, v, causal=True, window_size=(4, 9)),
        fs.flash_attention(q, k, v, window_size=(4, 0)),
    )


@pytest.mark.parametrize(
    "window",
    [
        (2**31, 2**31),
        (2**40, -1),
        (-1, 2**40),
        (-1, 2**31 - 1),
        (2**31 - 1, -1),
    ],
    ids=["2**31", "left-2**40", "right-2**40", "right-int32-max", "left-int32-max"],
)
def test_window_bounds_beyond_the_lengths(window):
    """Any bound >= the lengths is the same as unbounded."""
    q, k, v = make_inputs(1, 1, 1, 3, 5, 4, F32)
    check_attention(q, k, v, window_size=window)


# --- softcap and scale extremes ------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("dtype", [F16, F32], ids=str)
@pytest.mark.parametrize("softcap", [0.01, 1e4, 1e-30, 1e30])
def test_extreme_softcaps(softcap, dtype):
    q, k, v = make_inputs(1, 2, 2, 19, 37, 16, dtype)
    check_attention(q, k, v, softcap=softcap, causal=True)


@pytest.mark.parametrize(
    "dtype,options",
    [
        (F16, dict(softmax_scale=-0.3, causal=True)),
        (F32, dict(softmax_scale=-0.3)),
        (F32, dict(softmax_scale=-0.3, softcap=1.0)),
        (F32, dict(softmax_scale=0.0, causal=True)),
    ],
    ids=["negative-float16", "negative-float32", "negative-softcap", "zero"],
)
def test_negative_and_zero_scale(dtype, options):
    q, k, v = make_inputs(1, 2, 2, 19, 37, 16, dtype)
    check_attention(q, k, v, **options)


def test_scores_overflowing_float16():
    """scale * q.k exceeds float16's range: the float16 reference overflows, the kernels (float32 scores)
    must not, and stay within the policy of the float64 truth."""
    q, k, v = make_inputs(1, 2, 2, 19, 37, 16, F16)
    with torch.no_grad():
        q *= 8
    lowp = reference.attention(q, k, v, softmax_scale=1000.0, upcast=False)
    assert not torch.isfinite(lowp).all()  # the situation under test
    out, lse = check_attention(q, k, v, softmax_scale=1000.0)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("scale", [1e3, 1e7])
def test_large_scores_keep_float32_accuracy_in_dv(scale):
    """One key: out = v and dV = sum of dO over the rows whatever the scores; float32 must hold 1e-5.

    Backward recomputes P as exp2(s - lse) with lse kept in base 2 from the forward's own float32 values;
    a natural-log lse multiplied back by log2 e would be off by ulps of lse at such scores, and P of a
    lone key would not be 1."""
    q, k, v = make_inputs(1, 1, 1, 8, 1, 4, F32, seed=2)
    out, lse = check_attention(q, k, v, softmax_scale=scale, check_grads=False)
    dout = torch.ones_like(out)
    out.backward(dout)
    assert_matches_reference(dict(dv=v.grad), q, k, v, dout, softmax_scale=scale)


# --- autograd edges ------------------------------------------------------------------------------------


@pytest.mark.parametrize("needs_grad", ["q", "k", "v", "qk", "kv", "qv"])
def test_gradients_for_some_inputs_only(needs_grad):
    q, k, v = make_inputs(1, 4, 2, 19, 37, 16, F16, head_dim_v=8)
    q, k, v = (t.detach().requires_grad_(name in needs_grad) for name, t in zip("qkv", (q, k, v)))
    out = fs.flash_attention(q, k, v, causal=True, softcap=5.0)
    dout = randn(*out.shape, dtype=F16)
    out.backward(dout)
    grads = {name: tensor.grad for name, tensor in zip("qkv", (q, k, v))}
    assert_matches_reference({"d" + name: grads[name] for name in needs_grad}, q, k, v, dout,
                             causal=True, softcap=5.0)
    assert all(grads[name] is None for name in "qkv" if name not in needs_grad)


def test_backward_twice_with_retain_graph():
    q, k, v = make_inputs(1, 2, 2, 19, 37, 16, F32)
    out = fs.flash_attention(q, k, v, causal=True, attn_bias=randn(19, 37))
    dout = randn(*out.shape)
    out.backward(dout, retain_graph=True)
    first = [t.grad.clone() for t in (q, k, v)]
    out.backward(dout)
    for once, tensor in zip(first, (q, k, v)):
        assert torch.equal(tensor.grad, 2 * once)


@pytest.mark.parametrize("dtype", [F16, F32], ids=str)
def test_zero_stride_dout(dtype):
    q, k, v = make_inputs(1, 2, 2, 19, 37, 16, dtype, head_dim_v=8)
    dout = torch.ones(1, dtype=dtype, device=DEVICE).expand(1, 2, 19, 8)
    check_attention(q, k, v, dout=dout, causal=True)


def test_dout_broadcast_over_rows():
    q, k, v = make_inputs(1, 2, 2, 19, 37, 16, F16, head_dim_v=8)
    check_attention(q, k, v, dout=randn(1, 2, 1, 8, dtype=F16).expand(1, 2, 19, 8))


def test_out_sum_backward():
    q, k, v = make_inputs(1, 2, 2, 19, 37, 16, F16, head_dim_v=24)
    out = fs.flash_attention(q, k, v, causal=True)
    out.sum().backward()
    assert_matches_reference(grads_of(q, k, v), q, k, v, torch.ones_like(out), causal=True)


@pytest.mark.parametrize("layout", ["bshd", "last-dim-strided"])
def test_dout_layouts_with_value_head_dim_differing(layout):
    q, k, v = make_inputs(2, 3, 3, 19, 37, 16, F16, head_dim_v=24)
    if layout == "bshd":
        dout = randn(2, 19, 3, 24, dtype=F16).transpose(1, 2)
    else:
        dout = randn(2, 3, 24, 19, dtype=F16).transpose(-1, -2)
    check_attention(q, k, v, dout=dout, causal=True)


# --- views: packed, offset, zero-stride -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F16, F32], ids=str)
def test_packed_qkv_views(dtype):
    qkv = randn(2, 23, 3, 3, 16, dtype=dtype)
    q, k, v = (t.transpose(1, 2).requires_grad_() for t in qkv.unbind(2))
    assert q.storage_offset() == 0 and k.storage_offset() == 3 * 16
    check_attention(q, k, v, causal=True)


def test_gradient_through_packed_qkv():
    qkv = randn(2, 23, 3, 3, 16).requires_grad_()
    out = fs.flash_attention(*(t.transpose(1, 2) for t in qkv.unbind(2)), causal=True)
    dout = randn(*out.shape, seed=5)
    out.backward(dout)
    qkv64 = qkv.detach().double().requires_grad_()
    reference.attention(*(t.transpose(1, 2) for t in qkv64.unbind(2)), causal=True).backward(dout.double())
    assert_close("dqkv", qkv.grad, qkv64.grad, None, factor=GRADIENT_FACTOR)


def test_inputs_with_storage_offsets():
    base = randn(3, 2, 40, 17, dtype=F16)
    q = base[1:2, :, 5:24, 1:].requires_grad_()
    k = base[2:3, :, 3:40, 1:].requires_grad_()
    v = base[0:1, :, 1:38, :9].requires_grad_()
    assert q.storage_offset() and k.storage_offset() and v.storage_offset()
    check_attention(q, k, v, causal=True, attn_bias=randn(5, 2, 19, 37, dtype=F16)[3])


@pytest.mark.parametrize("dtype", [F16, F32], ids=str)
def test_zero_stride_inputs(dtype):
    """q shared by every query, K/V shared by every head and batch element, read with stride 0."""
    q0 = randn(1, 2, 1, 16, dtype=dtype).requires_grad_()
    k0 = randn(1, 1, 37, 16, dtype=dtype, seed=8).requires_grad_()
    v0 = randn(3, 1, 37, 8, dtype=dtype, seed=9).requires_grad_()
    shapes = ((3, 2, 19, 16), (3, 2, 37, 16), (3, 2, 37, 8))
    out = fs.flash_attention(*(t.expand(s) for t, s in zip((q0, k0, v0), shapes)), causal=True)
    dout = randn(*out.shape, dtype=dtype, seed=3)
    out.backward(dout)

    def run(dtype_, upcast):
        """Output and gradients (w.r.t. q0, k0, v0) of the reference on the expanded inputs in ``dtype_``."""
        leaves = [t.detach().to(dtype_).requires_grad_() for t in (q0, k0, v0)]
        result = reference.attention(*(t.expand(s) for t, s in zip(leaves, shapes)), causal=True, upcast=upcast)
        result.backward(dout.to(dtype_))
        return dict(out=result, **grads_of(*leaves))

    truth = run(torch.float64, True)
    lowp = run(dtype, False) if dtype != F32 else dict.fromkeys(truth)
    judge(dict(out=out, **grads_of(q0, k0, v0)), truth, lowp)


# --- inf and NaN in q, k, v ------------------------------------------------------------------------------


def _with_value(which, value, dtype=F32, shape=(1, 1, 1, 9, 11, 4), index=(0, 0, 3, 1)):
    q, k, v = make_inputs(*shape, dtype)
    with torch.no_grad():
        {"q": q, "k": k, "v": v}[which][index] = value
    return q, k, v


@pytest.mark.parametrize("dtype", [F16, F32], ids=str)
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_nan_input_matches_reference(which, dtype):
    q, k, v = _with_value(which, float("nan"), dtype)
    check_attention(q, k, v)


@pytest.mark.parametrize("dtype", [F16, F32], ids=str)
@pytest.mark.parametrize("value", [float("inf"), float("-inf")], ids=["+inf", "-inf"])
def test_inf_in_v_matches_reference(value, dtype):
    q, k, v = _with_value("v", value, dtype)
    check_attention(q, k, v)


@pytest.mark.parametrize("which", ["q", "k"])
def test_inf_score_gives_infinite_lse(which):
    q, k, v = _with_value(which, float("inf"))
    check_attention(q, k, v)


def test_inf_query_with_softcap():
    q, k, v = _with_value("q", float("inf"), shape=(1, 1, 1, 2, 3, 2), index=(0, 0, 1, 1))
    check_attention(q, k, v, softcap=5.0)


def _nan_query_under_causal():
    """Causal Sq = 9, Sk = 11: query row 3 holds a NaN; forward and backward run. Returns q, k, v, dout."""
    q, k, v = _with_value("q", float("nan"))
    out = fs.flash_attention(q, k, v, causal=True)
    dout = randn(*out.shape)
    out.backward(dout)
    return q, k, v, dout


def test_nan_query_under_causal_dk():
    q, k, v, dout = _nan_query_under_causal()
    assert_matches_reference(dict(dk=k.grad), q, k, v, dout, causal=True)


def test_nan_query_under_causal_dv():
    q, k, v, dout = _nan_query_under_causal()
    assert not torch.isnan(v.grad[0, 0, 6:]).any()  # keys 6.. are not seen by row 3
    assert_matches_reference(dict(dv=v.grad), q, k, v, dout, causal=True)
