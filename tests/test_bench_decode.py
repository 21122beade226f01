"""``flash-softmax bench --decode``: the sweep and what fits the memory, the bytes and bandwidth accounting, the
providers' results against the reference on the same caches, the flags, and a tiny run of the command on the CPU
(Triton's interpreter) with its CSV.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from flash_softmax import bench, cli, reference
from flash_softmax.bench import decode, providers, sweep
from flash_softmax.bench.timing import time_cpu

from conftest import DEVICE

ON_GPU = torch.cuda.is_available()
DECODE_COLUMNS = ["provider", "dtype", "batch", "heads", "heads_kv", "head_dim", "cache_len", "page_size", "kv_bytes",
                  "ms_median", "ms_p20", "ms_p80", "kv_gbps", "copy_gbps", "kv_vs_copy", "peak_mem_mib",
                  *(["fs_speedup"] if ON_GPU else []), "threads", "status"]


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames), list(reader)


def parse(*arguments: str):
    return cli.build_parser().parse_args(["bench", "--decode", *arguments])


# ----------------------------------------------------------------------------------------------- sweep


def test_default_sweep_of_a_gpu_leaves_out_what_does_not_fit_its_memory(monkeypatch):
    monkeypatch.setattr(decode, "device_memory", lambda: 80 * 2**30)
    plan = decode.resolve_sweep(parse(), on_gpu=True)
    configs = decode.configurations(plan)
    assert {(config.dtype, config.heads, config.heads_kv, config.head_dim, config.page_size) for config in configs} == {
        ("bfloat16", 32, 8, 128, 256)}
    lengths = [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
    everything = {(batch, length) for batch in (1, 8, 64) for length in lengths}
    # 64 sequences of 128k tokens: 32 GiB of K and V, three times over (contiguous, paged, the copy's destination).
    assert [(config.batch, config.cache_len) for config in decode.left_out(plan)] == [(64, 131072)]
    assert {(config.batch, config.cache_len) for config in configs} == everything - {(64, 131072)}
    assert [config.cache_len for config in configs[:8]] == lengths  # ascending within a batch
    monkeypatch.setattr(decode, "device_memory", lambda: None)  # a machine whose memory is unknown: no limit
    assert len(decode.configurations(decode.resolve_sweep(parse(), on_gpu=True))) == 24


def test_flags_set_the_sweep_and_the_cpu_defaults_are_tiny():
    plan = decode.resolve_sweep(parse("--decode-batches", "3", "1", "3", "--decode-lengths", "100", "40",
                                      "--decode-page-size", "32", "--heads", "6", "--gqa", "3", "--head-dims", "16",
                                      "--dtypes", "float32"), on_gpu=False)
    configs = decode.configurations(plan)
    assert [(config.batch, config.cache_len) for config in configs] == [(3, 40), (3, 100), (1, 40), (1, 100)]
    assert {(config.heads, config.heads_kv, config.page_size, config.head_dim, config.dtype) for config in configs} \
        == {(6, 2, 32, 16, "float32")}
    (first, *_) = decode.configurations(decode.resolve_sweep(parse(), on_gpu=False))
    assert (first.batch, first.cache_len, first.heads, first.heads_kv, first.head_dim) == (1, 32, 4, 2, 32)


# ----------------------------------------------------------------------------------------- accounting


def test_kv_bytes_are_the_cached_tokens_of_every_sequence_and_head_and_the_copy_moves_them_twice():
    config = decode.DecodeConfig("bfloat16", 3, 8, 2, 64, 100, 16)
    assert config.kv_bytes() == 3 * 100 * 2 * (64 + 64) * 2  # sum_b L_b * Hkv * (D + Dv) * 2 bytes
    assert config.cache_bytes() == 2 * config.kv_bytes() + 3 * 7 * 16 * 2 * 128 * 2  # 7 whole pages a sequence
    results = [sweep.Result(name, config, sweep.Measurement("ok", sweep.Timing(ms, ms * 0.9, ms * 1.1)))
               for name, ms in (("flash_softmax", 0.02), ("sdpa_math", 0.05), ("copy", 0.01))]
    results.append(sweep.Result("flash_softmax_paged", config, sweep.Measurement("oom")))
    records = [decode.record(result, threads=2) for result in results]
    decode.add_copy_bandwidth(results, records)
    assert set(records[0]) | {"fs_speedup"} == set(bench.csv_columns(decode.CSV_COLUMNS, on_gpu=True))
    kv_bytes = config.kv_bytes()
    fs, math_row, copy, paged = records
    assert fs["kv_gbps"] == pytest.approx(kv_bytes / 0.02e-3 / 1e9)
    assert copy["copy_gbps"] == pytest.approx(2 * kv_bytes / 0.01e-3 / 1e9)  # read and written
    assert fs["copy_gbps"] == math_row["copy_gbps"] == copy["copy_gbps"] == paged["copy_gbps"]
    assert fs["kv_vs_copy"] == pytest.approx(0.25) and math_row["kv_vs_copy"] == pytest.approx(0.1)
    assert copy["kv_vs_copy"] == pytest.approx(0.5)  # a copy reads half the bytes it moves
    assert paged["kv_gbps"] is None and paged["kv_vs_copy"] is None and paged["page_size"] == 16
    assert fs["page_size"] is None and (fs["cache_len"], fs["heads_kv"], fs["threads"]) == (100, 2, 2)

    columns, rows = bench.table_rows("attention_decode", records, [""] * 4, on_gpu=False)
    assert columns == ["provider", "dtype", "B", "H", "Hkv", "D", "L", "page", "ms (p20-p80)", "K/V GB/s",
                       "copy GB/s", "of copy", "peak MiB", "status"]
    cells = dict(zip(columns, rows[0]))
    assert (cells["L"], cells["page"], cells["of copy"]) == ("100", "-", "0.25")
    assert "copy GB/s" in bench.table_caption(records, on_gpu=False)


def test_without_a_copy_row_the_bandwidth_columns_stay_empty():
    config = decode.DecodeConfig("float16", 1, 2, 1, 16, 8, 4)
    results = [sweep.Result("flash_softmax", config, sweep.Measurement("ok", sweep.Timing(1.0, 1.0, 1.0))),
               sweep.Result("copy", config, sweep.Measurement("error: RuntimeError: no"))]
    records = [decode.record(result, threads=1) for result in results]
    decode.add_copy_bandwidth(results, records)
    assert records[0]["copy_gbps"] is None and records[0]["kv_vs_copy"] is None


# ------------------------------------------------------------------------------------------ providers


def test_the_paged_cache_holds_the_contiguous_one_through_a_shuffled_block_table():
    config = decode.DecodeConfig("float32", 3, 4, 2, 8, 40, 16)  # 40 tokens: the third page of each sequence half full
    inputs = decode.make_inputs(config, torch.device(DEVICE))
    table = inputs.block_table
    assert table.dtype == torch.int32 and table.shape == (3, 3)
    assert sorted(table.flatten().tolist()) == list(range(9)) and table.flatten().tolist() != list(range(9))
    assert inputs.k_pages.shape == (9, 2, 16, 8) and inputs.cache_seqlens.tolist() == [40, 40, 40]
    for pages, cache in ((inputs.k_pages, inputs.k_cache), (inputs.v_pages, inputs.v_cache)):
        gathered = pages[table.long()].transpose(1, 2).reshape(3, 2, 48, 8)  # (B, Hkv, pages * page_size, D)
        assert torch.equal(gathered[:, :, :40], cache) and not gathered[:, :, 40:].any()
    assert torch.equal(inputs.copy_source, torch.stack([inputs.k_cache, inputs.v_cache]))
    assert inputs.copy_destination.shape == inputs.copy_source.shape


ATTENTION_PROVIDERS = [name for name in providers.DECODE_PROVIDERS if name != "copy"]
CPU_PROVIDERS = [name for name in ATTENTION_PROVIDERS if providers.DECODE_PROVIDERS[name].on_cpu]


@pytest.mark.parametrize("name", [*CPU_PROVIDERS, *(pytest.param(name, marks=pytest.mark.gpu) for name in
                                                    ATTENTION_PROVIDERS if name not in CPU_PROVIDERS)])
def test_every_provider_attends_the_whole_cache_with_one_query(name):
    provider = providers.DECODE_PROVIDERS[name]
    config = decode.DecodeConfig("float32", 2, 4, 2, 16, 40, 16)
    inputs = decode.make_inputs(config, torch.device(DEVICE))
    with provider.context():
        out = decode.call_for_mode(config, provider, inputs)()
    expected = reference.attention(inputs.q.double(), inputs.k_cache.double(), inputs.v_cache.double())
    assert out.shape == (2, 4, 1, 16)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


def test_sdpa_repeats_the_heads_where_torch_has_no_enable_gqa(monkeypatch):
    monkeypatch.setattr(providers, "sdpa_takes_enable_gqa", lambda: False)
    config = decode.DecodeConfig("float32", 1, 4, 1, 16, 24, 16)
    inputs = decode.make_inputs(config, torch.device(DEVICE))
    provider = providers.DECODE_PROVIDERS["sdpa_math"]
    with provider.context():
        out = decode.call_for_mode(config, provider, inputs)()
    expected = reference.attention(inputs.q.double(), inputs.k_cache.double(), inputs.v_cache.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


def test_the_copy_is_measured_whatever_the_providers_named():
    chosen = decode.with_copy([providers.DECODE_PROVIDERS["sdpa_math"]])
    assert [provider.name for provider in chosen] == ["sdpa_math", "copy"]
    assert [provider.name for provider in decode.with_copy(chosen)] == ["sdpa_math", "copy"]


# ------------------------------------------------------------------------------------------- command


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "--decode", "--seqlens", "64"], "--seqlens does not apply to --decode (one query per sequence"),
        (["bench", "--decode", "--batch", "2"], "--batch does not apply to --decode"),
        (["bench", "--decode", "--causal", "true"], "--causal does not apply to --decode"),
        (["bench", "--decode", "--modes", "fwd"], "--modes does not apply to --decode"),
        (["bench", "--decode", "--varlen-tokens", "64"], "--varlen-tokens does not apply to --decode"),
        (["bench", "--decode", "--varlen"], "--decode and --varlen: give one of them"),
        (["bench", "--decode", "--op", "softmax"], "--decode times attention; it was given --op softmax"),
        (["bench", "--decode-lengths", "64"], "--decode-lengths applies to --decode only; it was given [64]"),
        (["bench", "--varlen", "--decode-batches", "2"], "--decode-batches applies to --decode only"),
        (["bench", "--decode", "--host-overhead"], "--decode does not apply to --host-overhead"),
        (["bench", "--host-overhead", "--decode-page-size", "8"],
         "--decode-page-size does not apply to --host-overhead"),
        (["bench", "--decode", "--heads", "4", "--gqa", "3"], "--gqa 3 must divide the number of query heads, 4"),
        (["bench", "--decode", "--providers", "flash_softmax_padded"], "--providers: unknown 'flash_softmax_padded'"),
    ],
)
def test_flags_that_contradict_decode_exit_2_naming_the_flag(argv, message, capsys, tmp_path):
    assert cli.main([*argv, "--out", str(tmp_path), "--no-plots"]) == 2
    assert message in capsys.readouterr().err


def test_the_parser_reads_the_decode_flags_and_rejects_bad_values(capsys):
    args = parse("--decode-batches", "1", "8", "--decode-lengths", "1024", "4096", "--decode-page-size", "64")
    assert args.decode and (args.decode_batches, args.decode_lengths, args.decode_page_size) == ([1, 8],
                                                                                                  [1024, 4096], 64)
    plain = cli.build_parser().parse_args(["bench"])
    assert not plain.decode and plain.decode_batches is plain.decode_lengths is plain.decode_page_size is None
    with pytest.raises(SystemExit):
        parse("--decode-lengths", "0")
    assert "--decode-lengths: expected a positive integer, got '0'" in capsys.readouterr().err


def test_bench_decode_writes_a_row_per_provider_and_configuration_with_the_copy(monkeypatch, tmp_path, capsys):
    if not ON_GPU:  # three timed calls per row: the interpreter takes tens of milliseconds a call
        monkeypatch.setattr(sweep, "measure_time",
                            lambda call, device: time_cpu(call, min_repetitions=3, min_seconds=0))
    out = tmp_path / "decode"
    argv = ["bench", "--decode", "--decode-batches", "1", "2", "--decode-lengths", "24", "--decode-page-size", "16",
            "--heads", "2", "--gqa", "2", "--head-dims", "16", "--dtypes", "float16", "--providers", "flash_softmax",
            "flash_softmax_paged", "sdpa_math", "--threads", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "bench attention_decode: 2 configurations x 4 providers (8 measurements)" in printed

    columns, rows = read_csv(out / "attention_decode.csv")
    assert columns == DECODE_COLUMNS
    assert [(row["provider"], row["batch"]) for row in rows] == [
        (name, batch) for batch in ("1", "2") for name in ("flash_softmax", "flash_softmax_paged", "sdpa_math", "copy")]
    for row in rows:
        assert row["status"] == "ok", row
        assert (row["dtype"], row["heads"], row["heads_kv"], row["head_dim"], row["cache_len"], row["threads"]) == (
            "float16", "2", "1", "16", "24", "1")
        assert row["page_size"] == ("16" if row["provider"] == "flash_softmax_paged" else "")
        kv_bytes = int(row["batch"]) * 24 * 1 * (16 + 16) * 2
        seconds = float(row["ms_median"]) * 1e-3
        assert int(row["kv_bytes"]) == kv_bytes
        assert float(row["kv_gbps"]) == pytest.approx(kv_bytes / seconds / 1e9, rel=1e-9)
        copy = next(other for other in rows if other["provider"] == "copy" and other["batch"] == row["batch"])
        assert float(row["copy_gbps"]) == pytest.approx(2 * kv_bytes / (float(copy["ms_median"]) * 1e-3) / 1e9)
        assert float(row["kv_vs_copy"]) == pytest.approx(float(row["kv_gbps"]) / float(row["copy_gbps"]))
    assert sorted(path.name for path in out.glob("*.png")) == ["attention_decode_kv_gbps_float16.png",
                                                               "attention_decode_time_float16.png"]
    env = json.loads((out / "env.json").read_text())
    assert env["command"].startswith("flash-softmax bench --decode --decode-batches 1 2") and env["threads"] == 1
