"""``fs.MultiheadAttention`` against ``torch.nn.MultiheadAttention``, by the accuracy policy (docs/semantics.md).

``from_torch`` copies a torch module; both run the same inputs and the results are judged against the
torch module run in float64 (the truth), with torch's module in the input dtype as the low-precision
reference. The grouped-query module, which torch's module cannot express, is judged against the same
computation written out from its own weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import flash_softmax as fs
from flash_softmax.testing import GRADIENT_FACTOR, OUTPUT_FACTOR, assert_close

from conftest import DEVICE

EMBED, HEADS = 64, 4


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def torch_module(dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    module = nn.MultiheadAttention(EMBED, HEADS, batch_first=kwargs.pop("batch_first", True), **kwargs)
    with torch.no_grad():  # torch zeroes the biases at init; random ones are checked too
        for parameter in (module.in_proj_bias, module.out_proj.bias):
            if parameter is not None:
                parameter.normal_()
    return module.to(DEVICE, dtype)


def projection_grads(module):
    """Gradients of the q, k, v and out projection weights, in that order, for either module."""
    if isinstance(module, fs.MultiheadAttention):
        layers = (module.q_proj, module.k_proj, module.v_proj, module.out_proj)
        return [layer.weight.grad for layer in layers]
    if module._qkv_same_embed_dim:
        qkv = list(module.in_proj_weight.grad.chunk(3))
    else:
        qkv = [module.q_proj_weight.grad, module.k_proj_weight.grad, module.v_proj_weight.grad]
    return qkv + [module.out_proj.weight.grad]


def run(module, inputs, dout, dtype, **kwargs):
    """Output, input gradients and projection weight gradients of ``module`` (copied to ``dtype``)."""
    module = copy.deepcopy(module).to(dtype)
    leaves = [x.detach().to(dtype).requires_grad_() for x in inputs]
    kwargs = {name: value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
              for name, value in kwargs.items()}
    out, weights = module(*leaves, need_weights=False, **kwargs)
    assert weights is None
    out.backward(dout.to(dtype))
    return out, [x.grad for x in leaves] + projection_grads(module)


def check_against_torch(torch_mha, inputs, dtype=torch.float32, causal=False, ours_kwargs=None, **kwargs):
    """from_torch(torch_mha) on ``inputs`` against torch_mha, by the accuracy policy; returns our output."""
    ours = fs.MultiheadAttention.from_torch(torch_mha, causal=causal)
    inputs = [x.to(dtype) for x in inputs]
    query_shape = inputs[0].shape
    dout = randn(*query_shape, dtype=dtype, seed=9)
    out, grads = run(ours, inputs, dout, dtype, **(kwargs if ours_kwargs is None else ours_kwargs))
    truth_out, truth_grads = run(torch_mha, inputs, dout, torch.float64, **kwargs)
    if dtype == torch.float32:
        lowp_out, lowp_grads = None, [None] * len(grads)
    else:
        lowp_out, lowp_grads = run(torch_mha, inputs, dout, dtype, **kwargs)
    assert out.shape == query_shape and out.dtype == dtype
    assert_close("out", out, truth_out, lowp_out, factor=OUTPUT_FACTOR)
    names = [f"d_input{i}" for i in range(len(inputs))] + ["dW_q", "dW_k", "dW_v", "dW_out"]
    for name, grad, truth, lowp in zip(names, grads, truth_grads, lowp_grads):
        assert_close(name, grad, truth, lowp, factor=GRADIENT_FACTOR)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_self_attention(dtype):
    x = randn(2, 37, EMBED)
    check_against_torch(torch_module(), [x, x, x], dtype=dtype)


def test_self_attention_query_only_call():
    """``module(x)`` is self-attention: key and value default to the query."""
    x = randn(2, 21, EMBED)
    torch_mha = torch_module()
    ours = fs.MultiheadAttention.from_torch(torch_mha)
    expected, _ = torch_mha(x, x, x, need_weights=False)
    assert_close("out", ours(x)[0], expected.double(), None)


def test_cross_attention_with_kdim_vdim():
    torch_mha = torch_module(kdim=24, vdim=40)
    assert not torch_mha._qkv_same_embed_dim
    query, key, value = randn(2, 29, EMBED, seed=1), randn(2, 45, 24, seed=2), randn(2, 45, 40, seed=3)
    check_against_torch(torch_mha, [query, key, value])


def test_without_bias():
    x = randn(2, 30, EMBED)
    check_against_torch(torch_module(bias=False), [x, x, x])


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_key_padding_mask(kind):
    """Left padding, right padding, and a fully padded sequence, whose queries see no key: their
    attention output is 0 (as torch's float64 truth has it), so the output is the out projection's bias."""
    query, memory = randn(3, 25, EMBED, seed=1), randn(3, 33, EMBED, seed=2)
    padding = torch.zeros(3, 33, dtype=torch.bool, device=DEVICE)
    padding[0, :6] = True
    padding[1] = True
    padding[2, 20:] = True
    mask = padding if kind == "bool" else torch.zeros(3, 33, device=DEVICE).masked_fill(padding, float("-inf"))
    torch_mha = torch_module()
    out = check_against_torch(torch_mha, [query, memory, memory], key_padding_mask=mask)
    assert torch.equal(out[1], torch_mha.out_proj.bias.detach().expand(25, EMBED))


def test_causal_attn_mask():
    x = randn(2, 41, EMBED)
    bool_mask = torch.ones(41, 41, dtype=torch.bool, device=DEVICE).triu(1)  # True = not allowed
    float_mask = nn.Transformer.generate_square_subsequent_mask(41, device=DEVICE)
    torch_mha = torch_module()
    out_bool = check_against_torch(torch_mha, [x, x, x], attn_mask=bool_mask)
    out_float = check_against_torch(torch_mha, [x, x, x], attn_mask=float_mask)
    # The same mask from the kernels' causal band: by the module's flag or by the call's is_causal hint.
    out_flag = check_against_torch(torch_mha, [x, x, x], causal=True, ours_kwargs={}, attn_mask=bool_mask)
    out_hint = check_against_torch(torch_mha, [x, x, x], ours_kwargs={"is_causal": True},
                                   attn_mask=float_mask, is_causal=True)
    for out in (out_float, out_flag, out_hint):
        assert_close("out", out, out_bool.double(), None)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask and attn_mask is deprecated")
def test_per_head_mask_with_padding_and_float16():
    """A (B * H, Sq, Sk) float mask combined with a bool padding mask into one bias."""
    query, memory = randn(2, 30, EMBED, seed=4), randn(2, 38, EMBED, seed=5)
    attn_mask = randn(2 * HEADS, 30, 38, seed=6)
    padding = torch.zeros(2, 38, dtype=torch.bool, device=DEVICE)
    padding[1, 30:] = True
    check_against_torch(torch_module(), [query, memory, memory], dtype=torch.float16,
                        attn_mask=attn_mask, key_padding_mask=padding)


def test_sequence_first_layout():
    torch_mha = torch_module(batch_first=False)
    ours = fs.MultiheadAttention.from_torch(torch_mha)
    assert not ours.batch_first
    query, memory = randn(27, 2, EMBED, seed=1), randn(35, 2, EMBED, seed=2)
    check_against_torch(torch_mha, [query, memory, memory])


def test_heads_are_views_of_the_projections(monkeypatch):
    """The (B, H, S, D) heads handed to the kernels are views of the projections, never copies."""
    import flash_softmax.mha as mha

    seen = []

    def recording(q, k, v, **options):
        seen.append((q, k, v))
        return fs.flash_attention(q, k, v, **options)

    monkeypatch.setattr(mha, "flash_attention", recording)
    module = fs.MultiheadAttention(EMBED, HEADS, num_kv_heads=2, device=DEVICE)
    module(randn(2, 19, EMBED))
    q, k, v = seen[0]
    assert q.shape == (2, HEADS, 19, EMBED // HEADS) and k.shape == (2, 2, 19, EMBED // HEADS)
    assert all(t.stride(-1) == 1 and not t.is_contiguous() for t in (q, k, v))


def grouped_reference(module, query, key, padding, dtype):
    """The module's computation written out from its weights, in ``dtype``, with torch's SDPA."""
    weights = {name: p.detach().to(dtype) for name, p in module.named_parameters()}
    query, key = query.to(dtype), key.to(dtype)
    q = F.linear(query, weights["q_proj.weight"], weights["q_proj.bias"])
    k = F.linear(key, weights["k_proj.weight"], weights["k_proj.bias"])
    v = F.linear(key, weights["v_proj.weight"], weights["v_proj.bias"])
    q = rearrange(q, "b s (h d) -> b h s d", h=module.num_heads)
    k, v = (rearrange(t, "b s (h d) -> b h s d", h=module.num_kv_heads) for t in (k, v))
    group = module.num_heads // module.num_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    causal = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=DEVICE).tril(seqlen_k - seqlen_q)
    keep = causal & ~padding[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    return F.linear(rearrange(out, "b h s d -> b s (h d)"), weights["out_proj.weight"], weights["out_proj.bias"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grouped_query_module(dtype):
    """4 query heads over 2 key/value heads, causal (bottom-right: queries are the last Sq positions of
    the keys) with padding; against the written-out computation in float64 and in the input dtype."""
    torch.manual_seed(0)
    module = fs.MultiheadAttention(EMBED, HEADS, num_kv_heads=2, causal=True, device=DEVICE, dtype=dtype)
    assert module.k_proj.out_features == 2 * EMBED // HEADS
    query, key = randn(2, 23, EMBED, dtype=dtype, seed=1), randn(2, 40, EMBED, dtype=dtype, seed=2)
    padding = torch.zeros(2, 40, dtype=torch.bool, device=DEVICE)
    padding[0, :5] = True
    out, weights = module(query, key, key_padding_mask=padding)
    assert weights is None and out.shape == query.shape and out.dtype == dtype
    truth = grouped_reference(module, query, key, padding, torch.float64)
    lowp = grouped_reference(module, query, key, padding, dtype) if dtype != torch.float32 else None
    assert_close("out", out, truth, lowp)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"embed_dim": 60, "num_heads": 8}, ValueError, "embed_dim must be divisible by num_heads, got embed_dim 60"),
        ({"embed_dim": 64, "num_heads": 4, "num_kv_heads": 3}, ValueError, "multiple of num_kv_heads"),
        ({"embed_dim": 0, "num_heads": 1}, ValueError, "embed_dim must be a positive int, got 0"),
        ({"embed_dim": 600, "num_heads": 2}, ValueError, "at most 256, got 600 / 2 = 300"),
        ({"embed_dim": 64, "num_heads": 4, "dropout": 1.0}, ValueError, r"dropout_p must be in \[0, 1\), got 1.0"),
        ({"embed_dim": 64, "num_heads": 4, "causal": 1}, TypeError, "causal must be a bool, got int"),
    ],
)
def test_constructor_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        fs.MultiheadAttention(**kwargs)


def test_call_errors():
    module = fs.MultiheadAttention(EMBED, HEADS, device=DEVICE)
    x = randn(2, 10, EMBED)
    with pytest.raises(ValueError, match="need_weights=True is not supported"):
        module(x, x, x, need_weights=True)
    with pytest.raises(ValueError, match=r"query must have shape \(B, S, 64\), got \(2, 10, 32\)"):
        module(randn(2, 10, 32))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, Sk\) = \(2, 10\), got \(2, 9\)"):
        module(x, key_padding_mask=torch.zeros(2, 9, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(Sq, Sk\) = \(10, 10\) or"):
        module(x, attn_mask=torch.zeros(3, 10, 10, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="attn_mask must be a bool or floating tensor, got torch.int64"):
        module(x, attn_mask=torch.zeros(10, 10, dtype=torch.long, device=DEVICE))


def test_from_torch_errors():
    with pytest.raises(ValueError, match="add_bias_kv or add_zero_attn"):
        fs.MultiheadAttention.from_torch(nn.MultiheadAttention(EMBED, HEADS, add_bias_kv=True))
    with pytest.raises(TypeError, match="must be a torch.nn.MultiheadAttention, got Linear"):
        fs.MultiheadAttention.from_torch(nn.Linear(4, 4))


def test_dropout_applies_in_training_only():
    """The module's dropout runs in the kernels in training mode, reproducibly under torch.manual_seed, and
    not at all in eval mode; from_torch copies the probability."""
    module = fs.MultiheadAttention.from_torch(torch_module(dropout=0.3))
    assert module.dropout == 0.3
    x = randn(2, 10, EMBED)
    module.eval()
    plain, _ = module(x)
    torch.manual_seed(0)
    assert torch.equal(plain, module(x)[0])
    module.train()
    torch.manual_seed(0)
    dropped, _ = module(x)
    torch.manual_seed(0)
    assert torch.equal(dropped, module(x)[0])
    assert not torch.allclose(dropped, plain)
