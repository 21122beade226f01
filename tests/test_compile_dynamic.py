"""``torch.compile(dynamic=True)``: symbolic batch sizes and lengths through every entry point.

The argument checks of ``flash_attention`` and ``scaled_dot_product_attention`` read shapes, which are
symbolic under ``dynamic=True``: a check that needs a concrete value would break the graph (an error under
``fullgraph=True``) or specialise it (a recompile for every new shape). Each test compiles once, then
runs new batch sizes and lengths, and asks for the eager results bit for bit, with no second compile.

On a CPU the graphs compile with ``aot_eager`` (full tracing with fake tensors and autograd, no code
generation); where CUDA is present, inductor. The custom ops are opaque to both, so the kernels that run
are the eager ones.
"""

from __future__ import annotations

import pytest
import torch

import flash_softmax as fs

from conftest import DEVICE

BACKEND = "inductor" if DEVICE == "cuda" else "aot_eager"

#: (batch, query length, key length) of successive calls. The first avoids sizes 0 and 1 (which torch
#: always specialises) and any size equal to another dim (duck sizing would tie them together).
SHAPES = [(3, 9, 13), (5, 17, 21), (2, 30, 41)]
HEADS_Q, HEADS_KV, HEAD_DIM = 4, 2, 16


class CountingBackend:
    """A ``torch.compile`` backend that counts the graphs it is given, then hands them to ``BACKEND``."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        from torch._dynamo import lookup_backend

        return lookup_backend(BACKEND)(graph_module, example_inputs)


@pytest.fixture(autouse=True)
def fresh_compile_caches():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def inputs(batch, seqlen_q, seqlen_k, heads_kv=HEADS_KV, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, HEADS_Q, seqlen_q, HEAD_DIM, generator=generator)
    k = torch.randn(batch, heads_kv, seqlen_k, HEAD_DIM, generator=generator)
    v = torch.randn(batch, heads_kv, seqlen_k, HEAD_DIM, generator=generator)
    return [t.to(DEVICE).requires_grad_() for t in (q, k, v)]


def outputs_and_grads(fn, tensors, *extra):
    """``fn``'s output and the gradients of ``tensors`` (fresh leaves) for a fixed random output gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves, *extra)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device, out.dtype)
    out.backward(dout)
    return [out.detach()] + [t.grad for t in leaves]


def assert_same(compiled, eager, what):
    for index, (got, expected) in enumerate(zip(compiled, eager)):
        assert got.shape == expected.shape, f"{what}[{index}]: {got.shape} vs {expected.shape}"
        assert torch.equal(got, expected), f"{what}[{index}] differs by {(got - expected).abs().max()}"


def run_shapes(fn, make_arguments):
    """Compile ``fn`` once (dynamic, fullgraph) and check it against eager on every shape of ``SHAPES``;
    returns how many graphs were compiled in all."""
    backend = CountingBackend()
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=backend)
    graphs_after_first = None
    for batch, seqlen_q, seqlen_k in SHAPES:
        tensors, extra = make_arguments(batch, seqlen_q, seqlen_k)
        assert_same(outputs_and_grads(compiled, tensors, *extra), outputs_and_grads(fn, tensors, *extra),
                    f"B={batch} Sq={seqlen_q} Sk={seqlen_k}")
        if graphs_after_first is None:
            graphs_after_first = backend.graphs
    assert graphs_after_first >= 1
    assert backend.graphs == graphs_after_first, "a new batch size or length recompiled the graph"
    return backend.graphs


OPTIONS = {
    "causal": {"causal": True},
    "window-softcap-scale": {"window_size": (5, 2), "softcap": 20.0, "softmax_scale": 0.3},
    "return-lse": {"return_lse": True},
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_flash_attention(options):
    def attention(q, k, v):
        result = fs.flash_attention(q, k, v, **options)
        return result[0] * 1.0 + result[1][..., None] if options.get("return_lse") else result

    run_shapes(attention, lambda b, sq, sk: (inputs(b, sq, sk), ()))


def test_flash_attention_with_a_broadcast_bias():
    """The bias check (does it broadcast to (B, Hq, Sq, Sk)?) on symbolic sizes of the bias and the inputs."""
    def attention(q, k, v, bias):
        return fs.flash_attention(q, k, v, attn_bias=bias)

    def arguments(batch, seqlen_q, seqlen_k):
        bias = torch.randn(batch, 1, 1, seqlen_k, generator=torch.Generator().manual_seed(3)).to(DEVICE)
        return inputs(batch, seqlen_q, seqlen_k), (bias,)

    run_shapes(attention, arguments)


def test_the_compiled_graph_runs_the_kernels():
    """Every call of the compiled function reaches the kernels (the ops count themselves at run time)."""
    compiled = torch.compile(lambda q, k, v: fs.flash_attention(q, k, v, causal=True), fullgraph=True,
                             dynamic=True, backend=BACKEND)
    fs.reset_stats()
    for batch, seqlen_q, seqlen_k in SHAPES:
        compiled(*inputs(batch, seqlen_q, seqlen_k)).sum().backward()
    counts = fs.stats()
    path = "triton" if DEVICE == "cuda" else "triton-interpreter"
    assert counts["attention_forward"] == {path: len(SHAPES)}
    assert counts["attention_backward"] == {path: len(SHAPES)}


def test_sdpa_drop_in():
    """torch's name, patched, inside the compiled function: a causal call and a padding-mask call."""
    def attention(q, k, v, padding):
        causal = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        masked = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=padding, enable_gqa=True)
        return causal + masked

    def arguments(batch, seqlen_q, seqlen_k):
        padding = torch.ones(batch, 1, 1, seqlen_k, dtype=torch.bool)
        padding[0, ..., seqlen_k - 3:] = False
        return inputs(batch, seqlen_q, seqlen_k), (padding.to(DEVICE),)

    with fs.patch_sdpa():
        run_shapes(attention, arguments)


def test_softmax():
    def normalise(x):
        return fs.softmax(x, dim=-1) + fs.log_softmax(x, dim=1, dtype=torch.float32)

    def arguments(batch, rows, cols):
        x = torch.randn(batch, rows, cols, generator=torch.Generator().manual_seed(5)).to(DEVICE)
        return [x.requires_grad_()], ()

    run_shapes(normalise, arguments)


def test_hugging_face_model():
    """A tiny Llama on ``fs_attention`` compiled with dynamic shapes: new batch sizes and lengths give the
    eager logits without recompiling, and every attention layer runs the kernel."""
    transformers = pytest.importorskip("transformers")
    from flash_softmax.integrations.transformers import register

    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval().to(DEVICE)
    model.set_attn_implementation(register())
    backend = CountingBackend()
    compiled = torch.compile(model, dynamic=True, backend=backend)
    graphs_after_first = None
    for batch, length, _ in SHAPES:
        tokens = torch.randint(1, 96, (batch, length), generator=torch.Generator().manual_seed(batch)).to(DEVICE)
        fs.reset_stats()
        with torch.no_grad():
            got = compiled(input_ids=tokens, use_cache=False).logits
        assert fs.stats()["attention_forward"] == {"triton" if DEVICE == "cuda" else "triton-interpreter": 2}
        with torch.no_grad():
            expected = model(input_ids=tokens, use_cache=False).logits
        if BACKEND == "aot_eager":
            assert torch.equal(got, expected)
        else:
            torch.testing.assert_close(got, expected)
        if graphs_after_first is None:
            graphs_after_first = backend.graphs
    assert backend.graphs == graphs_after_first, "a new batch size or length recompiled the model"
