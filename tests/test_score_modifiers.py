"""What models put in the softmax: attention sinks, ALiBi, dropout, the gradient of a float bias and of the
returned lse (docs/semantics.md, 'Sinks, ALiBi, dropout, and the gradients of bias and lse').

Every case runs ``flash_attention`` forward and backward, with a loss on both ``out`` and (where the case says
so) ``lse``, and judges ``out``, ``lse`` and the gradients of q, k, v, the sinks and the bias by the accuracy
policy against ``reference.attention`` differentiated by autograd in float64 (the truth) and in the input
dtype. Dropout cases give the references the random state the kernel drew (``torch.manual_seed`` before
both), so they drop the same elements through the reference's own Philox, written in plain PyTorch.

Shapes are odd on purpose: lengths that are no multiple of the interpreter's 32-wide tiles, Sq < Sk and
Sq > Sk (where causal rows see no key), grouped-query heads and Dv != D.
"""

from __future__ import annotations

import math

import pytest
import torch

import flash_softmax as fs
from flash_softmax import reference
from flash_softmax._random import dropout_rng_state
from flash_softmax.attention import configs
from flash_softmax.attention.configs import KernelConfig
from flash_softmax.testing import GRADIENT_FACTOR, OUTPUT_FACTOR, assert_close

from conftest import DEVICE

FACTORS = dict(out=OUTPUT_FACTOR, lse=OUTPUT_FACTOR, dq=GRADIENT_FACTOR, dk=GRADIENT_FACTOR, dv=GRADIENT_FACTOR,
               dsinks=GRADIENT_FACTOR, dbias=GRADIENT_FACTOR)
SEED = 1234


def make_case(shape, dtype, *, sinks=False, alibi=None, bias=None, seed=0):
    """Seeded leaves ``q (B, Hq, Sq, D)``, ``k``, ``v`` and the modifiers: ``sinks (Hq,)`` in q's dtype requiring
    grad (a model's parameter in the model's dtype), ALiBi slopes (``alibi`` = ``"heads"`` for ``(Hq,)`` or ``"batch"`` for ``(B, Hq)``) and a float bias
    of shape ``bias`` (a tuple broadcastable to ``(B, Hq, Sq, Sk)``) in q's dtype, requiring grad."""
    batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, head_dim_v = shape
    generator = torch.Generator().manual_seed(seed)

    def randn(*size, dtype=dtype, scale=1.0, grad=True):
        tensor = (torch.randn(*size, generator=generator) * scale).to(DEVICE, dtype)
        return tensor.requires_grad_(grad)

    q = randn(batch, heads_q, seqlen_q, head_dim)
    k = randn(batch, heads_kv, seqlen_k, head_dim)
    v = randn(batch, heads_kv, seqlen_k, head_dim_v)
    modifiers = {}
    if sinks:
        modifiers["sinks"] = randn(heads_q, scale=2.0)
    if alibi is not None:
        size = (heads_q,) if alibi == "heads" else (batch, heads_q)
        modifiers["alibi_slopes"] = (torch.rand(*size, generator=generator) * 0.5).to(DEVICE)
    if bias is not None:
        modifiers["attn_bias"] = randn(*bias)
    return (q, k, v), modifiers


def results(function, tensors, modifiers, dout, dlse, dtype=None, **options):
    """``out``, ``lse`` and the gradients (``dq, dk, dv``, and ``dsinks``/``dbias`` where those are given) of
    ``function`` under the loss ``sum(out * dout) + sum(lse * dlse)`` (no lse term when ``dlse`` is None),
    computed on fresh leaves: converted to ``dtype`` (references) or as given (the kernel)."""
    convert = (lambda t: t.detach().to(dtype)) if dtype is not None else (lambda t: t.detach().clone())
    leaves = [convert(t).requires_grad_() for t in tensors]
    extras = {}
    for name, value in modifiers.items():
        value = value.detach().clone()
        if name == "alibi_slopes":  # constants of the model, never differentiated
            extras[name] = value if dtype is None else value.to(dtype)
        else:
            extras[name] = (value if dtype is None else value.to(dtype)).requires_grad_()
    out, lse = function(*leaves, **extras, return_lse=True, **options)
    loss = (out.to(dout.dtype) * dout).sum()
    if dlse is not None:
        loss = loss + (lse.to(dlse.dtype) * dlse).sum()
    loss.backward()
    found = dict(out=out.detach(), lse=lse.detach(), dq=leaves[0].grad, dk=leaves[1].grad, dv=leaves[2].grad)
    if "sinks" in extras:
        found["dsinks"] = extras["sinks"].grad
    if "attn_bias" in extras:
        found["dbias"] = extras["attn_bias"].grad
    return found


def check(tensors, modifiers, lse_loss=False, dropout_p=0.0, **options):
    """Run the kernel and both references under the same options (and dropout's random state) and judge
    every result by the accuracy policy. Returns the kernel's results."""
    q = tensors[0]
    generator = torch.Generator().manual_seed(99)
    out_shape = (*q.shape[:3], tensors[2].shape[-1])
    dout = torch.randn(*out_shape, generator=generator, dtype=torch.float64).to(DEVICE)
    dlse = torch.randn(*q.shape[:3], generator=generator, dtype=torch.float64).to(DEVICE) if lse_loss else None
    torch.manual_seed(SEED)
    rng_state = dropout_rng_state(torch.device(DEVICE)) if dropout_p > 0 else None
    torch.manual_seed(SEED)  # the kernel draws the same state
    ours = results(fs.flash_attention, tensors, modifiers, dout.to(q.dtype),
                   None if dlse is None else dlse.float(), dropout_p=dropout_p, **options)

    def reference_attention(*args, **kwargs):
        return reference.attention(*args, **kwargs, rng_state=rng_state, upcast=upcast)

    upcast = True
    truth = results(reference_attention, tensors, modifiers, dout, dlse, torch.float64, dropout_p=dropout_p,
                    **options)
    lowp = dict.fromkeys(truth)
    if q.dtype != torch.float32:
        upcast = False
        lowp = results(reference_attention, tensors, modifiers, dout.to(q.dtype),
                       None if dlse is None else dlse.float(), q.dtype, dropout_p=dropout_p, **options)
    for name, tensor in ours.items():
        assert tensor.shape == truth[name].shape, name
        assert_close(name, tensor, truth[name], lowp[name], factor=FACTORS[name])
    for name, leaf_value in (("dsinks", modifiers.get("sinks")), ("dbias", modifiers.get("attn_bias"))):
        if leaf_value is not None:
            assert ours[name].dtype == leaf_value.dtype, name
    return ours


GQA = (2, 4, 2, 37, 45, 24, 16)  # B, Hq, Hkv, Sq, Sk, D, Dv: odd lengths, Sq < Sk, grouped heads, Dv != D
TALL = (2, 4, 1, 45, 19, 16, 24)  # Sq > Sk: under causal the first Sq - Sk rows see no key

FLOAT32_CASES = {
    "sinks": (GQA, dict(sinks=True), dict()),
    "sinks-causal-tall": (TALL, dict(sinks=True), dict(causal=True)),
    "alibi-heads-causal": (GQA, dict(alibi="heads"), dict(causal=True)),
    "alibi-batch-window-tall": (TALL, dict(alibi="batch"), dict(window_size=(7, 3))),
    "dropout": (GQA, dict(), dict(dropout_p=0.2)),
    "dropout-causal-tall": (TALL, dict(), dict(dropout_p=0.35, causal=True)),
    "lse-loss": (GQA, dict(), dict(lse_loss=True, softcap=4.0)),
    "bias-per-head": (GQA, dict(bias=(1, 4, 37, 45)), dict()),
    "bias-full-causal": (GQA, dict(bias=(2, 4, 37, 45)), dict(causal=True)),
    "bias-key-padding": (TALL, dict(bias=(2, 1, 1, 19)), dict()),
    "bias-2d-window": (GQA, dict(bias=(37, 45)), dict(window_size=(5, 9))),
    "bias-per-query": (TALL, dict(bias=(2, 4, 45, 1)), dict(causal=True)),
    "everything": (GQA, dict(sinks=True, alibi="heads", bias=(1, 4, 37, 45)),
                   dict(dropout_p=0.25, causal=True, softcap=5.0, lse_loss=True)),
    "everything-tall-window": (TALL, dict(sinks=True, alibi="batch", bias=(2, 1, 45, 19)),
                               dict(dropout_p=0.1, window_size=(6, 2), lse_loss=True)),
}


@pytest.mark.parametrize("shape,modifiers,options", FLOAT32_CASES.values(), ids=FLOAT32_CASES.keys())
def test_float32_against_float64_autograd(shape, modifiers, options):
    tensors, extras = make_case(shape, torch.float32, **modifiers)
    check(tensors, extras, **options)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [GQA, TALL], ids=["sq<sk", "sq>sk"])
def test_half_precision_everything_combined(dtype, shape):
    """Sinks, ALiBi, dropout, a learned bias and a loss on lse at once, causal and softcapped."""
    batch, heads_q, _, seqlen_q, seqlen_k, _, _ = shape
    tensors, extras = make_case(shape, dtype, sinks=True, alibi="heads", bias=(1, heads_q, seqlen_q, seqlen_k))
    check(tensors, extras, dropout_p=0.2, causal=True, softcap=6.0, lse_loss=True)


def test_sinks_in_any_float_dtype_get_their_gradient_in_that_dtype():
    """bfloat16 sinks with float32 inputs: read as float32 in the kernels (the same results as float32 sinks
    of the same values), the gradient computed in float32 and returned in bfloat16."""
    tensors, extras = make_case(GQA, torch.float32, sinks=True)
    dout = torch.randn(2, 4, 37, 16, device=DEVICE)
    found = {}
    for dtype in (torch.bfloat16, torch.float32):
        sinks = extras["sinks"].detach().to(torch.bfloat16).to(dtype).requires_grad_()
        out = fs.flash_attention(*tensors, sinks=sinks, causal=True)
        out.backward(dout)
        found[dtype] = out, sinks.grad
    assert found[torch.bfloat16][1].dtype == torch.bfloat16
    assert torch.equal(found[torch.bfloat16][0], found[torch.float32][0])
    assert torch.equal(found[torch.bfloat16][1], found[torch.float32][1].to(torch.bfloat16))


def test_rows_that_see_no_key_give_zero_and_the_sink_as_lse():
    """A bool mask hides every key from some rows: their output is 0, their lse the head's sink, and no
    gradient flows through them, into q, k, v or the sink (the sink's probability there is 1 and its value
    0: the loss does not depend on it)."""
    (q, k, v), extras = make_case((1, 3, 3, 20, 17, 16, 16), torch.float32, sinks=True)
    keep = torch.ones(1, 1, 20, 17, dtype=torch.bool, device=DEVICE)
    keep[..., 5:9, :] = False
    ours = check((q, k, v), extras, attn_bias=keep, lse_loss=False)
    assert torch.equal(ours["out"][:, :, 5:9], torch.zeros_like(ours["out"][:, :, 5:9]))
    sinks = extras["sinks"].detach().view(1, 3, 1)
    assert torch.allclose(ours["lse"][:, :, 5:9], sinks.expand(1, 3, 4), rtol=0, atol=1e-6)
    assert torch.equal(ours["dq"][:, :, 5:9], torch.zeros_like(ours["dq"][:, :, 5:9]))


def test_alibi_is_the_distance_from_the_bottom_right_diagonal():
    """One query row against keys with equal scores: ALiBi alone decides the weights, exp(-slope * distance),
    distance measured from key ``i + Sk - Sq``."""
    seqlen_q, seqlen_k, slope = 3, 8, 0.7
    q = torch.zeros(1, 1, seqlen_q, 4, device=DEVICE)
    k = torch.zeros(1, 1, seqlen_k, 4, device=DEVICE)
    v = torch.eye(seqlen_k, device=DEVICE).view(1, 1, seqlen_k, seqlen_k)
    out = fs.flash_attention(q, k, v, alibi_slopes=torch.tensor([slope], device=DEVICE))
    for row in range(seqlen_q):
        distance = (torch.arange(seqlen_k, device=DEVICE) - (row + seqlen_k - seqlen_q)).abs()
        weights = torch.exp(-slope * distance)
        torch.testing.assert_close(out[0, 0, row], weights / weights.sum(), rtol=1e-6, atol=1e-7)


# --- dropout's mask ------------------------------------------------------------------------------------

def recovered_keep_mask(batch, heads_q, heads_kv, seqlen_q, seqlen_k, dropout_p, seed, **options):
    """The kernel's keep-mask, read off its output: with V the identity (Dv = Sk), ``out[b, h, i, j]`` is
    ``P_ij / (1 - p)`` where kept and 0 where dropped (P > 0 everywhere without a mask)."""
    generator = torch.Generator().manual_seed(5)
    q = (torch.randn(batch, heads_q, seqlen_q, 16, generator=generator) * 0.3).to(DEVICE)
    k = (torch.randn(batch, heads_kv, seqlen_k, 16, generator=generator) * 0.3).to(DEVICE)
    v = torch.eye(seqlen_k, device=DEVICE).expand(batch, heads_kv, seqlen_k, seqlen_k)
    torch.manual_seed(seed)
    out = fs.flash_attention(q, k, v, dropout_p=dropout_p, **options)
    return out != 0


def test_dropout_mask_is_the_reference_philox_and_keeps_one_minus_p():
    batch, heads_q, seqlen_q, seqlen_k, dropout_p = 2, 3, 50, 64, 0.3
    kept = recovered_keep_mask(batch, heads_q, heads_q, seqlen_q, seqlen_k, dropout_p, seed=7)
    torch.manual_seed(7)
    rng_state = dropout_rng_state(torch.device(DEVICE))
    expected = reference.dropout_keep_mask(rng_state, dropout_p, batch, heads_q, seqlen_q, seqlen_k)
    assert torch.equal(kept.cpu(), expected)
    # The keep rate: a binomial count within five standard deviations of n (1 - p).
    trials = kept.numel()
    deviation = abs(kept.sum().item() - trials * (1 - dropout_p))
    assert deviation <= 5 * math.sqrt(trials * dropout_p * (1 - dropout_p)), (kept.float().mean(), 1 - dropout_p)
    # Heads and rows draw independently: no two rows of the mask repeat.
    rows = kept.reshape(-1, seqlen_k)
    assert torch.unique(rows, dim=0).shape[0] == rows.shape[0]


def test_dropout_mask_does_not_depend_on_tiles_or_heads_layout():
    """The same decisions with Hopper's forward tile as with the interpreter's, and for GQA as for MHA."""
    shape = dict(batch=1, heads_q=4, seqlen_q=70, seqlen_k=129, dropout_p=0.5, seed=3)
    small_tiles = recovered_keep_mask(heads_kv=4, **shape)
    with configs.override(forward=KernelConfig(64, 128, 8, 2)):
        large_tiles = recovered_keep_mask(heads_kv=2, **shape)
    assert torch.equal(small_tiles, large_tiles)


def test_dropout_with_gpu_tiles_matches_the_reference():
    """Forward, dK/dV and dQ forced to GPU tiles regenerate the same mask (the backward's orientation is
    transposed: keys along rows)."""
    with configs.override(forward=KernelConfig(64, 64, 4, 1), backward_dkdv=KernelConfig(32, 64, 4, 1),
                          backward_dq=KernelConfig(64, 32, 4, 1)):
        tensors, extras = make_case((1, 2, 1, 67, 130, 32, 16), torch.float32, sinks=True, bias=(1, 2, 67, 130))
        check(tensors, extras, dropout_p=0.3, causal=True, lse_loss=True)


def test_dropout_reproduces_under_manual_seed_and_differs_between_calls():
    (q, k, v), _ = make_case(GQA, torch.float32)
    dout = torch.randn(*q.shape[:3], v.shape[-1], device=DEVICE)

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = fs.flash_attention(*leaves, dropout_p=0.4, causal=True)
        out.backward(dout)
        return [out.detach(), *(t.grad for t in leaves)]

    torch.manual_seed(21)
    first, second = run(), run()
    torch.manual_seed(21)
    again = run()
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], second[0])


def test_dropout_zero_is_no_dropout():
    (q, k, v), _ = make_case(GQA, torch.float32)
    assert torch.equal(fs.flash_attention(q, k, v, dropout_p=0.0), fs.flash_attention(q, k, v))


# --- gradients: determinism, and what gets none -------------------------------------------------------

def test_sinks_and_bias_gradients_are_bitwise_reproducible():
    tensors, extras = make_case(GQA, torch.float32, sinks=True, bias=(1, 4, 37, 45))
    dout = torch.randn(2, 4, 37, 16, device=DEVICE)
    runs = []
    for _ in range(3):
        leaves = [t.detach().clone().requires_grad_() for t in (*tensors, extras["sinks"], extras["attn_bias"])]
        out = fs.flash_attention(*leaves[:3], sinks=leaves[3], attn_bias=leaves[4], causal=True)
        out.backward(dout)
        runs.append([t.grad for t in leaves])
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_a_bias_that_needs_no_gradient_costs_no_gradient():
    """A bias without requires_grad (and a bool mask) gets no gradient, and the bias kernel does not run."""
    (q, k, v), extras = make_case(GQA, torch.float32, bias=(1, 4, 37, 45))
    bias = extras["attn_bias"].detach()
    launches = []
    original = configs.dbias_config
    try:
        configs.dbias_config = lambda *args: launches.append(args) or original(*args)
        fs.flash_attention(q, k, v, attn_bias=bias).sum().backward()
    finally:
        configs.dbias_config = original
    assert bias.grad is None and launches == []


# --- errors ----------------------------------------------------------------------------------------------

ERROR_CASES = {
    "sinks-shape": (dict(sinks=torch.zeros(3)), ValueError, r"sinks must have shape \(Hq,\) = \(4,\), got \(3,\)"),
    "sinks-integer": (dict(sinks=torch.zeros(4, dtype=torch.int32)), TypeError, "sinks must be a floating tensor"),
    "sinks-list": (dict(sinks=[0.0] * 4), TypeError, "sinks must be a torch.Tensor or None, got list"),
    "alibi-shape": (dict(alibi_slopes=torch.zeros(2, 3)), ValueError,
                    r"alibi_slopes must have shape \(Hq,\) = \(4,\) or \(B, Hq\) = \(2, 4\), got \(2, 3\)"),
    "alibi-requires-grad": (dict(alibi_slopes=torch.zeros(4, requires_grad=True)), ValueError,
                            "alibi_slopes must not require grad"),
    "alibi-integer": (dict(alibi_slopes=torch.zeros(4, dtype=torch.int64)), TypeError,
                      "alibi_slopes must be a floating tensor"),
    "dropout-one": (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\), got 1.0"),
    "dropout-negative": (dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\), got -0.1"),
    "dropout-bool": (dict(dropout_p=True), TypeError, "dropout_p must be a float, got bool"),
}


@pytest.mark.parametrize("options,error,message", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_errors_name_the_argument(options, error, message):
    (q, k, v), _ = make_case(GQA, torch.float32)
    options = {name: value.to(DEVICE) if isinstance(value, torch.Tensor) and not value.requires_grad else value
               for name, value in options.items()}
    with pytest.raises(error, match=message):
        fs.flash_attention(q, k, v, **options)


def test_modifiers_on_another_device_are_errors():
    (q, k, v), _ = make_case(GQA, torch.float32)
    meta = torch.zeros(4, device="meta")
    with pytest.raises(ValueError, match="sinks must be on q's device"):
        fs.flash_attention(q, k, v, sinks=meta)
    with pytest.raises(ValueError, match="alibi_slopes must be on q's device"):
        fs.flash_attention(q, k, v, alibi_slopes=meta)


# --- torch.compile ---------------------------------------------------------------------------------------

def test_compiled_graph_with_every_modifier_equals_eager():
    """fullgraph: the random state is drawn inside the graph (torch.randint on the default generator), the
    sinks and the bias get their gradients through the backward op."""
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    tensors, extras = make_case((1, 2, 1, 19, 23, 16, 16), torch.float32, sinks=True, alibi="heads",
                                bias=(1, 2, 19, 23))

    def attention(q, k, v, sinks, bias):
        out, lse = fs.flash_attention(q, k, v, sinks=sinks, attn_bias=bias, alibi_slopes=extras["alibi_slopes"],
                                      causal=True, return_lse=True)
        return out.sum() + lse.sum()

    def run(function):
        leaves = [t.detach().clone().requires_grad_() for t in (*tensors, extras["sinks"], extras["attn_bias"])]
        function(*leaves).backward()
        return [t.grad for t in leaves]

    torch._dynamo.reset()
    try:
        compiled = run(torch.compile(attention, fullgraph=True, backend=backend))
    finally:
        torch._dynamo.reset()
    eager = run(attention)
    for got, expected in zip(compiled, eager):
        assert torch.equal(got, expected)


def test_module_passes_modifiers_and_drops_out_in_training_only():
    (q, k, v), extras = make_case(GQA, torch.float32, sinks=True, alibi="heads")
    layer = fs.FlashAttention(causal=True, dropout_p=0.3, softcap=4.0)
    assert "dropout_p=0.3" in repr(layer)
    layer.eval()
    expected = fs.flash_attention(q, k, v, causal=True, softcap=4.0, sinks=extras["sinks"],
                                  alibi_slopes=extras["alibi_slopes"])
    assert torch.equal(layer(q, k, v, sinks=extras["sinks"], alibi_slopes=extras["alibi_slopes"]), expected)
    layer.train()
    torch.manual_seed(2)
    dropped = layer(q, k, v)
    torch.manual_seed(2)
    assert torch.equal(dropped, fs.flash_attention(q, k, v, causal=True, softcap=4.0, dropout_p=0.3))


def test_bias_gradient_with_the_gpu_tile(monkeypatch):
    """The bias-gradient kernel's compiled tile (64 x 64; 64 x 32 beside 256-wide heads) run in the
    interpreter, on lengths at the tile's edges, for a full and a broadcast bias."""
    gpu_tile = KernelConfig(64, 64, 4, 2)
    monkeypatch.setattr(configs, "dbias_config", lambda head_dim, head_dim_v: gpu_tile)
    for bias in ((1, 2, 65, 127), (2, 1, 1, 127)):
        tensors, extras = make_case((2, 2, 1, 65, 127, 16, 16), torch.float32, bias=bias)
        check(tensors, extras, causal=True)


def test_calls_with_modifiers_keep_the_forward_tile_within_its_bound(monkeypatch):
    """The selection a GPU makes (the interpreter's fixed tile switched off): a plain call at head dim 64
    takes the 128 x 128 default, a call with modifiers the first entry within MODIFIED_FORWARD_MAX_TILE."""
    monkeypatch.setattr(configs, "INTERPRETED", False)
    monkeypatch.setattr(configs, "_shared_memory_limit", lambda: 232448)
    monkeypatch.setattr(configs, "device_arch", lambda: "sm_90a")
    monkeypatch.setattr("flash_softmax.attention.table.current_table", lambda: None)
    configs.clear_cache()
    try:
        plain, _ = configs.select_config("forward", "bfloat16", 2, 64, 64, True, 4096, 4096)
        modified, source = configs.select_config("forward", "bfloat16", 2, 64, 64, True, 4096, 4096, modified=True)
        backward_modified, _ = configs.select_config("backward_dq", "bfloat16", 2, 64, 64, True, 4096, 4096,
                                                     modified=True)
    finally:
        configs.clear_cache()
    assert plain.block_m * plain.block_n > configs.MODIFIED_FORWARD_MAX_TILE
    assert modified.block_m * modified.block_n <= configs.MODIFIED_FORWARD_MAX_TILE and source == "default"
    assert backward_modified == configs.default_config("backward_dq", 64, 64, 2, arch="sm_90a")
