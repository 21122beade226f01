"""``flash-softmax bench --varlen``: the drawn lengths, the FLOP and token accounting over the real work, the
padded and packed providers' results against ``reference.attention_varlen``, the flags, and a tiny run of
the command on the CPU (Triton's interpreter) with its CSV.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from flash_softmax import bench, cli, reference
from flash_softmax.bench import providers, sweep
from flash_softmax.bench import varlen as bench_varlen
from flash_softmax.bench.timing import time_cpu

from conftest import DEVICE

ON_GPU = torch.cuda.is_available()
VARLEN_COLUMNS = ["provider", "mode", "causal", "dtype", "sequences", "tokens", "max_seqlen", "padded_tokens", "heads",
                  "head_dim", "seed", "lengths", "ms_median", "ms_p20", "ms_p80", "tokens_per_s", "tflops",
                  "peak_mem_mib", *(["fs_speedup"] if ON_GPU else []), "threads", "status"]


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames), list(reader)


# --------------------------------------------------------------------------------------------- lengths


def test_lengths_are_drawn_uniformly_in_range_with_a_fixed_seed_until_the_tokens_are_reached():
    lengths = bench_varlen.draw_lengths(0, 128, 8192, tokens=32768)
    assert lengths == bench_varlen.draw_lengths(0, 128, 8192, tokens=32768)  # the seed fixes them
    assert lengths != bench_varlen.draw_lengths(1, 128, 8192, tokens=32768)
    assert all(128 <= length <= 8192 for length in lengths)
    assert sum(lengths) >= 32768 > sum(lengths[:-1])  # drawn until the total is reached, not one more
    assert len(set(lengths)) > 1
    many = bench_varlen.draw_lengths(3, 5, 9, sequences=2000)
    assert len(many) == 2000 and set(many) == set(range(5, 10))  # every length of the range, and nothing else
    assert bench_varlen.draw_lengths(0, 7, 7, tokens=1) == (7,)  # at least one sequence


def test_lengths_refuse_a_contradictory_request():
    with pytest.raises(ValueError, match="--varlen-lengths MIN MAX: expected 1 <= MIN <= MAX, got 9 3"):
        bench_varlen.draw_lengths(0, 9, 3, tokens=10)
    with pytest.raises(ValueError, match="expected one of tokens and sequences, got tokens=10, sequences=2"):
        bench_varlen.draw_lengths(0, 1, 3, tokens=10, sequences=2)


def test_default_sizes_of_a_gpu_run():
    args = cli.build_parser().parse_args(["bench", "--varlen"])
    configs = bench_varlen.configurations(bench_varlen.resolve_sweep(args, on_gpu=True))
    lengths = configs[0].lengths
    assert all(config.lengths == lengths and config.seed == 0 for config in configs)
    assert 32768 <= sum(lengths) < 32768 + 8192 and all(128 <= length <= 8192 for length in lengths)
    assert {(config.dtype, config.head_dim, config.heads) for config in configs} == {("bfloat16", 128, 16)}
    assert {(config.mode, config.causal) for config in configs} == {
        (mode, causal) for mode in ("fwd", "bwd", "fwd_bwd") for causal in (False, True)}
    args = cli.build_parser().parse_args(["bench", "--varlen", "--varlen-sequences", "5", "--varlen-lengths", "10",
                                          "20", "--varlen-seed", "4", "--gqa", "2"])
    (config, *_) = bench_varlen.configurations(bench_varlen.resolve_sweep(args, on_gpu=False))
    assert config.lengths == bench_varlen.draw_lengths(4, 10, 20, sequences=5)
    assert (config.heads, config.kv_heads) == (2, 1)  # the CPU default of 2 heads, grouped by 2


# ----------------------------------------------------------------------------------------- accounting


@pytest.mark.parametrize("causal,pairs", [(False, 3 * 3 + 5 * 5 + 1), (True, 6 + 15 + 1)])
def test_flops_count_the_real_pairs_of_each_sequence_not_the_padding(causal, pairs):
    """Lengths 3, 5, 1: by hand 35 pairs (causal 22), where the padded batch computes 3 * 5 * 5 = 75."""
    lengths = (3, 5, 1)
    forward = bench_varlen.VarlenConfig("fwd", causal, "float16", 4, 16, lengths, 0)
    assert forward.kept_pairs() == pairs
    # The same count from a dense block-diagonal mask of the packed tokens.
    document = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    keep = document[:, None] == document[None, :]
    if causal:
        keep &= torch.ones(9, 9, dtype=torch.bool).tril()
    assert int(keep.sum()) == pairs
    assert forward.flops() == 4 * 4 * pairs * 16  # 4 * H * pairs * D, the convention of the dense rows
    for mode, factor in (("bwd", 2.5), ("fwd_bwd", 3.5)):
        config = bench_varlen.VarlenConfig(mode, causal, "float16", 4, 16, lengths, 0)
        assert config.flops() == factor * forward.flops()
    # A one-sequence batch counts what the dense benchmark counts for that shape.
    from flash_softmax.bench.attention import AttentionConfig

    single = bench_varlen.VarlenConfig("fwd", causal, "float16", 4, 16, (37,), 0)
    assert single.flops() == AttentionConfig("fwd", causal, "float16", 1, 4, 37, 37, 16).flops()


def test_a_row_reports_tokens_and_tflops_of_the_real_work():
    config = bench_varlen.VarlenConfig("fwd_bwd", True, "bfloat16", 2, 8, (3, 5, 1), 7)
    result = sweep.Result("flash_softmax", config, sweep.Measurement("ok", sweep.Timing(2.0, 1.5, 2.5)))
    row = bench_varlen.record(result, threads=3)
    assert set(row) | {"fs_speedup"} == set(bench.csv_columns(bench_varlen.CSV_COLUMNS, on_gpu=True))
    assert (row["sequences"], row["tokens"], row["max_seqlen"], row["padded_tokens"]) == (3, 9, 5, 15)
    assert (row["seed"], row["lengths"], row["threads"], row["status"]) == (7, "3 5 1", 3, "ok")
    assert row["tokens_per_s"] == pytest.approx(9 / 2e-3)
    assert row["tflops"] == pytest.approx(3.5 * 4 * 2 * 22 * 8 / 2e-3 / 1e12)
    failed = bench_varlen.record(sweep.Result("flex", config, sweep.Measurement("oom")), threads=3)
    assert failed["tokens_per_s"] is None and failed["tflops"] is None and failed["ms_median"] is None


def test_the_table_and_the_speed_up_of_a_varlen_run():
    config = bench_varlen.VarlenConfig("fwd", False, "bfloat16", 2, 8, (3, 5, 1), 0)
    results = [sweep.Result(name, config, sweep.Measurement("ok", sweep.Timing(ms, ms, ms)))
               for name, ms in (("flash_softmax", 2.0), ("flash_softmax_padded", 5.0))]
    assert sweep.speedups(results) == {1: 2.5}  # the padded batch against the packed one, same configuration
    records = [bench_varlen.record(result, threads=1) for result in results]
    columns, rows = bench.table_rows("attention_varlen", records, ["", ""], on_gpu=False)
    assert columns == ["provider", "mode", "causal", "dtype", "N", "tokens", "max S", "H", "D", "ms (p20-p80)",
                       "tokens/s", "TFLOP/s", "peak MiB", "status"]
    cells = dict(zip(columns, rows[1]))
    assert (cells["N"], cells["tokens"], cells["max S"], cells["tokens/s"]) == ("3", "9", "5", "1800")
    records[1]["fs_speedup"] = 2.5
    columns, rows = bench.table_rows("attention_varlen", records, ["", ""], on_gpu=True)
    assert columns[-2:] == [bench.SPEEDUP_COLUMN, "status"] and rows[1][-2:] == ["2.5x", "ok"]


# ------------------------------------------------------------------------------------------ providers


def unpadded(tensor: torch.Tensor, packing: bench_varlen.Packing) -> torch.Tensor:
    """``(N, H, S, D)`` padded rows back to the packed ``(T, H, D)`` tokens."""
    lengths = (packing.cu_seqlens[1:] - packing.cu_seqlens[:-1]).long()
    position = torch.arange(int(lengths.sum()), device=tensor.device) - torch.repeat_interleave(
        packing.cu_seqlens[:-1].long(), lengths)
    return tensor.transpose(1, 2)[packing.document.long(), position]


CPU_PROVIDERS = [name for name, provider in providers.VARLEN_PROVIDERS.items() if provider.on_cpu]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", [*CPU_PROVIDERS, *(pytest.param(name, marks=pytest.mark.gpu) for name in
                                                    providers.VARLEN_PROVIDERS if name not in CPU_PROVIDERS)])
def test_every_provider_computes_the_packed_attention(name, causal):
    """On the real tokens, each provider's output and gradients are those of reference.attention_varlen: the
    padding mask and the document mask keep the sequences apart."""
    provider = providers.VARLEN_PROVIDERS[name]
    config = bench_varlen.VarlenConfig("bwd", causal, "float32", 4, 16, (5, 1, 12, 7), 0, group_size=2)
    inputs = bench_varlen.make_inputs(config, torch.device(DEVICE))
    packing = inputs["packing"]
    assert packing.cu_seqlens.tolist() == [0, 5, 6, 18, 25] and packing.max_seqlen == 12
    assert packing.key_padding.shape == (4, 1, 1, 12) and int(packing.key_padding.sum()) == 25
    with provider.context():
        q, k, v, dout = inputs["padded" if provider.padded else "packed"]
        q, k, v = (tensor.detach().requires_grad_() for tensor in (q, k, v))
        out = provider.build(config, q, k, v, packing)()
        grads = torch.autograd.grad(out, (q, k, v), dout)
    if provider.padded:
        out, *grads = (unpadded(tensor, packing) for tensor in (out, *grads))

    packed = [tensor.detach().double().requires_grad_() for tensor in inputs["packed"][:3]]
    expected = reference.attention_varlen(*packed, packing.cu_seqlens, packing.cu_seqlens, causal=causal)
    expected_grads = torch.autograd.grad(expected, packed, inputs["packed"][3].double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    for got, want, label in zip(grads, expected_grads, ("dq", "dk", "dv")):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, msg=label)


# ------------------------------------------------------------------------------------------- command


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "--varlen", "--seqlens", "64"], "--seqlens does not apply to --varlen (its lengths are drawn"),
        (["bench", "--varlen", "--modifiers", "sinks"], "--modifiers does not apply to --varlen"),
        (["bench", "--varlen", "--op", "softmax"], "--varlen times attention; it was given --op softmax"),
        (["bench", "--varlen-tokens", "64"], "--varlen-tokens applies to --varlen only; it was given 64"),
        (["bench", "--varlen-lengths", "3", "9"], "--varlen-lengths applies to --varlen only; it was given [3, 9]"),
        (["bench", "--varlen", "--varlen-tokens", "64", "--varlen-sequences", "2"],
         "--varlen-tokens and --varlen-sequences: give one of them, got 64 and 2"),
        (["bench", "--varlen", "--varlen-lengths", "9", "3"], "--varlen-lengths MIN MAX: expected 1 <= MIN <= MAX"),
        (["bench", "--varlen", "--host-overhead"], "--varlen does not apply to --host-overhead"),
        (["bench", "--varlen", "--providers", "sdpa_flash"], "--providers: unknown 'sdpa_flash'"),
    ],
)
def test_flags_that_contradict_varlen_exit_2_naming_the_flag(argv, message, capsys, tmp_path):
    assert cli.main([*argv, "--out", str(tmp_path), "--no-plots"]) == 2
    assert message in capsys.readouterr().err


def test_bench_varlen_writes_its_rows_with_the_lengths_and_the_real_throughput(monkeypatch, tmp_path, capsys):
    if not ON_GPU:  # three timed calls per row: the interpreter takes tenths of a second a call
        monkeypatch.setattr(sweep, "measure_time",
                            lambda call, device: time_cpu(call, min_repetitions=3, min_seconds=0))
    out = tmp_path / "varlen"
    argv = ["bench", "--varlen", "--varlen-sequences", "3", "--varlen-lengths", "4", "12", "--varlen-seed", "5",
            "--causal", "true", "--modes", "fwd", "--providers", "flash_softmax", "flash_softmax_padded", "sdpa_math",
            "--threads", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    lengths = bench_varlen.draw_lengths(5, 4, 12, sequences=3)
    batch = f"packed batch: 3 sequences, {sum(lengths)} tokens, lengths (seed 5): {' '.join(map(str, lengths))}"
    assert batch in printed
    assert "no plots for --varlen" in printed and not list(out.glob("*.png"))

    columns, rows = read_csv(out / "attention_varlen.csv")
    assert columns == VARLEN_COLUMNS
    assert [row["provider"] for row in rows] == ["flash_softmax", "flash_softmax_padded", "sdpa_math"]
    pairs = sum(length * (length + 1) // 2 for length in lengths)
    for row in rows:
        assert row["status"] == "ok", row
        assert (row["mode"], row["causal"], row["dtype"], row["threads"]) == ("fwd", "true", "float16", "1")
        assert row["lengths"] == " ".join(map(str, lengths)) and row["seed"] == "5"
        assert (int(row["sequences"]), int(row["tokens"]), int(row["max_seqlen"])) == (3, sum(lengths), max(lengths))
        assert int(row["padded_tokens"]) == 3 * max(lengths)
        seconds = float(row["ms_median"]) * 1e-3
        assert float(row["tokens_per_s"]) == pytest.approx(sum(lengths) / seconds, rel=1e-9)
        # 4 * H * D * the real pairs, whatever the provider computes (CPU defaults: H = 2, D = 16)
        assert float(row["tflops"]) == pytest.approx(4 * 2 * 16 * pairs / seconds / 1e12, rel=1e-9)
    env = json.loads((out / "env.json").read_text())
    assert env["command"].startswith("flash-softmax bench --varlen --varlen-sequences 3") and env["threads"] == 1
