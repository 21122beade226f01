"""``flash_attention_varlen``: packed variable-length batches, forward and backward.

Every result is judged against ``reference.attention_varlen`` (a loop over the sequences of the materialised
reference) in float64, with the input-dtype reference as the yardstick for 16-bit inputs (the accuracy
policy of ``flash_softmax.testing``). The sequence lengths are chosen to break tile arithmetic: empty
sequences first, in the middle and last, single rows, lengths one off the interpreter's 32-row block and off
the GPU tiles, and query and key lengths that differ per sequence in both directions. A few tests run the
GPU's tile shapes, its TMA path and its grouped-head split in the interpreter.
"""

from __future__ import annotations

import pytest
import torch

import flash_softmax as fs
from flash_softmax import reference
from flash_softmax.attention import common, configs
from flash_softmax.attention.configs import KernelConfig

from attention_checks import FACTORS
from conftest import DEVICE
from flash_softmax.testing import assert_close

LENGTHS = {
    # name: (query lengths, key lengths)
    "equal": ([0, 33, 1, 64, 17, 0], [0, 33, 1, 64, 17, 0]),
    "sq-ne-sk": ([5, 0, 37, 1, 40, 3], [7, 3, 37, 0, 33, 31]),
}


def cumulative(lengths, dtype=torch.int32) -> torch.Tensor:
    """``(N + 1,)`` cumulative lengths on the test device."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype, device=DEVICE)


def packed_inputs(lengths_q, lengths_k, heads_q, heads_kv, head_dim, dtype, head_dim_v=None, seed=0):
    """Seeded ``q (Tq, Hq, D)``, ``k (Tk, Hkv, D)``, ``v (Tk, Hkv, Dv)`` and their cumulative lengths."""
    generator = torch.Generator().manual_seed(seed)
    head_dim_v = head_dim if head_dim_v is None else head_dim_v

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=DEVICE, dtype=dtype)

    total_q, total_k = sum(lengths_q), sum(lengths_k)
    q, k, v = randn(total_q, heads_q, head_dim), randn(total_k, heads_kv, head_dim), randn(total_k, heads_kv, head_dim_v)
    return q, k, v, cumulative(lengths_q), cumulative(lengths_k)


def run(function, q, k, v, cu_q, cu_k, dout, dlse, dtype=None, sinks=None, **options):
    """out, lse and the gradients of q, k, v (and sinks) of ``function`` on fresh leaves (in ``dtype``), after
    a backward from ``dout`` and ``dlse`` (a loss on both outputs)."""
    dtype = q.dtype if dtype is None else dtype
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    sink_leaf = None if sinks is None else sinks.detach().to(dtype).requires_grad_()
    if function is reference.attention_varlen:
        options = dict(options, upcast=dtype != q.dtype)
        options.pop("max_seqlen_q", None), options.pop("max_seqlen_k", None)
    out, lse = function(*leaves, cu_q, cu_k, sinks=sink_leaf, return_lse=True, **options)
    if out.requires_grad:  # the reference of a batch with no sequence at all is a constant
        torch.autograd.backward((out, lse), (dout.to(out.dtype), dlse.to(lse.dtype)))
    names = ["dq", "dk", "dv"] + ([] if sinks is None else ["dsinks"])
    leaves += [] if sinks is None else [sink_leaf]
    grads = {name: torch.zeros_like(leaf) if leaf.grad is None else leaf.grad for name, leaf in zip(names, leaves)}
    return dict(out=out.detach(), lse=lse.detach(), **grads)


def check(q, k, v, cu_q, cu_k, sinks=None, seed=1, **options):
    """The kernels' out, lse, dq, dk, dv (and dsinks) against the float64 reference, judged by the accuracy
    policy; returns the kernels' results."""
    generator = torch.Generator().manual_seed(seed)
    dout = torch.randn(q.shape[0], q.shape[1], v.shape[2], generator=generator).to(DEVICE)
    dlse = torch.randn(q.shape[1], q.shape[0], generator=generator).to(DEVICE)
    got = run(fs.flash_attention_varlen, q, k, v, cu_q, cu_k, dout, dlse, sinks=sinks, **options)
    truth = run(reference.attention_varlen, q, k, v, cu_q, cu_k, dout, dlse, torch.float64, sinks=sinks, **options)
    lowp = (dict.fromkeys(truth) if q.dtype == torch.float32 else
            run(reference.attention_varlen, q, k, v, cu_q, cu_k, dout, dlse, sinks=sinks, **options))
    assert got["out"].shape == (q.shape[0], q.shape[1], v.shape[2]) and got["lse"].shape == (q.shape[1], q.shape[0])
    for name, tensor in got.items():
        factor = FACTORS.get(name, FACTORS["dq"])
        assert_close(name, tensor, truth[name], lowp[name], factor=factor)
    return got


CASES = {
    "plain-equal": ("equal", dict()),
    "plain-sq-ne-sk": ("sq-ne-sk", dict()),
    "causal-equal": ("equal", dict(causal=True)),
    "causal-sq-ne-sk": ("sq-ne-sk", dict(causal=True)),
    "window-sq-ne-sk": ("sq-ne-sk", dict(window_size=(9, 3))),
    "causal-window-equal": ("equal", dict(causal=True, window_size=(20, -1))),
    "softcap-scale-sq-ne-sk": ("sq-ne-sk", dict(softcap=4.0, softmax_scale=0.5)),
}


@pytest.mark.parametrize("lengths,options", CASES.values(), ids=CASES.keys())
def test_matches_reference(lengths, options):
    q, k, v, cu_q, cu_k = packed_inputs(*LENGTHS[lengths], 2, 1, 16, torch.float32, head_dim_v=24)
    check(q, k, v, cu_q, cu_k, **options)


@pytest.mark.parametrize("dtype", [torch.bfloat16])  # float16: flash-softmax verify's quick packed cases
def test_half_precision(dtype):
    q, k, v, cu_q, cu_k = packed_inputs(*LENGTHS["sq-ne-sk"], 4, 2, 32, dtype)
    check(q, k, v, cu_q, cu_k, causal=True)


def test_modifiers_sinks_alibi_per_sequence():
    """Sinks with their gradient, and ALiBi slopes given per sequence, ``(N, Hq)``."""
    lengths_q, lengths_k = LENGTHS["sq-ne-sk"]
    q, k, v, cu_q, cu_k = packed_inputs(lengths_q, lengths_k, 4, 2, 16, torch.float32)
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    slopes = torch.rand(len(lengths_q), 4, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    check(q, k, v, cu_q, cu_k, sinks=sinks, alibi_slopes=slopes, causal=True)


def test_dropout_matches_reference_with_the_same_state():
    """After the same ``torch.manual_seed`` the kernels and the reference drop the same elements: sequence n
    is dropped as batch n of ``flash_attention``."""
    q, k, v, cu_q, cu_k = packed_inputs(*LENGTHS["equal"], 2, 2, 16, torch.float32)
    dout = torch.randn(q.shape[0], 2, 16, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    dlse = torch.zeros(2, q.shape[0], device=DEVICE)
    torch.manual_seed(11)
    got = run(fs.flash_attention_varlen, q, k, v, cu_q, cu_k, dout, dlse, dropout_p=0.3, causal=True)
    torch.manual_seed(11)
    truth = run(reference.attention_varlen, q, k, v, cu_q, cu_k, dout, dlse, torch.float64, dropout_p=0.3, causal=True)
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert_close(name, got[name], truth[name], None, factor=FACTORS[name])
    torch.manual_seed(12)  # another state drops other elements
    other = run(fs.flash_attention_varlen, q, k, v, cu_q, cu_k, dout, dlse, dropout_p=0.3, causal=True)
    assert not torch.allclose(other["out"], got["out"])


def test_each_sequence_equals_flash_attention_alone():
    """Packing changes nothing: every sequence's rows are bitwise those of ``flash_attention`` on that
    sequence alone (same tiles from the sequence's first row, same order of operations)."""
    lengths_q, lengths_k = LENGTHS["sq-ne-sk"]
    q, k, v, cu_q, cu_k = packed_inputs(lengths_q, lengths_k, 2, 1, 16, torch.float32)
    out, lse = fs.flash_attention_varlen(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    for n, (start_q, start_k) in enumerate(zip(cu_q[:-1].tolist(), cu_k[:-1].tolist())):
        rows_q, rows_k = slice(start_q, start_q + lengths_q[n]), slice(start_k, start_k + lengths_k[n])
        alone, alone_lse = fs.flash_attention(*(t[rows].transpose(0, 1)[None] for t, rows in
                                                ((q, rows_q), (k, rows_k), (v, rows_k))),
                                              causal=True, return_lse=True)
        assert torch.equal(out[rows_q], alone[0].transpose(0, 1)), n
        assert torch.equal(lse[:, rows_q], alone_lse[0]), n


def test_strided_views_of_packed_qkv_are_read_in_place():
    """q, k, v sliced from one packed ``qkv (T, 3, H, D)`` and a non-contiguous ``dout``: correct results,
    and the gradients keep the packed layout's shapes."""
    lengths = [19, 0, 40, 2]
    total = sum(lengths)
    qkv = torch.randn(total, 3, 2, 16, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    assert not q.is_contiguous()
    cu = cumulative(lengths)
    check(q, k, v, cu, cu, causal=True)
    leaf = qkv.clone().requires_grad_()
    out = fs.flash_attention_varlen(leaf[:, 0], leaf[:, 1], leaf[:, 2], cu, cu, causal=True)
    dout = torch.randn(2, total, 16, device=DEVICE).transpose(0, 1)  # (T, H, D) view, not contiguous
    out.backward(dout)
    assert leaf.grad.shape == qkv.shape and torch.isfinite(leaf.grad).all()


def test_int64_cu_seqlens_and_omitted_bounds_agree():
    q, k, v, cu_q, cu_k = packed_inputs(*LENGTHS["sq-ne-sk"], 2, 2, 16, torch.float32)
    given = fs.flash_attention_varlen(q, k, v, cu_q, cu_k, 40, 37, causal=True)
    read = fs.flash_attention_varlen(q, k, v, cu_q.long(), cu_k.long(), causal=True)
    assert torch.equal(given, read)


def test_many_sequences_cross_the_scan_chunk():
    """More sequences than a program scans at once (``common.SEQUENCE_CHUNK``, 16 in the interpreter), most of
    them tiny or empty: every tile is found once."""
    chunk = common.SEQUENCE_CHUNK.value
    generator = torch.Generator().manual_seed(7)
    lengths = torch.randint(0, 4, (chunk + 6,), generator=generator).tolist()
    lengths[chunk + 1] = 40
    q, k, v, cu_q, cu_k = packed_inputs(lengths, lengths, 1, 1, 16, torch.float32)
    check(q, k, v, cu_q, cu_k, causal=True)


def test_empty_batches():
    """No sequence at all, only empty sequences, and queries whose sequences have no keys (output 0, lse the
    sink or -inf, zero gradients)."""
    for lengths_q, lengths_k in (([], []), ([0, 0], [0, 0]), ([3, 0, 2], [0, 0, 0])):
        q, k, v, cu_q, cu_k = packed_inputs(lengths_q, lengths_k, 2, 1, 16, torch.float32)
        sinks = torch.tensor([0.5, -1.0], device=DEVICE)
        got = check(q, k, v, cu_q, cu_k, sinks=sinks)
        if sum(lengths_q) and not sum(lengths_k):
            assert torch.equal(got["out"], torch.zeros_like(got["out"]))
            assert torch.equal(got["lse"], sinks[:, None].expand_as(got["lse"]))


def test_backward_is_deterministic():
    q, k, v, cu_q, cu_k = packed_inputs(*LENGTHS["sq-ne-sk"], 2, 1, 16, torch.float32)
    dout = torch.randn(q.shape[0], 2, 16, device=DEVICE)
    dlse = torch.zeros(2, q.shape[0], device=DEVICE)
    first = run(fs.flash_attention_varlen, q, k, v, cu_q, cu_k, dout, dlse, causal=True)
    second = run(fs.flash_attention_varlen, q, k, v, cu_q, cu_k, dout, dlse, causal=True)
    assert all(torch.equal(first[name], second[name]) for name in first)


# The GPU's tiles in the interpreter: the forward and dQ tiles of 64-wide heads on sm_90a, and dK/dV's.
GPU_TILES = dict(forward=KernelConfig(128, 64, 8, 3), backward_dq=KernelConfig(128, 64, 8, 2),
                 backward_dkdv=KernelConfig(32, 128, 8, 2))


@pytest.mark.parametrize("variant", [{}, dict(tma=True), dict(tma=True, persistent=True)],
                         ids=["pointers", "tma", "persistent"])
def test_gpu_tiles(variant):
    """Lengths around the 128-row tiles (127, 129, 1, 0, 200), with the GPU's shapes, through pointer tiles or
    tensor descriptors (each sequence its own descriptor, zero-filled past its end); a persistent
    configuration launches one program per packed tile."""
    forced = {name: KernelConfig(c.block_m, c.block_n, c.num_warps, c.num_stages, **variant)
              for name, c in GPU_TILES.items()}
    lengths_q, lengths_k = [127, 0, 129, 1, 200], [129, 5, 127, 0, 150]
    q, k, v, cu_q, cu_k = packed_inputs(lengths_q, lengths_k, 2, 1, 64, torch.float32)
    with configs.override(**forced):
        check(q, k, v, cu_q, cu_k, causal=True)


def test_grouped_head_split(monkeypatch):
    """With few key programs for the SM count, the dK/dV kernel splits each group of query heads into shares
    (float32 partial sums added in order): the packed batch's row strides must reach them too."""
    monkeypatch.setattr(configs, "INTERPRETER_SM_COUNT", 64)
    q, k, v, cu_q, cu_k = packed_inputs(*LENGTHS["sq-ne-sk"], 4, 1, 16, torch.float32)
    check(q, k, v, cu_q, cu_k, causal=True, window_size=(12, -1))


def test_grid_bound_covers_every_tile_and_little_more():
    """``configs.packed_tiles`` bounds the tiles of any lengths from above by fewer than N: the grid is
    proportional to the real work, never N * max_seqlen."""
    generator = torch.Generator().manual_seed(8)
    for block in (32, 64, 128):
        for _ in range(50):
            lengths = torch.randint(0, 300, (int(torch.randint(1, 40, (1,), generator=generator)),),
                                    generator=generator).tolist()
            exact = sum(-(-length // block) for length in lengths)
            bound = configs.packed_tiles(sum(lengths), len(lengths), block)
            assert exact <= bound < exact + len(lengths)


def test_compiled_fullgraph_equals_eager():
    torch._dynamo.reset()
    q, k, v, cu_q, cu_k = packed_inputs(*LENGTHS["sq-ne-sk"], 2, 1, 16, torch.float32)
    sinks = torch.randn(2, device=DEVICE)

    def attention(q, k, v, sinks):
        return fs.flash_attention_varlen(q, k, v, cu_q, cu_k, 40, 37, causal=True, sinks=sinks, return_lse=True)

    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    results = []
    for fn in (attention, torch.compile(attention, fullgraph=True, backend=backend)):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, sinks)]
        out, lse = fn(*leaves)
        (out.sum() + lse.sum()).backward()
        results.append([out, lse, *(t.grad for t in leaves)])
    torch._dynamo.reset()
    for got, expected in zip(*results):
        assert torch.equal(got, expected)


def test_opcheck():
    q, k, v, cu_q, cu_k = packed_inputs([3, 0, 9], [5, 2, 7], 2, 1, 16, torch.float32)
    sinks = torch.randn(2, device=DEVICE, requires_grad=True)
    slopes = torch.rand(2, device=DEVICE)
    rng_state = torch.tensor([123456789, 42], dtype=torch.int64, device=DEVICE)
    arguments = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu_q, cu_k, sinks, slopes, rng_state,
                 9, 7, 0.3, 9, 0, 0.0, 0.2)
    torch.library.opcheck(torch.ops.flash_softmax.attention_varlen_forward.default, arguments)


ERRORS = {
    "float cu_seqlens": (dict(cu_q=lambda cu: cu.float()), TypeError, "cu_seqlens_q must have dtype int32 or int64"),
    "2-d cu_seqlens": (dict(cu_k=lambda cu: cu[None]), ValueError, r"cu_seqlens_k must have shape \(N \+ 1,\)"),
    "sequence counts differ": (dict(cu_k=lambda cu: cu[:-1]), ValueError, "same number of sequences, got 6"),
    "4-d q": (dict(q=lambda q: q[None]), ValueError, "q must have 3 dims"),
    "k and v totals differ": (dict(v=lambda v: v[1:]), ValueError, "k and v must have the same sequence length"),
    "negative bound": (dict(max_q=-1), ValueError, "max_seqlen_q must be >= 0, got -1"),
    "float bound": (dict(max_k=3.5), TypeError, "max_seqlen_k must be an int or None"),
    "slopes of another batch": (dict(slopes=torch.ones(5, 2)), ValueError, r"alibi_slopes must have shape .*\(N, Hq\)"),
}


@pytest.mark.parametrize("change,error,message", ERRORS.values(), ids=ERRORS.keys())
def test_bad_inputs_are_named(change, error, message):
    q, k, v, cu_q, cu_k = packed_inputs(*LENGTHS["sq-ne-sk"], 2, 1, 16, torch.float32)
    arguments = dict(q=q, k=k, v=v, cu_q=cu_q, cu_k=cu_k)
    for name, transform in change.items():
        if name in arguments:
            arguments[name] = transform(arguments[name])
    slopes = change.get("slopes")
    with pytest.raises(error, match=message):
        fs.flash_attention_varlen(arguments["q"], arguments["k"], arguments["v"], arguments["cu_q"], arguments["cu_k"],
                                  change.get("max_q"), change.get("max_k"),
                                  alibi_slopes=None if slopes is None else slopes.to(DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_mixed_lengths(dtype, head_dim):
    """Lengths from 1 to 2048 around every tile size, causal and windowed, on the GPU's own configurations."""
    generator = torch.Generator().manual_seed(9)
    # 300 sequences: more than a program scans at once (common.SEQUENCE_CHUNK).
    lengths = [1, 2047, 0, 128, 129, 1023, 64, 2048] + torch.randint(0, 60, (292,), generator=generator).tolist()
    q, k, v, cu_q, cu_k = packed_inputs(lengths, lengths, 8, 2, head_dim, dtype)
    check(q, k, v, cu_q, cu_k, causal=True)
    check(q, k, v, cu_q, cu_k, window_size=(256, 0))


def test_torch_backend_path(monkeypatch):
    """Where no Triton backend applies (a CPU tensor without the interpreter), the reference runs, the call
    warns and is counted; the results are the reference's, gradients included."""
    import importlib

    varlen = importlib.import_module("flash_softmax.attention.varlen")
    monkeypatch.setattr(varlen, "backend_for", lambda device: "torch")
    q, k, v, cu_q, cu_k = packed_inputs(*LENGTHS["sq-ne-sk"], 2, 1, 16, torch.float32)
    with pytest.warns(fs.FallbackWarning, match="attention_varlen_forward"):
        out, lse = fs.flash_attention_varlen(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    expected, expected_lse = reference.attention_varlen(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse)
    assert fs.stats()["attention_varlen_forward"] == {"torch": 1}
