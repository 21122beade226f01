"""``flash-softmax bench --host-overhead``: the Python time per attention call with no-op launches.

On a CPU the measured path is the compiled-GPU one, taken by CPU tensors, with every Triton launch
replaced by a no-op; everything it patches must be back in place afterwards, so that a real call
computes the right result again.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import re
from pathlib import Path

import pytest
import torch
import triton.runtime.autotuner
import triton.runtime.interpreter
import triton.runtime.jit

import flash_softmax as fs
from flash_softmax import cli
from flash_softmax.attention import configs, function
from flash_softmax.bench import host_overhead
from flash_softmax.testing import assert_close

from conftest import DEVICE
from test_attention import make_inputs

SMALL = ["--seqlens", "64", "--head-dims", "32", "--batch", "1", "--heads", "2", "--causal", "true"]


def patched_state():
    """Everything ``noop_launches`` and ``gpu_path`` replace while they are active. (On CUDA the real
    launchers may fill the SM-count cache themselves, so it is compared on CPUs only.)"""
    return (
        triton.runtime.jit.JITFunction.run, triton.runtime.interpreter.InterpretedFunction.run,
        triton.runtime.autotuner.Autotuner.run, function.backend_for,
        *(importlib.import_module(name).INTERPRETED for name in host_overhead._INTERPRETER_SWITCHES),
        dict(configs._sm_counts) if DEVICE == "cpu" else None,
    )


def check_a_real_call():
    q, k, v = make_inputs(1, 2, 1, 21, 33, 16, torch.float32)
    out = fs.flash_attention(q, k, v, causal=True)
    assert_close("out", out, fs.reference.attention(q.detach(), k.detach(), v.detach(), causal=True, upcast=True),
                 None)


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == host_overhead.CSV_COLUMNS
        return list(reader)


def test_host_overhead_prints_both_figures_and_writes_the_csv(tmp_path, capsys):
    before = patched_state()
    threads = torch.get_num_threads()
    assert cli.main(["bench", "--host-overhead", "--calls", "30", "--threads", "1", *SMALL,
                     "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads  # pinned for the run only
    printed = capsys.readouterr().out
    assert "1 torch threads" in printed
    assert "no-op" in printed
    assert ("compiled-GPU (CUDA) path taken by CPU tensors" if DEVICE == "cpu" else "compiled-GPU path on") in printed
    table = [line for line in printed.splitlines() if "bfloat16" in line]
    assert [line.split()[1] for line in table] == ["fwd", "fwd_bwd", "fwd", "fwd_bwd"]  # without, with a bias

    rows = read_rows(tmp_path / "host_overhead.csv")
    assert [(row["mode"], row["bias"]) for row in rows] == [
        ("fwd", "false"), ("fwd_bwd", "false"), ("fwd", "true"), ("fwd_bwd", "true")]
    for row in rows:
        assert (row["dtype"], row["batch"], row["heads"], row["seqlen"], row["head_dim"], row["causal"]) == (
            "bfloat16", "1", "2", "64", "32", "true")
        assert row["calls"] == "30" and row["threads"] == "1" and "no-op" in row["path"]
        assert 0 < float(row["us_p20"]) <= float(row["us_median"]) <= float(row["us_p80"])
    # Each figure is printed as measured (to 0.1 µs in the table, 0.01 µs in the CSV).
    printed_medians = [float(re.search(r"([0-9.]+) \(([0-9.]+)-([0-9.]+)\)", line).group(1)) for line in table]
    for printed_median, row in zip(printed_medians, rows):
        assert printed_median == pytest.approx(float(row["us_median"]), abs=0.06)
    fwd, fwd_bwd = (int(row["launches"]) for row in rows[:2])
    assert fwd == 1 and fwd_bwd >= fwd + 3  # backward: delta, dK/dV (one or two passes), dQ

    assert patched_state() == before
    check_a_real_call()


def test_launches_are_no_ops_only_inside_and_restored_after_an_error():
    before = patched_state()
    q, k, v = make_inputs(1, 2, 2, 40, 40, 16, torch.float32)
    with pytest.raises(RuntimeError, match="inside"):
        with host_overhead.noop_launches() as counter, host_overhead.gpu_path():
            out = fs.flash_attention(q, k, v)
            assert counter.count == 1 and counter.kernels == {"_attn_fwd_kernel": 1}
            assert function.backend_for(torch.device("cpu")) == "triton"
            raise RuntimeError("an error inside the measurement")
    assert out.shape == (1, 2, 40, 16)
    assert patched_state() == before
    check_a_real_call()


# The PyTorch path forced below warns that it is a fallback, which is what this test provokes on purpose.
@pytest.mark.filterwarnings("ignore::flash_softmax.FallbackWarning")
def test_a_path_that_launches_nothing_is_not_measured(monkeypatch):
    """Should the dispatch send the call elsewhere (the plain PyTorch path), the figure would not be the GPU
    path's: the measurement refuses rather than report it."""
    monkeypatch.setattr(host_overhead, "gpu_path", contextlib.nullcontext)
    monkeypatch.setattr(function, "backend_for", lambda device: "torch")
    case = host_overhead.HostCase("fwd", "float32", 1, 2, 32, 16, False, False)
    with pytest.raises(RuntimeError, match="made no kernel launch"):
        host_overhead.measure(case, torch.device("cpu"), calls=3)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "--host-overhead", "--op", "softmax"], "--host-overhead times attention calls only"),
        (["bench", "--host-overhead", "--providers", "naive"], "--providers does not apply to --host-overhead"),
        (["bench", "--host-overhead", "--modes", "bwd"], "--modes for --host-overhead must be some of fwd, fwd_bwd"),
        (["bench", "--calls", "10", "--seqlens", "16"], "--calls applies to --host-overhead only"),
    ],
)
def test_flags_that_do_not_apply_are_errors(argv, message, tmp_path, capsys):
    assert cli.main([*argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "host_overhead.csv").exists()


def test_the_bias_is_checked_once_per_call(monkeypatch):
    """flash_attention validates the bias; the ops (forward and backward) only expand it, and nothing on
    the way calls torch.broadcast_shapes (tens of microseconds per call)."""
    calls = []
    check = function.check_attn_bias

    def counting_check(*args):
        calls.append(args)
        return check(*args)

    def no_broadcast_shapes(*shapes):
        raise AssertionError(f"torch.broadcast_shapes{shapes} was called on the attention path")

    monkeypatch.setattr(function, "check_attn_bias", counting_check)
    monkeypatch.setattr(torch, "broadcast_shapes", no_broadcast_shapes)
    q, k, v = make_inputs(2, 2, 1, 19, 27, 16, torch.float32)
    mask = torch.rand(2, 1, 1, 27, generator=torch.Generator().manual_seed(1)).to(DEVICE) < 0.8
    mask[:, :, :, 0] = True
    out = fs.flash_attention(q, k, v, attn_bias=mask)
    out.backward(torch.ones_like(out))
    assert len(calls) == 1
    monkeypatch.undo()
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    expected = fs.reference.attention(*leaves, attn_bias=mask, upcast=True)
    expected.backward(torch.ones_like(expected))
    assert_close("out", out, expected, None)
    for name, tensor, leaf in zip(("dq", "dk", "dv"), (q, k, v), leaves):
        assert_close(name, tensor.grad, leaf.grad, None)
