"""``flash-softmax verify``'s packed cases (``--ops varlen``): what the grids cover, that the harness passes a
correct kernel and fails wrong ones, and the real ``flash_attention_varlen`` on the quick grid.

The harness tests put ``reference.attention_varlen`` (or a deliberately wrong variant of it) in
``verify.KERNELS``, so they run in well under a second a case; only the last tests run the Triton kernel,
in the interpreter on a CPU.
"""

from __future__ import annotations

import pytest
import torch

import flash_softmax
from flash_softmax import cli, reference, verify

from conftest import DEVICE



def reference_kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, **options):
    """The float32 reference with the kernel's signature; verify passes the longest lengths, which it checks."""
    for longest, offsets in ((max_seqlen_q, cu_seqlens_q), (max_seqlen_k, cu_seqlens_k)):
        assert longest == max((offsets[1:] - offsets[:-1]).tolist(), default=0)
    return reference.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, **options)


def ignoring_sequence_boundaries(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                                 **options):
    """The typical packing bug: every query sees every key of the whole batch, as one long sequence."""
    whole_q = torch.tensor([0, q.shape[0]], dtype=torch.int32, device=q.device)
    whole_k = torch.tensor([0, k.shape[0]], dtype=torch.int32, device=k.device)
    return reference.attention_varlen(q, k, v, whole_q, whole_k, **options)


def dropout_of_sequence_0(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *,
                          dropout_p=0.0, return_lse=False, **options):
    """Dropout keyed by batch index 0 for every sequence (the sequence index left out of the Philox counter)."""
    from flash_softmax._random import dropout_rng_state

    rng_state = dropout_rng_state(q.device)
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outputs, lses = [], []
    for index in range(len(starts_q) - 1):
        q_n, k_n, v_n = (tensor[start:end].transpose(0, 1).unsqueeze(0) for tensor, start, end in (
            (q, starts_q[index], starts_q[index + 1]), (k, starts_k[index], starts_k[index + 1]),
            (v, starts_k[index], starts_k[index + 1])))
        mask = reference.dropout_keep_mask(rng_state, dropout_p, len(starts_q) - 1, q.shape[1], q_n.shape[2],
                                           k_n.shape[2], batch_index=0)
        alibi_slopes = options.pop("alibi_slopes", None)
        if alibi_slopes is not None and alibi_slopes.dim() == 2:
            raise NotImplementedError("this wrong kernel takes (Hq,) slopes only")
        out, lse = reference.attention(q_n, k_n, v_n, dropout_p=dropout_p, dropout_mask=mask, return_lse=True,
                                       alibi_slopes=alibi_slopes, **options)
        options["alibi_slopes"] = alibi_slopes
        outputs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outputs), torch.cat(lses, dim=1)


def only_varlen_cases(monkeypatch, cases: list) -> None:
    """Make the quick grid's packed cases exactly ``cases``."""
    monkeypatch.setattr(verify, "QUICK_VARLEN", cases)


def case_with(**fields) -> verify.VarlenCase:
    """The first quick packed case with these field values."""
    return next(case for case in verify.QUICK_VARLEN
                if all(getattr(case, name) == value for name, value in fields.items()))


# ------------------------------------------------------------------------------------------- grids


def test_the_quick_grid_packs_every_boundary_and_option_in_a_few_hundred_tokens():
    cases = verify.QUICK_VARLEN
    assert all(sum(case.seqlens_q) <= 400 and sum(case.seqlens_k) <= 400 for case in cases)  # the interpreter
    assert all(len(case.seqlens_q) >= 3 for case in cases)
    lengths = [(q, k) for case in cases for q, k in zip(case.seqlens_q, case.seqlens_k)]
    assert (0, 0) in lengths and (1, 1) in lengths
    assert any(q > k > 0 for q, k in lengths) and any(0 < q < k for q, k in lengths)
    assert any(q > 0 and k == 0 for q, k in lengths) and any(q == 0 and k > 0 for q, k in lengths)
    assert any(case.causal and any(q > k for q, k in zip(case.seqlens_q, case.seqlens_k)) for case in cases)
    assert any(case.seqlens_q[0] == 0 for case in cases) and any(case.seqlens_q[-1] == 0 for case in cases)
    assert {case.dtype for case in cases} == set(verify.ALL_DTYPES) and {case.causal for case in cases} == {False, True}
    assert {case.alibi for case in cases} == {None, "heads", "sequences"}
    assert any(case.heads_kv for case in cases) and any(case.head_dim_v for case in cases)
    assert any(case.sinks and case.lse_loss for case in cases)
    for feature in ("window_size", "softcap", "sinks", "alibi_slopes", "dropout_p"):
        assert any(f"varlen {feature}" in case.requires() for case in cases), feature


def test_the_full_grid_packs_thousands_of_tokens_of_lengths_1_to_2048():
    cases = verify.full_varlen_grid()
    assert {case.dtype for case in cases} == set(verify.ALL_DTYPES)
    lengths = {length for case in cases for length in case.seqlens_q + case.seqlens_k}
    assert {0, 1, 2048} <= lengths and max(lengths) == 2048
    assert all(sum(case.seqlens_q) >= 5000 for case in cases)
    assert any(case.seqlens_q != case.seqlens_k for case in cases)
    for fields in verify.FULL_VARLEN_MODIFIERS:
        matching = [case for case in cases if all(getattr(case, name) == value for name, value in fields.items())]
        assert {(case.dtype, case.causal) for case in matching} == {
            (dtype, causal) for dtype in verify.ALL_DTYPES for causal in (False, True)}, fields
    assert len({case.label for case in cases}) == len(cases)


def test_the_grids_select_packed_cases_under_ops_varlen_and_the_filters():
    parse = cli.build_parser().parse_args
    quick, _ = verify.select_cases(parse(["verify", "--quick"]), on_gpu=False)
    assert [case for case in quick if isinstance(case, verify.VarlenCase)] == verify.QUICK_VARLEN
    only, _ = verify.select_cases(parse(["verify", "--quick", "--ops", "varlen", "--dtypes", "float16"]), on_gpu=False)
    assert only == [case for case in verify.QUICK_VARLEN if case.dtype == "float16"]
    full, _ = verify.select_cases(parse(["verify", "--full", "--ops", "varlen", "--causal", "true",
                                         "--head-dims", "128"]), on_gpu=True)
    assert full and all(case.causal and case.head_dim == 128 for case in full)
    assert len(full) == len([case for case in verify.full_varlen_grid() if case.causal and case.head_dim == 128])
    sweep, _ = verify.select_cases(parse(["verify", "--seqlens", "64"]), on_gpu=False)
    assert not any(isinstance(case, verify.VarlenCase) for case in sweep)  # the sweep's shapes are not packed


def test_labels_say_varlen_and_the_lengths():
    case = verify.VarlenCase((3, 0, 5), (4, 0, 5), 64, True, "float16", heads=4, heads_kv=2, head_dim_v=40,
                             alibi="sequences", dropout_p=0.1, sinks=True)
    assert case.label == ("attention_varlen float16 N3 H4/2 Tq8 Tk9 D64/40 q=(3,0,5) k=(4,0,5) causal sinks "
                          "alibi (N,Hq) dropout=0.1")
    assert verify.VarlenCase((3, 7), (3, 7), 16, False, "float32").label == \
        "attention_varlen float32 N2 H2 Tq10 Tk10 D16 q=k=(3,7)"
    assert len({case.label for case in verify.QUICK_VARLEN}) == len(verify.QUICK_VARLEN)


def test_packed_cases_reject_contradictory_fields():
    with pytest.raises(ValueError, match="seqlens_q and seqlens_k: expected one length each per sequence, got 2 and 3"):
        verify.VarlenCase((1, 2), (1, 2, 3), 16, False, "float16")
    with pytest.raises(ValueError, match=r"expected lengths >= 0, got \(1, -2\) and \(1, 2\)"):
        verify.VarlenCase((1, -2), (1, 2), 16, False, "float16")
    with pytest.raises(ValueError, match="alibi: expected None, 'heads' or 'sequences', got 'batch'"):
        verify.VarlenCase((1,), (1,), 16, False, "float16", alibi="batch")
    with pytest.raises(ValueError, match=r"dropout_p: expected a probability in \[0, 1\), got 1.5"):
        verify.VarlenCase((1,), (1,), 16, False, "float16", dropout_p=1.5)


# ----------------------------------------------------------------------------------------- harness


def test_the_harness_passes_the_reference_on_every_quick_case(monkeypatch, capsys):
    """The reference as the kernel: every case passes and the table names dsinks where a case has sinks."""
    monkeypatch.setitem(verify.KERNELS, "attention_varlen", reference_kernel)
    assert cli.main(["verify", "--quick", "--ops", "varlen"]) == 0
    output = capsys.readouterr().out
    count = len(verify.QUICK_VARLEN)
    assert f"{count}/{count} cases passed" in output and "not run" not in output
    lines = output.splitlines()
    for case in verify.QUICK_VARLEN:
        row = next(line for line in lines if case.label in line)
        assert {"out", "lse", "dq", "dk", "dv"} <= set(row.replace("│", " ").split()), row
        assert ("dsinks" in row) == case.sinks, row


@pytest.mark.parametrize(
    "wrong,fields,expected",
    [
        (ignoring_sequence_boundaries, dict(dtype="float16", causal=True, sinks=False), "out: FAIL"),
        (ignoring_sequence_boundaries, dict(dtype="float32", sinks=True), "out: FAIL"),
        (dropout_of_sequence_0, dict(dropout_p=0.17), "out: FAIL"),
    ],
    ids=["boundaries-float16-causal", "boundaries-float32-sinks", "dropout-sequence-index"],
)
def test_verify_exits_1_when_a_varlen_kernel_is_wrong(monkeypatch, capsys, wrong, fields, expected):
    case = case_with(**fields)
    only_varlen_cases(monkeypatch, [case])
    monkeypatch.setitem(verify.KERNELS, "attention_varlen", wrong)
    assert cli.main(["verify", "--quick", "--ops", "varlen"]) == 1
    output = capsys.readouterr().out
    assert f"{case.label}: {expected}" in output and "FAILED" in output


def test_without_the_function_the_packed_cases_are_left_out_and_said_so(monkeypatch, capsys):
    monkeypatch.delattr(flash_softmax, "flash_attention_varlen", raising=False)
    assert verify.varlen_features() == set()
    assert cli.main(["verify", "--quick", "--ops", "varlen", "softmax", "--dtypes", "float32"]) == 0
    output = capsys.readouterr().out
    assert "not run, the kernel does not offer: varlen" in output and "attention_varlen" not in output


def test_features_follow_the_kernels_signature(monkeypatch):
    def plain(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *, causal=False,
              return_lse=False):
        raise AssertionError("never called")

    monkeypatch.setitem(verify.KERNELS, "attention_varlen", plain)
    assert verify.varlen_features() == {"varlen"}
    monkeypatch.setitem(verify.KERNELS, "attention_varlen", reference_kernel)
    assert verify.varlen_features() == {"varlen", *(f"varlen {name}" for name in (
        "window_size", "softcap", "sinks", "alibi_slopes", "dropout_p"))}


# ------------------------------------------------------------------------------------- real kernel


# The interpreter runs three of the quick cases here (the others' features are covered by tests/test_varlen.py
# on the CPU); all six run where CUDA is present, and `flash-softmax verify` runs them all anywhere.
QUICK_ON_CPU = (0, 2, 3)


@pytest.mark.parametrize("case", [
    pytest.param(case, marks=() if index in QUICK_ON_CPU else pytest.mark.gpu)
    for index, case in enumerate(verify.QUICK_VARLEN)], ids=lambda case: case.label)
def test_the_real_kernel_passes_the_quick_packed_cases(case):
    result = verify.run_case(case, torch.device(DEVICE), seed=0)
    assert result.passed, (case.label, result.error, [str(c) for c in result.comparisons])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", verify.ALL_DTYPES)
def test_the_real_kernel_passes_a_large_packed_batch(dtype):
    seqlens_q, seqlens_k = verify.FULL_VARLEN_BATCHES[1]
    for case in (verify.VarlenCase(seqlens_q, seqlens_k, 128, True, dtype, sinks=True, alibi="sequences"),
                 verify.VarlenCase(seqlens_q, seqlens_k, 64, False, dtype, heads=4, heads_kv=2, dropout_p=0.1)):
        result = verify.run_case(case, torch.device(DEVICE), seed=0)
        assert result.passed, (case.label, result.error, [str(c) for c in result.comparisons])
