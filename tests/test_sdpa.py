"""``fs.scaled_dot_product_attention`` against torch's, and ``fs.patch_sdpa``.

The truth is torch's SDPA in float64; the low-precision reference is torch's math implementation in the
input dtype (the accuracy policy of docs/semantics.md). Calls the kernels serve are checked to reach them;
calls they cannot serve must give exactly torch's result or torch's error.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_softmax as fs
import flash_softmax.sdpa as sdpa_module
from flash_softmax.sdpa import TORCH_SDPA, fallback_reason
from flash_softmax.testing import GRADIENT_FACTOR, OUTPUT_FACTOR, assert_close

from conftest import DEVICE
from test_attention import make_inputs


def torch_sdpa(q, k, v, dout, dtype, attn_mask=None, **options):
    """torch's output and q/k/v gradients from copies of the inputs in ``dtype``.

    A float mask goes to float64 with the float64 truth; in low precision it is passed as given."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    if attn_mask is not None and attn_mask.is_floating_point() and dtype == torch.float64:
        attn_mask = attn_mask.double()
    with sdpa_kernel(SDPBackend.MATH):
        out = TORCH_SDPA(*leaves, attn_mask=attn_mask, **options)
    out.backward(dout.to(dtype))
    return out, [t.grad for t in leaves]


def check_sdpa(q, k, v, check_grads=True, **options):
    """Run ours (asserting the kernels serve it), the float64 truth and the input-dtype reference."""
    assert fallback_reason(q, k, v, **options) is None
    out = fs.scaled_dot_product_attention(q, k, v, **options)
    assert out.shape == (*q.shape[:3], v.shape[-1]) and out.dtype == q.dtype
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE, q.dtype)
    truth = torch_sdpa(q, k, v, dout, torch.float64, **options)
    lowp = torch_sdpa(q, k, v, dout, q.dtype, **options) if q.dtype != torch.float32 else (None, [None] * 3)
    assert_close("out", out, truth[0], lowp[0], factor=OUTPUT_FACTOR)
    if check_grads:
        out.backward(dout)
        for name, tensor, true_grad, lowp_grad in zip(("dq", "dk", "dv"), (q, k, v), truth[1], lowp[1]):
            assert_close(name, tensor.grad, true_grad, lowp_grad, factor=GRADIENT_FACTOR)
    return out


@pytest.mark.parametrize(
    "seqlen_q,seqlen_k", [(37, 70), (70, 37), (50, 50), (1, 33)], ids=["sq<sk", "sq>sk", "sq=sk", "one-query"]
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_is_causal_is_top_left(seqlen_q, seqlen_k, dtype):
    q, k, v = make_inputs(1, 2, 2, seqlen_q, seqlen_k, 32, dtype)
    check_sdpa(q, k, v, is_causal=True)


def test_is_causal_with_more_keys_gives_zero_gradient_to_unseen_keys():
    """With Sk > Sq, keys from Sq on are beyond every query; their dk and dv are exactly 0."""
    q, k, v = make_inputs(1, 2, 2, 20, 45, 16, torch.float32)
    fs.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    assert torch.all(k.grad[:, :, 20:] == 0) and torch.all(v.grad[:, :, 20:] == 0)
    assert torch.all(v.grad[:, :, :20].abs().sum(-1) > 0)


def test_no_mask_bfloat16_and_value_head_dim():
    q, k, v = make_inputs(2, 2, 2, 45, 61, 40, torch.bfloat16, head_dim_v=24)
    check_sdpa(q, k, v)


MASK_SHAPES = {
    "sq-sk": lambda b, h, sq, sk: (sq, sk),
    "padding": lambda b, h, sq, sk: (b, 1, 1, sk),
    "per-head": lambda b, h, sq, sk: (1, h, sq, sk),
    "full": lambda b, h, sq, sk: (b, h, sq, sk),
    "per-key": lambda b, h, sq, sk: (sk,),
    "per-query": lambda b, h, sq, sk: (b, 1, sq, 1),
}


@pytest.mark.parametrize("shape", MASK_SHAPES.values(), ids=MASK_SHAPES.keys())
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masks_broadcast(shape, kind):
    """Bool masks (True = takes part) and float masks added to the scores, in every broadcast shape.

    The per-query bool mask drops whole rows: torch gives them 0, and so do the kernels."""
    batch, heads, seqlen_q, seqlen_k = 2, 2, 33, 47
    q, k, v = make_inputs(batch, heads, heads, seqlen_q, seqlen_k, 32, torch.float16)
    generator = torch.Generator().manual_seed(3)
    mask_shape = shape(batch, heads, seqlen_q, seqlen_k)
    if kind == "bool":
        mask = (torch.rand(mask_shape, generator=generator) < 0.7).to(DEVICE)
    else:
        mask = torch.randn(mask_shape, generator=generator).to(DEVICE, torch.float16)
    check_sdpa(q, k, v, attn_mask=mask)


def test_float32_mask_with_half_inputs():
    """torch takes a float32 mask with float16 inputs; so do the kernels, adding it in float32."""
    q, k, v = make_inputs(1, 2, 2, 40, 52, 32, torch.float16)
    mask = torch.randn(40, 52, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    mask[:, ::5] = float("-inf")
    check_sdpa(q, k, v, attn_mask=mask)


def test_fully_masked_rows_are_zero_like_torch():
    q, k, v = make_inputs(1, 2, 2, 30, 40, 16, torch.float32)
    mask = torch.ones(1, 1, 30, 40, dtype=torch.bool, device=DEVICE)
    mask[..., 4:9, :] = False
    out = check_sdpa(q, k, v, attn_mask=mask)
    assert torch.all(out[:, :, 4:9] == 0) and torch.all(q.grad[:, :, 4:9] == 0)
    assert not torch.isnan(out).any()


def test_scale():
    q, k, v = make_inputs(1, 2, 2, 41, 41, 48, torch.float32)
    check_sdpa(q, k, v, scale=0.37, is_causal=True)


@pytest.mark.parametrize("heads_kv", [2, 1], ids=["gqa", "mqa"])
def test_enable_gqa(heads_kv):
    q, k, v = make_inputs(1, 4, heads_kv, 37, 51, 32, torch.bfloat16)
    check_sdpa(q, k, v, is_causal=True, enable_gqa=True)


def test_enable_gqa_with_mask():
    q, k, v = make_inputs(2, 4, 2, 29, 43, 32, torch.float16)
    mask = torch.rand(2, 4, 29, 43, generator=torch.Generator().manual_seed(2)).to(DEVICE) < 0.8
    check_sdpa(q, k, v, attn_mask=mask, enable_gqa=True)


def test_strided_views_are_served():
    """(B, S, H, D) projections passed as ``.transpose(1, 2)``, as transformer code does."""
    generator = torch.Generator().manual_seed(6)
    q, k, v = (
        torch.randn(2, length, 3, 32, generator=generator).to(DEVICE, torch.float16).transpose(1, 2)
        for length in (35, 50, 50)
    )
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    check_sdpa(q, k, v, is_causal=True)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(0, 9), (9, 0)], ids=["no-queries", "no-keys"])
def test_empty_lengths(seqlen_q, seqlen_k):
    q, k, v = make_inputs(1, 2, 2, seqlen_q, seqlen_k, 16, torch.float32)
    out = fs.scaled_dot_product_attention(q, k, v)
    assert torch.equal(out, TORCH_SDPA(q, k, v))


def test_kernels_run_the_served_calls(monkeypatch):
    """A call the kernels serve reaches the forward custom op; nothing else computes it."""
    calls = []
    original = torch.ops.flash_softmax.attention_forward

    def counting_op(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr("flash_softmax.attention.function.attention_forward_op", counting_op)
    q, k, v = make_inputs(1, 2, 2, 10, 12, 16, torch.float32)
    fs.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5)
    assert len(calls) == 1
    # No sinks, slopes or dropout state; scale, left, right = Sq - min(Sk, Sq), softcap, dropout_p.
    assert calls[0][4:] == (None, None, None, 0.5, -1, 0, 0.0, 0.0)


def test_float_mask_that_requires_grad_gets_torchs_gradient():
    """The mask's gradient is computed by the kernels (no fallback), summed over its broadcast dims."""
    q, k, v = make_inputs(2, 2, 2, 11, 13, 16, torch.float32)
    mask = torch.randn(2, 1, 11, 13, generator=torch.Generator().manual_seed(5)).to(DEVICE).requires_grad_()
    assert fallback_reason(q, k, v, attn_mask=mask) is None
    out = fs.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    dout = torch.randn_like(out)
    out.backward(dout)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, mask)]
    with sdpa_kernel(SDPBackend.MATH):
        expected = TORCH_SDPA(*leaves[:3], attn_mask=leaves[3])
    expected.backward(dout.double())
    assert_close("out", out, expected, None)
    for name, tensor, leaf in zip(("dq", "dk", "dv", "dmask"), (q, k, v, mask), leaves):
        assert_close(name, tensor.grad, leaf.grad, None)


def test_dropout_runs_in_the_kernels_and_reproduces():
    """dropout_p > 0 is served by the kernels; torch.manual_seed reproduces the call, and the result is the
    reference's with the same random state (an independent Philox in plain PyTorch)."""
    q, k, v = make_inputs(1, 2, 2, 19, 23, 16, torch.float32)
    assert fallback_reason(q, k, v, dropout_p=0.25, is_causal=True) is None
    fs.reset_stats()
    torch.manual_seed(3)
    out = fs.scaled_dot_product_attention(q, k, v, dropout_p=0.25, is_causal=True)
    assert fs.stats()["fallbacks"] == {}
    torch.manual_seed(3)
    again = fs.scaled_dot_product_attention(q, k, v, dropout_p=0.25, is_causal=True)
    assert torch.equal(out, again)
    assert not torch.equal(out, fs.scaled_dot_product_attention(q, k, v, dropout_p=0.25, is_causal=True))
    torch.manual_seed(3)
    # torch's top-left is_causal with Sq < Sk never reaches keys past Sq: the drop-in attends the first Sq.
    expected = fs.reference.attention(*(t.double() for t in (q, k[:, :, :19], v[:, :, :19])), causal=True,
                                      dropout_p=0.25)
    assert_close("out", out, expected, None)


def _fallback_cases():
    def inputs(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, dtype=torch.float32, head_dim_v=None):
        return make_inputs(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, dtype, head_dim_v=head_dim_v)

    def three_dims():
        q, k, v = inputs(2, 1, 1, 9, 11, 16)
        return (q[:, 0], k[:, 0], v[:, 0]), {}

    def five_dims():
        q, k, v = inputs(2, 2, 2, 9, 11, 16)
        return (q[None], k[None], v[None]), {"is_causal": True}

    def mask_and_causal():
        q, k, v = inputs(1, 2, 2, 9, 11, 16)
        return (q, k, v), {"attn_mask": torch.rand(9, 11, device=DEVICE) < 0.8, "is_causal": True}

    return {
        "dropout-of-one": lambda: (inputs(1, 2, 2, 9, 11, 16), {"dropout_p": 1.0}),
        "float64": lambda: (inputs(1, 2, 2, 9, 11, 16, torch.float64), {"is_causal": True}),
        "head-dim-300": lambda: (inputs(1, 1, 1, 5, 6, 300), {}),
        "value-head-dim-300": lambda: (inputs(1, 1, 1, 5, 6, 16, head_dim_v=300), {}),
        "3-d": three_dims,
        "5-d": five_dims,
        "mask-and-causal": mask_and_causal,
        "one-kv-head-without-gqa": lambda: (inputs(1, 2, 1, 9, 11, 16), {}),
    }


FALLBACK_CASES = _fallback_cases()


@pytest.mark.parametrize("case", FALLBACK_CASES.values(), ids=FALLBACK_CASES.keys())
def test_fallback_gives_torch_result_and_gradients(case, monkeypatch):
    (q, k, v), options = case()
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    assert fallback_reason(q, k, v, **options) is not None

    def kernels_must_not_run(*args, **kwargs):
        raise AssertionError("the kernels ran a call they cannot serve")

    monkeypatch.setattr(sdpa_module, "flash_attention", kernels_must_not_run)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(11)  # dropout draws the same mask in both calls
    ours = fs.scaled_dot_product_attention(q, k, v, **options)
    torch.manual_seed(11)
    theirs = TORCH_SDPA(*leaves, **options)
    assert torch.equal(ours, theirs)
    dout = torch.randn_like(ours)
    torch.manual_seed(11)
    ours.backward(dout)
    torch.manual_seed(11)
    theirs.backward(dout)
    for tensor, leaf in zip((q, k, v), leaves):
        assert torch.equal(tensor.grad, leaf.grad)


ERROR_CASES = {
    "gqa-heads-do-not-divide": ((1, 3, 2, 5, 6, 16), {"enable_gqa": True}),
    "heads-differ-without-gqa": ((1, 4, 2, 5, 6, 16), {}),
    "mask-does-not-broadcast": ((1, 2, 2, 5, 6, 16), {"attn_mask": torch.ones(4, 6, dtype=torch.bool)}),
    "integer-mask": ((1, 2, 2, 5, 6, 16), {"attn_mask": torch.ones(5, 6, dtype=torch.int32)}),
    "half-mask-with-float32": ((1, 2, 2, 5, 6, 16), {"attn_mask": torch.ones(5, 6, dtype=torch.float16)}),
}


@pytest.mark.parametrize("shape,options", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_errors_are_torch_errors(shape, options):
    q, k, v = make_inputs(*shape, torch.float32)
    options = {name: value.to(DEVICE) if isinstance(value, torch.Tensor) else value
               for name, value in options.items()}
    with pytest.raises(RuntimeError) as theirs:
        TORCH_SDPA(q, k, v, **options)
    with pytest.raises(RuntimeError) as ours:
        fs.scaled_dot_product_attention(q, k, v, **options)
    assert str(ours.value) == str(theirs.value)


def test_mixed_dtypes_are_torch_errors():
    q, k, v = make_inputs(1, 2, 2, 5, 6, 16, torch.float32)
    with pytest.raises(RuntimeError) as theirs:
        TORCH_SDPA(q, k.double(), v)
    with pytest.raises(RuntimeError) as ours:
        fs.scaled_dot_product_attention(q, k.double(), v)
    assert str(ours.value) == str(theirs.value)


@pytest.fixture
def counted_sdpa(monkeypatch):
    """Calls that reach our function while torch's name is patched."""
    calls = []
    original = fs.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(sdpa_module, "scaled_dot_product_attention", counting)
    yield calls
    assert F.scaled_dot_product_attention is TORCH_SDPA, "a test left torch's SDPA patched"


def test_patch_sdpa_routes_and_restores(counted_sdpa):
    q, k, v = make_inputs(1, 2, 2, 12, 17, 16, torch.float32)
    with fs.patch_sdpa() as patch:
        assert isinstance(patch, fs.patch_sdpa)
        assert sdpa_module.sdpa_is_patched()
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert len(counted_sdpa) == 1 and counted_sdpa[0] == {"is_causal": True}
    assert F.scaled_dot_product_attention is TORCH_SDPA
    assert_close("out", out, TORCH_SDPA(q.double(), k.double(), v.double(), is_causal=True), None)
    F.scaled_dot_product_attention(q, k, v)
    assert len(counted_sdpa) == 1


def test_patch_sdpa_restores_when_the_body_raises(counted_sdpa):
    with pytest.raises(KeyError):
        with fs.patch_sdpa():
            assert F.scaled_dot_product_attention is not TORCH_SDPA
            raise KeyError("raised inside the block")
    assert F.scaled_dot_product_attention is TORCH_SDPA


def test_patch_sdpa_as_a_switch_and_nested(counted_sdpa):
    patched = sdpa_module.scaled_dot_product_attention
    try:
        fs.patch_sdpa(enable=True)
        assert F.scaled_dot_product_attention is patched
        with fs.patch_sdpa(enable=False):
            assert F.scaled_dot_product_attention is TORCH_SDPA
            with fs.patch_sdpa():
                assert F.scaled_dot_product_attention is patched
            assert F.scaled_dot_product_attention is TORCH_SDPA
        assert F.scaled_dot_product_attention is patched
    finally:
        fs.patch_sdpa(enable=False)
    assert F.scaled_dot_product_attention is TORCH_SDPA


def test_patch_sdpa_fallback_never_calls_the_patched_name():
    """Inside the patch, a call the kernels cannot serve reaches torch's function, not the patch again."""
    q, k, v = make_inputs(1, 2, 2, 5, 6, 16, torch.float64)
    with fs.patch_sdpa():
        out = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(out, TORCH_SDPA(q, k, v))


def test_patch_sdpa_enable_must_be_bool():
    with pytest.raises(TypeError, match="enable must be a bool, got str"):
        fs.patch_sdpa("yes")
    assert F.scaled_dot_product_attention is TORCH_SDPA
