"""``flash-softmax verify``'s cache cases (``--ops kvcache``): what the grids cover, that the harness passes a
correct kernel and fails wrong ones (ignoring the lengths, appending in the wrong place, writing past the new keys,
ignoring the block table), and the real ``flash_attention_with_kvcache`` on the quick grid.

The harness tests put ``reference.attention_kvcache`` (or a deliberately wrong variant of it) in ``verify.KERNELS``,
so they take a fraction of a second a case; only the last test runs the Triton kernels, in the interpreter on a CPU.
"""

from __future__ import annotations

import pytest
import torch

import flash_softmax
from flash_softmax import cli, reference, verify

from conftest import DEVICE


def reference_kernel(q, k_cache, v_cache, k=None, v=None, *, num_splits=0, **options):
    """The float32 reference with the kernel's signature (the split count changes nothing but rounding)."""
    assert isinstance(options["cache_seqlens"], torch.Tensor) and options["cache_seqlens"].dtype == torch.int32
    return reference.attention_kvcache(q, k_cache, v_cache, k, v, **options)


def reading_the_whole_cache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens=None, num_splits=0, **options):
    """Appends where it should, then attends every position of the cache: the lengths ignored when reading."""
    if k is not None:
        reference.attention_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, **options)
    return reference.attention_kvcache(q, k_cache, v_cache, **options)


def appending_one_position_late(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens=None, num_splits=0,
                                **options):
    """Writes the new keys one position after where they belong (and attends the cache so written)."""
    return reference.attention_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens + 1, **options)


def clearing_past_the_new_keys(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens=None, block_table=None,
                               num_splits=0, **options):
    """Right out and lse, but the cache past each sequence's new keys is zeroed: positions that are never read,
    written all the same."""
    out = reference.attention_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens,
                                      block_table=block_table, **options)
    new_keys = 0 if k is None else k.shape[2]
    page_size = k_cache.shape[2]
    for index, cached in enumerate(cache_seqlens.tolist()):
        capacity = page_size if block_table is None else block_table.shape[1] * page_size
        for position in range(cached + new_keys, capacity):
            page, slot = (index, position) if block_table is None else (
                int(block_table[index, position // page_size]), position % page_size)
            k_cache[page, :, slot] = 0
            v_cache[page, :, slot] = 0
    return out


def ignoring_the_block_table(q, k_cache, v_cache, k=None, v=None, *, block_table=None, num_splits=0, **options):
    """Takes the pages of sequence b to be ``b * pages_per_seq ...`` in order, whatever the block table says."""
    if block_table is not None:
        batch, pages = block_table.shape
        block_table = torch.arange(batch * pages, dtype=block_table.dtype, device=block_table.device).view(batch, pages)
    return reference.attention_kvcache(q, k_cache, v_cache, k, v, block_table=block_table, **options)


def only_kvcache_cases(monkeypatch, cases: list) -> None:
    """Make the quick grid's cache cases exactly ``cases``."""
    monkeypatch.setattr(verify, "QUICK_KVCACHE", cases)


def case_with(**fields) -> verify.KVCacheCase:
    """The first quick cache case with these field values."""
    return next(case for case in verify.QUICK_KVCACHE
                if all(getattr(case, name) == value for name, value in fields.items()))


# ------------------------------------------------------------------------------------------- grids


def test_the_quick_grid_covers_layouts_lengths_heads_appends_splits_and_options_in_small_caches():
    cases = verify.QUICK_KVCACHE
    assert 3 <= len(cases) <= 4 and all(case.capacity <= 128 for case in cases)  # the interpreter
    assert all(len(case.label) <= 105 for case in cases)  # one line of the report's case column
    assert {case.page_size for case in cases} == {None, 16}
    assert all(len(set(case.cache_seqlens)) == case.batch for case in cases if case.batch > 1)
    assert any(0 in case.cache_seqlens for case in cases)
    assert any(case.heads_kv not in (None, case.heads) and case.heads_kv > 1 for case in cases)  # grouped
    assert any(case.heads_kv == 1 for case in cases)  # multi-query
    assert any(case.seqlen_new > 1 and case.seqlen_q > 1 and case.causal for case in cases)
    assert any(case.seqlen_new == 0 for case in cases) and any(case.seqlen_new == 1 for case in cases)
    assert {case.num_splits for case in cases} >= {0, 1} and any(case.num_splits > 1 for case in cases)
    assert any(case.window_size != (-1, -1) and case.sinks for case in cases)
    assert any(case.alibi and case.softcap for case in cases)
    assert {case.dtype for case in cases} == set(verify.ALL_DTYPES)
    assert len({case.label for case in cases}) == len(cases)


def test_the_full_grid_covers_page_sizes_splits_batches_heads_and_dtypes():
    cases = verify.full_kvcache_grid()
    assert {case.page_size for case in cases} == {None, 16, 256}
    assert {case.num_splits for case in cases} == {0, 1, 64}
    assert max(case.batch for case in cases) == 8 and min(case.batch for case in cases) == 1
    assert max(case.capacity for case in cases) >= 4096 and max(max(case.cache_seqlens) for case in cases) >= 3000
    assert {case.head_dim for case in cases} == {64, 128}
    assert {(case.heads, case.heads_kv) for case in cases} >= {(32, 8), (16, 1)}  # grouped and multi-query
    assert {case.dtype for case in cases} == {"bfloat16", "float16"}
    decode_steps = [case for case in cases if (case.seqlen_q, case.seqlen_new) == (1, 1) and case.alibi is None]
    assert {(case.page_size, case.num_splits, case.dtype) for case in decode_steps} == {
        (page_size, splits, dtype) for page_size in (None, 16, 256) for splits in (0, 1, 64)
        for dtype in ("bfloat16", "float16")}
    assert any(case.seqlen_q == case.seqlen_new == 64 for case in cases)  # chunked prefill
    assert any(case.sinks and case.window_size != (-1, -1) for case in cases)
    assert any(case.alibi == "batch" and case.softcap for case in cases)
    assert len({case.label for case in cases}) == len(cases)


def test_the_grids_select_cache_cases_under_ops_kvcache_and_the_filters():
    parse = cli.build_parser().parse_args
    assert parse(["verify"]).ops == ["attention", "varlen", "kvcache", "softmax"]
    quick, _ = verify.select_cases(parse(["verify", "--quick"]), on_gpu=False)
    assert [case for case in quick if isinstance(case, verify.KVCacheCase)] == verify.QUICK_KVCACHE
    only, _ = verify.select_cases(parse(["verify", "--quick", "--ops", "kvcache", "--dtypes", "bfloat16"]),
                                  on_gpu=False)
    assert only == [case for case in verify.QUICK_KVCACHE if case.dtype == "bfloat16"] and only
    full, _ = verify.select_cases(parse(["verify", "--ops", "kvcache", "--causal", "true", "--head-dims", "128"]),
                                  on_gpu=True)
    assert full == [case for case in verify.full_kvcache_grid() if case.causal and case.head_dim == 128] and full
    sweep, _ = verify.select_cases(parse(["verify", "--seqlens", "64"]), on_gpu=False)
    assert not any(isinstance(case, verify.KVCacheCase) for case in sweep)  # the sweep's shapes have no cache


def test_labels_say_kvcache_the_lengths_the_layout_and_the_splits():
    case = verify.KVCacheCase((3, 0, 5), 2, 2, 16, 64, True, "float16", heads=4, heads_kv=2, page_size=8,
                              window_size=(4, 0), sinks=True, alibi="batch", num_splits=3)
    assert case.label == ("attention_kvcache float16 B3 H4/2 Sq2 Sn2 D64 cached=(3,0,5)/16 pages=8 causal "
                          "window=(4, 0) sinks alibi (B,Hq) splits=3")
    assert verify.KVCacheCase((7,), 1, 0, 8, 16, False, "float32").label == \
        "attention_kvcache float32 B1 H2 Sq1 Sn0 D16 cached=(7)/8 splits=auto"


@pytest.mark.parametrize("fields,message", [
    (dict(cache_seqlens=()), "expected one length per sequence, got none"),
    (dict(cache_seqlens=(3, 15)), r"expected lengths in \[0, capacity - seqlen_new\] = \[0, 14\], got \(3, 15\)"),
    (dict(seqlen_q=0), "seqlen_q, seqlen_new: expected >= 1 and >= 0, got 0 and 2"),
    (dict(page_size=5), "page_size: expected a divisor of the capacity 16, got 5"),
    (dict(alibi="sequences"), "alibi: expected None, 'heads' or 'batch', got 'sequences'"),
    (dict(num_splits=-1), "num_splits: expected an integer >= 0, got -1"),
])
def test_cache_cases_reject_contradictory_fields(fields, message):
    arguments = {**dict(cache_seqlens=(3, 4), seqlen_q=1, seqlen_new=2, capacity=16, head_dim=16, causal=False,
                        dtype="float16"), **fields}
    with pytest.raises(ValueError, match=message):
        verify.KVCacheCase(**arguments)


# ----------------------------------------------------------------------------------------- harness


def test_the_harness_passes_the_reference_on_every_quick_case(monkeypatch, capsys):
    """The reference as the kernel: every case passes, and each row checks out, lse and both caches."""
    monkeypatch.setitem(verify.KERNELS, "attention_kvcache", reference_kernel)
    assert cli.main(["verify", "--quick", "--ops", "kvcache"]) == 0
    output = capsys.readouterr().out
    count = len(verify.QUICK_KVCACHE)
    assert f"{count}/{count} cases passed" in output and "not run" not in output
    lines = output.splitlines()
    for case in verify.QUICK_KVCACHE:
        row = next(line for line in lines if case.label in line)
        assert {"out", "lse", "k_cache", "v_cache"} <= set(row.replace("│", " ").split()), row


@pytest.mark.parametrize(
    "wrong,fields,expected",
    [
        (reading_the_whole_cache, dict(page_size=None, seqlen_new=1), "out: FAIL"),
        (reading_the_whole_cache, dict(alibi="batch"), "out: FAIL"),
        (appending_one_position_late, dict(page_size=16, seqlen_new=3), "k_cache: FAIL"),
        (appending_one_position_late, dict(page_size=None, seqlen_new=1), "v_cache: FAIL"),
        (clearing_past_the_new_keys, dict(page_size=16, sinks=True), "k_cache: FAIL"),
        (ignoring_the_block_table, dict(page_size=16, seqlen_new=3), "out: FAIL"),
    ],
    ids=["whole-cache-contiguous", "whole-cache-no-append", "late-append-paged", "late-append-contiguous",
         "writes-past-the-new-keys", "pages-in-order"],
)
def test_verify_exits_1_when_a_cache_kernel_is_wrong(monkeypatch, capsys, wrong, fields, expected):
    case = case_with(**fields)
    only_kvcache_cases(monkeypatch, [case])
    monkeypatch.setitem(verify.KERNELS, "attention_kvcache", wrong)
    assert cli.main(["verify", "--quick", "--ops", "kvcache"]) == 1
    output = capsys.readouterr().out
    assert f"{case.label}: {expected}" in output and "FAILED" in output


def test_a_write_past_the_new_keys_fails_the_cache_alone(monkeypatch):
    """Its out and lse are right: only the comparison of the whole cache sees the stray writes."""
    monkeypatch.setitem(verify.KERNELS, "attention_kvcache", clearing_past_the_new_keys)
    result = verify.run_case(case_with(sinks=True), torch.device("cpu"), seed=0)
    verdicts = {comparison.name: comparison.passed for comparison in result.comparisons}
    assert verdicts == {"out": True, "lse": True, "k_cache": False, "v_cache": False}, result.error


def test_without_the_function_the_cache_cases_are_left_out_and_said_so(monkeypatch, capsys):
    monkeypatch.delattr(flash_softmax, "flash_attention_with_kvcache", raising=False)
    assert verify.kvcache_features() == set()
    assert cli.main(["verify", "--quick", "--ops", "kvcache", "softmax", "--dtypes", "float32"]) == 0
    output = capsys.readouterr().out
    assert "not run, the kernel does not offer: kvcache" in output and "attention_kvcache" not in output


def test_features_follow_the_kernels_signature(monkeypatch):
    def plain(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens=None, block_table=None, causal=False,
              return_lse=False):
        raise AssertionError("never called")

    monkeypatch.setitem(verify.KERNELS, "attention_kvcache", plain)
    assert verify.kvcache_features() == {"kvcache"}
    monkeypatch.setitem(verify.KERNELS, "attention_kvcache", None)
    assert verify.kvcache_features() == {"kvcache", *(f"kvcache {name}" for name in (
        "window_size", "softcap", "sinks", "alibi_slopes", "num_splits"))}
    needed = set().union(*(case.requires() for case in verify.QUICK_KVCACHE))
    assert needed == verify.kvcache_features()


# ------------------------------------------------------------------------------------- real kernel


@pytest.mark.parametrize("case", verify.QUICK_KVCACHE, ids=lambda case: case.label)
def test_the_real_kernel_passes_the_quick_cache_cases(case):
    result = verify.run_case(case, torch.device(DEVICE), seed=0)
    assert result.passed, (case.label, result.error, [str(c) for c in result.comparisons])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_real_kernel_passes_a_long_paged_batch_with_many_splits(dtype):
    lengths, capacity = verify.FULL_KVCACHE_BATCHES[1]
    for case in (verify.KVCacheCase(lengths, 4, 4, capacity, 128, True, dtype, heads=32, heads_kv=8, page_size=256,
                                    num_splits=64, sinks=True, window_size=(512, 0)),
                 verify.KVCacheCase(lengths, 1, 1, capacity, 64, False, dtype, heads=16, heads_kv=1, page_size=16,
                                    alibi="batch", softcap=20.0)):
        result = verify.run_case(case, torch.device(DEVICE), seed=0)
        assert result.passed, (case.label, result.error, [str(c) for c in result.comparisons])
