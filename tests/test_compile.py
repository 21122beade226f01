"""``torch.compile(fullgraph=True)`` through the attention custom ops, and ``torch.library.opcheck``.

The custom ops are opaque to the compiler: a compiled graph calls the same kernels on the same
tensors as eager, so compiled results must equal eager ones bit for bit. On a CPU the graphs compile
with ``aot_eager`` (the full tracing, fake tensors and autograd, without generating code); inductor,
which needs a GPU to be quick, runs where CUDA is present.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import flash_softmax as fs

from conftest import DEVICE
from test_attention import make_inputs

BACKEND = "inductor" if DEVICE == "cuda" else "aot_eager"


@pytest.fixture(autouse=True)
def fresh_compile_caches():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def run_with_grads(fn, inputs, dout):
    """fn's outputs and the gradients of its differentiable inputs, from detached copies of ``inputs``."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    outputs[0].backward(dout)
    return outputs, [t.grad for t in leaves if t.requires_grad]


def assert_equal_results(compiled, eager):
    for name, got, expected in zip(("outputs", "grads"), compiled, eager):
        assert len(got) == len(expected)
        for index, (a, b) in enumerate(zip(got, expected)):
            assert a.shape == b.shape and a.dtype == b.dtype, f"{name}[{index}]"
            assert torch.equal(a, b), f"{name}[{index}] differs: max {(a.double() - b.double()).abs().max()}"


def bias_for(kind, batch, heads, seqlen_q, seqlen_k):
    generator = torch.Generator().manual_seed(4)
    if kind == "bool":
        return (torch.rand(batch, 1, 1, seqlen_k, generator=generator) < 0.8).to(DEVICE)
    return torch.randn(batch, heads, seqlen_q, seqlen_k, generator=generator).to(DEVICE)


CASES = {
    "causal": ({"causal": True}, (1, 2, 2), None),
    "window-softcap": ({"window_size": (9, 3), "softcap": 15.0, "softmax_scale": 0.3}, (1, 2, 2), None),
    "gqa-float-bias": ({"causal": True}, (2, 4, 2), "float"),
    "bool-mask-return-lse": ({"return_lse": True}, (2, 2, 1), "bool"),
}


@pytest.mark.parametrize("options,heads,bias_kind", CASES.values(), ids=CASES.keys())
def test_compiled_flash_attention_equals_eager(options, heads, bias_kind):
    batch, heads_q, heads_kv = heads
    seqlen_q, seqlen_k = 37, 45
    q, k, v = make_inputs(batch, heads_q, heads_kv, seqlen_q, seqlen_k, 32, torch.float16)
    inputs = [q, k, v]
    if bias_kind is not None:
        inputs.append(bias_for(bias_kind, batch, heads_q, seqlen_q, seqlen_k))

    def attention(q, k, v, bias=None):
        return fs.flash_attention(q, k, v, attn_bias=bias, **options)

    compiled = torch.compile(attention, fullgraph=True, backend=BACKEND)
    dout = torch.randn(batch, heads_q, seqlen_q, 32, generator=torch.Generator().manual_seed(1))
    dout = dout.to(DEVICE, q.dtype)
    result = run_with_grads(compiled, inputs, dout)
    assert_equal_results(result, run_with_grads(attention, inputs, dout))
    if options.get("return_lse"):
        assert result[0][1].dtype == torch.float32 and result[0][1].requires_grad  # a loss on lse reaches q, k


def test_graphs_hold_the_custom_ops():
    """The forward graph calls the forward op and the backward graph the backward op: no graph break,
    no decomposition into something else."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {"forward": [], "backward": []}

    def recorder(kind):
        def compiler(graph_module, example_inputs):
            graphs[kind].append(graph_module)
            return make_boxed_func(graph_module.forward)

        return compiler

    backend = aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))
    q, k, v = make_inputs(1, 2, 2, 20, 30, 16, torch.float32)
    def attention(q, k, v):
        return fs.flash_attention(q, k, v, causal=True)

    compiled = torch.compile(attention, fullgraph=True, backend=backend)
    compiled(q, k, v).sum().backward()

    def targets(kind):
        assert len(graphs[kind]) == 1, f"{len(graphs[kind])} {kind} graphs"
        return {str(node.target) for node in graphs[kind][0].graph.nodes if node.op == "call_function"}

    assert "flash_softmax.attention_forward.default" in targets("forward")
    assert "flash_softmax.attention_backward.default" in targets("backward")


def test_compiled_sdpa_equals_eager():
    q, k, v = make_inputs(1, 4, 2, 29, 40, 16, torch.float32)
    mask = (torch.rand(29, 40, generator=torch.Generator().manual_seed(2)) < 0.9).to(DEVICE)

    def attention(q, k, v):
        causal = fs.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        masked = fs.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return causal + masked

    compiled = torch.compile(attention, fullgraph=True, backend=BACKEND)
    dout = torch.randn(1, 4, 29, 16, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    assert_equal_results(run_with_grads(compiled, [q, k, v], dout), run_with_grads(attention, [q, k, v], dout))


class TinyDecoder(nn.Module):
    """Embedding, one causal grouped-query attention block with padding, and a head."""

    def __init__(self, vocab=50, width=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm = nn.LayerNorm(width)
        self.attention = fs.MultiheadAttention(width, num_heads=4, num_kv_heads=2, causal=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens, padding):
        x = self.embed(tokens)
        attended, _ = self.attention(self.norm(x), key_padding_mask=padding)
        return self.head(x + attended)


def test_compiled_model_equals_eager(monkeypatch):
    torch.manual_seed(0)
    model = TinyDecoder().to(DEVICE)
    tokens = torch.randint(0, 50, (2, 33), device=DEVICE)
    padding = torch.zeros(2, 33, dtype=torch.bool, device=DEVICE)
    padding[1, 25:] = True

    def loss_and_grads(module):
        module.zero_grad()
        logits = module(tokens, padding)
        logits.float().square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in module.parameters()]

    eager_logits, eager_grads = loss_and_grads(model)
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND)
    compiled_logits, compiled_grads = loss_and_grads(compiled)
    if BACKEND == "aot_eager":
        # Same ATen ops in the same order: nothing may change.
        assert torch.equal(compiled_logits, eager_logits)
        for got, expected in zip(compiled_grads, eager_grads):
            assert torch.equal(got, expected)
    else:
        # Inductor fuses the projections and norms, which reorders float32 sums: the accuracy policy's
        # float32 rule against a float64 run of the same model, its attention by the reference.
        import copy

        import flash_softmax.mha
        from flash_softmax import reference
        from flash_softmax.testing import assert_close

        monkeypatch.setattr(flash_softmax.mha, "flash_attention", reference.attention)
        truth_logits, truth_grads = loss_and_grads(copy.deepcopy(model).double())
        assert_close("logits", compiled_logits, truth_logits, None)
        for got, truth in zip(compiled_grads, truth_grads):
            assert_close("grad", got, truth, None)


def _op_arguments(bias, modifiers=False):
    """The forward op's arguments: inputs, bias, then sinks, ALiBi slopes and dropout's random state (all
    given with ``modifiers``), then scale, window, softcap and dropout_p."""
    q, k, v = make_inputs(1, 2, 1, 9, 13, 8, torch.float32)
    if not modifiers:
        return q, k, v, bias, None, None, None, 0.4, 5, 2, 12.0, 0.0
    sinks = torch.randn(2, device=DEVICE, requires_grad=True)
    slopes = torch.rand(2, device=DEVICE)
    rng_state = torch.tensor([123456789, 42], dtype=torch.int64, device=DEVICE)
    return q, k, v, bias, sinks, slopes, rng_state, 0.4, 5, 2, 12.0, 0.25


@pytest.mark.parametrize("bias_kind", [None, "bool", "float"])
@pytest.mark.parametrize("modifiers", [False, True])
def test_opcheck_forward(bias_kind, modifiers):
    """Schema, fake implementation (shapes, dtypes, strides), autograd registration, AOT dispatch."""
    bias = None if bias_kind is None else bias_for(bias_kind, 1, 2, 9, 13)
    if bias_kind == "float" and modifiers:
        bias = bias.requires_grad_()
    torch.library.opcheck(torch.ops.flash_softmax.attention_forward.default, _op_arguments(bias, modifiers))


@pytest.mark.parametrize("modifiers", [False, True])
def test_opcheck_backward(modifiers):
    q, k, v, bias, sinks, slopes, rng_state, *scalars = _op_arguments(bias_for("float", 1, 2, 9, 13), modifiers)
    out, lse = torch.ops.flash_softmax.attention_forward(q, k, v, bias, sinks, slopes, rng_state, *scalars)
    # A (B, S, H, D) gradient seen as (B, H, S, D): the op reads it in place.
    dout = torch.randn(1, 9, 2, 8, device=DEVICE).transpose(1, 2)
    dlse = torch.randn_like(lse) if modifiers else None
    sinks = None if sinks is None else sinks.detach()
    arguments = (dout, dlse, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), bias, sinks, slopes,
                 rng_state, *scalars, modifiers)
    torch.library.opcheck(torch.ops.flash_softmax.attention_backward.default, arguments)


def test_fake_strides_follow_the_launchers():
    """A last dim with stride != 1 is copied by the ops; the fake results' layouts say the same."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q = torch.randn(1, 2, 9, 16, device=DEVICE)[..., ::2]
    k = torch.randn(1, 9, 2, 8, device=DEVICE).transpose(1, 2)  # BSHD view, last dim contiguous
    v = torch.randn(1, 2, 9, 8, device=DEVICE)
    scalars = (0.3, -1, -1, 0.0, 0.0)
    ops = torch.ops.flash_softmax
    real_out, real_lse = ops.attention_forward(q, k, v, None, None, None, None, *scalars)
    real_grads = ops.attention_backward(real_out, None, q, k, v, real_out, real_lse, None, None, None,
        None, *scalars, False)[:3]
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fake_out, fake_lse = ops.attention_forward(fq, fk, fv, None, None, None, None, *scalars)
        fake_grads = ops.attention_backward(fake_out, None, fq, fk, fv, fake_out, fake_lse, None, None, None,
            None, *scalars, False)[:3]
    for real, fake in zip((real_out, real_lse, *real_grads), (fake_out, fake_lse, *fake_grads)):
        assert (real.shape, real.stride(), real.dtype) == (fake.shape, fake.stride(), fake.dtype)
    assert real_grads[1].stride() == k.stride()  # dk keeps k's BSHD layout
