"""``flash_attention_with_kvcache``: decoding over contiguous and paged caches, split-KV, in-place appends.

Every result is judged against ``reference.attention_kvcache`` in float64, with the input-dtype reference as
the yardstick for 16-bit inputs (the accuracy policy of ``flash_softmax.testing``). Lengths differ per
sequence and include 0, one off the interpreter's 32-key block, a page's end and the cache's capacity; pages
are shuffled and include ones no sequence uses. Cache entries nobody may read are NaN, so reading one shows.
"""

from __future__ import annotations

import pytest
import torch

import flash_softmax as fs
from flash_softmax import reference
from flash_softmax.attention import configs, decode
from flash_softmax.attention.configs import KernelConfig

from attention_checks import FACTORS
from conftest import DEVICE
from flash_softmax.testing import assert_close


class Cache:
    """A seeded problem: ``q (B, Hq, Sq, D)``, caches (contiguous ``(B, Hkv, Smax, D)``, the same stored as
    ``(B, Smax, Hkv, D)`` and transposed, or paged ``(pages, Hkv, page_size, D)`` stored as
    ``(pages, page_size, Hkv, D)`` and transposed, with a shuffled ``block_table``), the new ``k, v`` and the
    lengths. Every position at or past a sequence's ``L_b`` holds NaN, and so do the unused pages."""

    def __init__(self, lengths, new_keys=1, seqlen_q=1, heads_q=4, heads_kv=2, head_dim=32, head_dim_v=None,
                 capacity=100, layout="contiguous", page_size=16, dtype=torch.float32, seed=0):
        generator = torch.Generator().manual_seed(seed)
        head_dim_v = head_dim if head_dim_v is None else head_dim_v
        batch = len(lengths)

        def randn(*shape):
            return torch.randn(*shape, generator=generator).to(device=DEVICE, dtype=dtype)

        self.q = randn(batch, heads_q, seqlen_q, head_dim)
        self.k = randn(batch, heads_kv, new_keys, head_dim) if new_keys else None
        self.v = randn(batch, heads_kv, new_keys, head_dim_v) if new_keys else None
        self.cache_seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
        self.block_table = None
        if layout == "paged":
            pages_per_seq = -(-capacity // page_size)
            pages = batch * pages_per_seq + 3  # three pages no sequence uses
            order = torch.randperm(pages, generator=generator)[:batch * pages_per_seq]
            self.block_table = order.view(batch, pages_per_seq).to(device=DEVICE, dtype=torch.int32)
            shape_k, shape_v = (pages, page_size, heads_kv, head_dim), (pages, page_size, heads_kv, head_dim_v)
            self.k_cache, self.v_cache = randn(*shape_k).transpose(1, 2), randn(*shape_v).transpose(1, 2)
        elif layout == "transposed":
            self.k_cache = randn(batch, capacity, heads_kv, head_dim).transpose(1, 2)
            self.v_cache = randn(batch, capacity, heads_kv, head_dim_v).transpose(1, 2)
        else:
            self.k_cache = randn(batch, heads_kv, capacity, head_dim)
            self.v_cache = randn(batch, heads_kv, capacity, head_dim_v)
        self._poison(lengths, new_keys)

    def positions(self, index: int, start: int, stop: int) -> list[tuple[int, int]]:
        """Where positions ``start:stop`` of sequence ``index`` live: ``(outer index, slot)`` pairs."""
        if self.block_table is None:
            return [(index, p) for p in range(start, stop)]
        size = self.k_cache.shape[2]
        return [(int(self.block_table[index, p // size]), p % size) for p in range(start, stop)]

    def _poison(self, lengths, new_keys) -> None:
        """NaN everywhere no read may reach: past each sequence's cached tokens (the new ones land there
        first) and in the pages no sequence owns."""
        keep = torch.zeros(self.k_cache.shape[0], self.k_cache.shape[2], dtype=torch.bool, device=DEVICE)
        for index, length in enumerate(lengths):
            for outer, slot in self.positions(index, 0, length):
                keep[outer, slot] = True
        for cache in (self.k_cache, self.v_cache):
            cache.masked_fill_(~keep[:, None, :, None], float("nan"))

    def run(self, dtype=None, upcast=None, function=None, **options):
        """``(out, lse, k_cache, v_cache)`` of ``function`` (the kernel, or the reference in ``dtype``) on
        copies of the caches."""
        k_cache, v_cache = (cache.clone() for cache in (self.k_cache, self.v_cache))
        tensors = [self.q, k_cache, v_cache, self.k, self.v]
        if function is reference.attention_kvcache:
            # The reference writes into copies in its own dtype, in the same (strided) layout.
            tensors = [None if t is None else t.to(dtype) for t in tensors]
            k_cache, v_cache = tensors[1], tensors[2]
            options = dict(options, upcast=upcast)
            options.pop("num_splits", None)
        function = function or fs.flash_attention_with_kvcache
        out, lse = function(*tensors, cache_seqlens=options.pop("cache_seqlens", self.cache_seqlens),
                            block_table=self.block_table, return_lse=True, **options)
        return out, lse, k_cache, v_cache


def check(problem: Cache, **options):
    """Judge out and lse against the float64 reference; return the kernel's results."""
    got = problem.run(**options)
    truth = problem.run(torch.float64, True, reference.attention_kvcache, **options)
    lowp = (None, None)
    if problem.q.dtype != torch.float32:
        lowp = problem.run(problem.q.dtype, False, reference.attention_kvcache, **options)
    for index, name in enumerate(("out", "lse")):
        assert_close(name, got[index], truth[index], lowp[index], factor=FACTORS[name])
    return got


LENGTHS = [0, 31, 57, 99]  # empty, a block minus one, mid-page, the capacity minus one (one new token each)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "paged"])
@pytest.mark.parametrize("num_splits", [1, 0, 7])
def test_decode_step_matches_reference(layout, num_splits):
    check(Cache(LENGTHS, layout=layout), causal=True, num_splits=num_splits)


@pytest.mark.parametrize("options", [
    dict(window_size=(20, 0), sinks="sinks"),
    dict(causal=True, alibi_slopes="per-batch", softcap=4.0),
    dict(window_size=(9, 3), alibi_slopes="shared"),
    dict(sinks="sinks"),
], ids=["window-sinks", "alibi-softcap", "two-sided-window-alibi", "sinks-not-causal"])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_score_modifiers(options, num_splits):
    problem = Cache([5, 0, 70, 40], new_keys=3, seqlen_q=3, heads_q=6, heads_kv=2, layout="paged")
    generator = torch.Generator().manual_seed(3)
    values = {"sinks": torch.randn(6, generator=generator), "per-batch": torch.rand(4, 6, generator=generator),
              "shared": torch.rand(6, generator=generator)}
    options = {name: values[value].to(DEVICE) if isinstance(value, str) else value for name, value in options.items()}
    check(problem, num_splits=num_splits, **options)


@pytest.mark.parametrize("seqlen_q,new_keys", [(3, 3), (40, 40), (5, 0), (2, 6)],
                         ids=["speculative", "chunked-prefill", "queries-without-new-keys", "more-new-keys"])
def test_query_chunks_are_bottom_right_aligned(seqlen_q, new_keys):
    """More than one query row (several blocks of rows for the chunk), causal from each sequence's end."""
    lengths = [0, 20, 50] if new_keys else [2, 20, 50]
    check(Cache(lengths, new_keys=new_keys, seqlen_q=seqlen_q, heads_q=4, heads_kv=1, layout="paged",
                page_size=8), causal=True, num_splits=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    check(Cache([12, 63, 1], new_keys=2, seqlen_q=2, heads_q=8, heads_kv=1, head_dim=40, head_dim_v=24,
                layout="paged", dtype=dtype), causal=True, num_splits=3)


def test_append_writes_exactly_the_new_positions():
    """The cache after the call is the cache before it with the new rows at ``cache_seqlens[b] ...``, bitwise:
    nothing else (the other slots, the other pages) is written."""
    problem = Cache([0, 17, 60], new_keys=5, heads_kv=2, layout="paged", page_size=16)
    _, _, k_cache, v_cache = problem.run(causal=True)
    for cache, new, before in ((k_cache, problem.k, problem.k_cache), (v_cache, problem.v, problem.v_cache)):
        expected = before.clone()
        for index, length in enumerate(problem.cache_seqlens.tolist()):
            for offset, (outer, slot) in enumerate(problem.positions(index, length, length + 5)):
                expected[outer, :, slot] = new[index, :, offset]
        assert torch.equal(cache.nan_to_num(7.0), expected.nan_to_num(7.0))


def test_append_past_the_capacity_writes_nothing_outside_the_cache():
    """A length the caller got wrong (not checked on the device) never writes outside the sequence's cache."""
    problem = Cache([98, 3], new_keys=4, capacity=100)
    _, _, k_cache, _ = problem.run(causal=True)
    assert torch.equal(k_cache[0, :, 98:], problem.k[0, :, :2])
    assert torch.equal(k_cache[1, :, 3:7], problem.k[1])


def test_split_counts_agree():
    problem = Cache([40, 99, 7], layout="paged")
    results = [problem.run(causal=True, num_splits=splits)[:2] for splits in (1, 2, 5, 64)]
    for out, lse in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse, results[0][1], rtol=1e-5, atol=1e-6)


def test_deterministic():
    problem = Cache([40, 99, 7], layout="paged")
    first, second = (problem.run(causal=True, num_splits=4)[:2] for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_int_and_omitted_lengths():
    """An int length is every sequence's; None means the whole cache."""
    problem = Cache([30, 30], new_keys=2)
    check(problem, causal=True, cache_seqlens=30)
    full = Cache([100, 100], new_keys=0)
    check(full, causal=True, cache_seqlens=None)


@pytest.mark.parametrize("block_m,block_n", [(16, 64), (64, 64), (32, 32)])
def test_gpu_tiles(block_m, block_n):
    """The GPU's decode tiles (forced in the interpreter): row blocks across query heads and queries."""
    with configs.override(decode=KernelConfig(block_m, block_n, 4, 3)):
        check(Cache([0, 63, 130, 199], new_keys=3, seqlen_q=3, heads_q=8, heads_kv=1, capacity=200, layout="paged",
                    page_size=256 if block_n == 64 else 16), causal=True, num_splits=0)


def test_choose_num_splits():
    """Few programs split to fill twice the SMs, within the keys' blocks; enough programs never split."""
    sms = configs.sm_count()
    small = decode.DecodeShape(batch=1, heads_q=4, heads_kv=1, seqlen_q=1, capacity=10_000)
    assert decode.choose_num_splits(small, 16, 64) == -(-2 * sms // 1)
    short = decode.DecodeShape(batch=1, heads_q=4, heads_kv=1, seqlen_q=1, capacity=64 * 3)
    assert decode.choose_num_splits(short, 16, 64) == 1
    large = decode.DecodeShape(batch=2 * sms, heads_q=4, heads_kv=1, seqlen_q=1, capacity=10_000)
    assert decode.choose_num_splits(large, 16, 64) == 1


def test_flash_attention_takes_the_decode_path(monkeypatch):
    """``flash_attention`` on decode shapes runs the decode kernels, forward and (through the same lse) backward;
    a forced forward configuration or a bias keeps the forward kernel."""
    calls = []
    original = decode.attention_decode
    monkeypatch.setattr(decode, "attention_decode", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(*shape, generator=generator).to(DEVICE).requires_grad_()
               for shape in ((2, 4, 2, 16), (2, 2, 150, 16), (2, 2, 150, 8)))
    out, lse = fs.flash_attention(q, k, v, causal=True, return_lse=True)
    (out.sum() + lse.sum()).backward()
    assert calls == [1]
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected, expected_lse = reference.attention(*leaves, causal=True, return_lse=True)
    (expected.sum() + expected_lse.sum()).backward()
    pairs = ((out, expected), (lse, expected_lse), *((a.grad, b.grad) for a, b in zip((q, k, v), leaves)))
    for name, (got, want) in zip(("out", "lse", "dq", "dk", "dv"), pairs):
        assert_close(name, got, want, None, factor=FACTORS[name])
    with configs.override(forward=KernelConfig(32, 32, 4, 1)):
        fs.flash_attention(q.detach(), k.detach(), v.detach(), causal=True)
    fs.flash_attention(q.detach(), k.detach(), v.detach(), attn_bias=torch.zeros(150, device=DEVICE))
    assert calls == [1]


def test_empty():
    problem = Cache([3, 4], new_keys=2, seqlen_q=0)
    out, lse, k_cache, _ = problem.run(causal=True)
    assert out.shape == (2, 4, 0, 32) and lse.shape == (2, 4, 0)
    assert torch.equal(k_cache[1, :, 4:6], problem.k[1])  # the append still happens


def test_inference_only():
    problem = Cache([3, 4])
    with pytest.raises(ValueError, match="inference only"):
        fs.flash_attention_with_kvcache(problem.q.requires_grad_(), problem.k_cache, problem.v_cache,
                                        cache_seqlens=problem.cache_seqlens)
    with torch.no_grad():
        fs.flash_attention_with_kvcache(problem.q, problem.k_cache, problem.v_cache, cache_seqlens=problem.cache_seqlens)


def test_compiled_fullgraph_equals_eager():
    torch._dynamo.reset()
    problem = Cache([10, 50], new_keys=1, layout="paged")

    def step(q, k_cache, v_cache, k, v, lengths, table):
        return fs.flash_attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths, block_table=table,
                                               causal=True, num_splits=2, return_lse=True)

    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend=backend)):
        k_cache, v_cache = problem.k_cache.clone(), problem.v_cache.clone()
        out, lse = fn(problem.q, k_cache, v_cache, problem.k, problem.v, problem.cache_seqlens, problem.block_table)
        results.append([out, lse, k_cache.nan_to_num(7.0), v_cache.nan_to_num(7.0)])
    torch._dynamo.reset()
    for got, expected in zip(*results):
        assert torch.equal(got, expected)


def test_opcheck():
    problem = Cache([10, 50], new_keys=2, layout="paged")
    k_cache, v_cache = (cache.nan_to_num(0.0) for cache in (problem.k_cache, problem.v_cache))
    torch.library.opcheck(torch.ops.flash_softmax.kvcache_append.default,
                          (k_cache, v_cache, problem.k, problem.v, problem.cache_seqlens, problem.block_table, 0))
    sinks = torch.randn(4, device=DEVICE)
    torch.library.opcheck(torch.ops.flash_softmax.attention_kvcache.default,
                          (problem.q, k_cache, v_cache, problem.cache_seqlens, problem.block_table, sinks, None, 0, 2,
                           0.3, -1, 0, 0.0, 3))


ERRORS = {
    "3-d q": (dict(q=lambda t: t[0]), ValueError, "q must have 4 dims"),
    "cache batch": (dict(k_cache=lambda t: t[:1], v_cache=lambda t: t[:1]), ValueError, "k_cache must have q's batch"),
    "cache dtype": (dict(k_cache=lambda t: t.double()), TypeError, "k_cache must have dtype|share one dtype"),
    "cache last dim": (dict(k_cache=lambda t: t.transpose(2, 3).contiguous().transpose(2, 3)), ValueError,
                       "k_cache must have a contiguous last dim"),
    "heads": (dict(q=lambda t: t[:, :3]), ValueError, "multiple of the key/value heads"),
    "k without v": (dict(v=lambda t: None), ValueError, "k and v must be given together"),
    "k shape": (dict(k=lambda t: t[:, :1]), ValueError, r"k must have shape \(B, Hkv, Sn, D\)"),
    "k without lengths": (dict(cache_seqlens=lambda t: None), ValueError, "cache_seqlens is required"),
    "float lengths": (dict(cache_seqlens=lambda t: t.float()), TypeError, "cache_seqlens must have dtype int32"),
    "lengths shape": (dict(cache_seqlens=lambda t: t[:1]), ValueError, r"cache_seqlens must have shape \(B,\)"),
    "int length too long": (dict(cache_seqlens=lambda t: 100), ValueError, r"cache_seqlens must be in \[0, capacity"),
    "table dtype": (dict(block_table=lambda t: torch.zeros(2, 2, device=DEVICE)), TypeError,
                    "block_table must have dtype int32"),
    "table shape": (dict(block_table=lambda t: torch.zeros(3, 2, dtype=torch.int32, device=DEVICE)), ValueError,
                    r"block_table must have shape \(B, pages_per_seq\)"),
    "splits": (dict(num_splits=lambda t: -1), ValueError, "num_splits must be >= 0"),
    "splits type": (dict(num_splits=lambda t: 2.0), TypeError, "num_splits must be an int"),
}


@pytest.mark.parametrize("changes,error,message", ERRORS.values(), ids=ERRORS.keys())
def test_bad_inputs_are_named(changes, error, message):
    problem = Cache([3, 4], new_keys=1)
    arguments = dict(q=problem.q, k_cache=problem.k_cache, v_cache=problem.v_cache, k=problem.k, v=problem.v,
                     cache_seqlens=problem.cache_seqlens, block_table=None, num_splits=0)
    for name, transform in changes.items():
        arguments[name] = transform(arguments[name])
    with pytest.raises(error, match=message):
        fs.flash_attention_with_kvcache(
            arguments["q"], arguments["k_cache"], arguments["v_cache"], arguments["k"], arguments["v"],
            cache_seqlens=arguments["cache_seqlens"], block_table=arguments["block_table"],
            num_splits=arguments["num_splits"])


def test_torch_backend_path(monkeypatch):
    """Where no Triton backend applies, the reference runs (writing the caches too), warns and is counted."""
    import importlib

    kvcache = importlib.import_module("flash_softmax.attention.kvcache")
    monkeypatch.setattr(kvcache, "backend_for", lambda device: "torch")
    problem = Cache([3, 40], new_keys=2, layout="paged")
    with pytest.warns(fs.FallbackWarning, match="attention_kvcache"):
        out, lse, k_cache, _ = problem.run(causal=True)
    expected, expected_lse, expected_cache, _ = problem.run(problem.q.dtype, True, reference.attention_kvcache,
                                                            causal=True)
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse)
    assert torch.equal(k_cache.nan_to_num(7.0), expected_cache.nan_to_num(7.0))
    assert fs.stats()["attention_kvcache"] == {"torch": 1}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("layout,page_size", [("contiguous", 0), ("paged", 16), ("paged", 256)])
def test_gpu_long_caches(dtype, head_dim, layout, page_size):
    """Caches of thousands of tokens on the GPU's own tiles, MQA and GQA, every split choice."""
    lengths = [0, 4095, 1, 2047, 3000, 64, 127, 4000]
    for heads_q, heads_kv in ((32, 8), (8, 1)):
        problem = Cache(lengths, new_keys=1, heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim, capacity=4096,
                        layout=layout, page_size=page_size or 16, dtype=dtype)
        for splits in (0, 1, 37):
            check(problem, causal=True, num_splits=splits)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_follows_the_lengths():
    """A decode step captured once in a CUDA graph and replayed with new lengths and new tokens: no host
    synchronisation or value-dependent allocation in the call, so each replay equals an eager call."""
    problem = Cache([100, 2000, 7, 4000], new_keys=1, heads_q=32, heads_kv=8, head_dim=128, capacity=4096,
                    layout="paged", page_size=256, dtype=torch.bfloat16)
    k_cache, v_cache = (cache.nan_to_num(0.0) for cache in (problem.k_cache, problem.v_cache))
    lengths = problem.cache_seqlens.clone()
    q, k, v = problem.q.clone(), problem.k.clone(), problem.v.clone()

    def step():
        return fs.flash_attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths,
                                               block_table=problem.block_table, causal=True)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for new_lengths in ([101, 2001, 8, 4001], [0, 1, 2, 3]):
        lengths.copy_(torch.tensor(new_lengths, dtype=torch.int32))
        q.normal_(), k.normal_(), v.normal_()
        graph.replay()
        eager_k, eager_v = k_cache.clone(), v_cache.clone()
        expected = fs.flash_attention_with_kvcache(q, eager_k, eager_v, k, v, cache_seqlens=lengths,
                                                   block_table=problem.block_table, causal=True)
        torch.cuda.synchronize()
        assert torch.equal(out, expected)


def test_lengths_and_block_table_of_any_strides():
    """An expanded (stride-0) ``cache_seqlens`` and a block table with a strided last dim are read as given."""
    problem = Cache([30, 30, 30], new_keys=1, layout="paged")
    same = torch.tensor([30], dtype=torch.int32, device=DEVICE).expand(3)
    expected = problem.run(causal=True)[:2]
    got = problem.run(causal=True, cache_seqlens=same)[:2]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    table = problem.block_table
    problem.block_table = torch.stack([table, table], dim=-1)[..., 0]  # the same entries, stride 2 along dim 1
    assert problem.block_table.stride(-1) == 2
    got = problem.run(causal=True)[:2]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
