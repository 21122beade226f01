"""``reference.attention_varlen``, the truth of the packed (varlen) kernel, against formulations of its own.

The reference loops over the sequences and calls ``reference.attention`` on each. The tests here build the
same result another way: one dense ``(Tq, Tk)`` attention over the whole packed batch, whose float bias is
``-inf`` outside the block diagonal and outside each sequence's bottom-right band and holds each sequence's
ALiBi term, computed element by element from the sequence ids and the positions within the sequences. With
dropout the dense mask is gathered from ``dropout_keep_mask`` of the whole batch (no ``batch_index``), and
a batch of equal lengths is compared with ``reference.attention`` on the same tokens laid out as ``(N, H, S,
D)``. Everything is float64 on the CPU and takes well under a second.
"""

from __future__ import annotations

import math

import pytest
import torch

from flash_softmax import reference
from flash_softmax._random import dropout_rng_state


def offsets(lengths: list[int]) -> torch.Tensor:
    """int32 ``(N + 1,)`` cumulative offsets of ``lengths``, starting at 0."""
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)


def sequence_of_rows(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """For each packed row: the index of its sequence and its position within that sequence."""
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.int64))
    starts = offsets(lengths).to(torch.int64)[:-1]
    return ids, torch.arange(len(ids)) - starts[ids]


def dense_bias(lengths_q: list[int], lengths_k: list[int], heads: int, *, causal: bool = False,
               window_size: tuple[int, int] = (-1, -1), alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """float64 ``(1, Hq, Tq, Tk)``: 0 where query row ``r`` may see key row ``c``, ``-inf`` elsewhere, plus ALiBi.

    Row ``r`` (sequence ``n``, position ``i``) sees row ``c`` (sequence ``m``, position ``j``) iff ``n == m`` and
    ``j`` lies in the band of ``i``'s diagonal ``i + sk_n - sq_n`` (bottom-right aligned within the sequence).
    """
    sequence_q, position_q = sequence_of_rows(lengths_q)
    sequence_k, position_k = sequence_of_rows(lengths_k)
    difference = torch.tensor(lengths_k, dtype=torch.int64) - torch.tensor(lengths_q, dtype=torch.int64)
    diagonal = (position_q + difference[sequence_q])[:, None]  # (Tq, 1)
    position_k = position_k[None, :]
    keep = sequence_q[:, None] == sequence_k[None, :]
    left, right = window_size
    right = 0 if causal else right
    if left >= 0:
        keep &= position_k >= diagonal - left
    if right >= 0:
        keep &= position_k <= diagonal + right
    bias = torch.zeros(1, heads, len(sequence_q), len(sequence_k), dtype=torch.float64)
    if alibi_slopes is not None:
        # Row n of (N, Hq) slopes belongs to sequence n; (Hq,) slopes are shared. Only kept pairs matter.
        slopes = alibi_slopes.double()
        per_row = slopes[None, :].expand(len(sequence_q), heads) if slopes.dim() == 1 else slopes[sequence_q]
        distance = (diagonal - position_k).abs().double()  # (Tq, Tk)
        bias = bias - per_row.t()[None, :, :, None] * distance[None, None]
    return bias.masked_fill(~keep, float("-inf"))


def dense_dropout_mask(rng_state, dropout_p, lengths_q, lengths_k, heads) -> torch.Tensor:
    """Bool ``(1, Hq, Tq, Tk)``: element ``(h, r, c)`` of sequence ``n`` is element ``(n, h, i, j)`` of the
    whole batch's ``dropout_keep_mask`` (built at the longest lengths, without ``batch_index``)."""
    full = reference.dropout_keep_mask(rng_state, dropout_p, len(lengths_q), heads, max(lengths_q, default=0),
                                       max(lengths_k, default=0))
    sequence_q, position_q = sequence_of_rows(lengths_q)
    _, position_k = sequence_of_rows(lengths_k)
    # Pairs of different sequences are removed by the bias anyway; each row reads its own sequence's slice.
    mask = full[sequence_q[:, None], :, position_q[:, None], position_k[None, :].clamp(max=full.shape[-1] - 1)]
    return mask.permute(2, 0, 1).unsqueeze(0)  # (Tq, Tk, H) -> (1, H, Tq, Tk)


def packed_inputs(lengths_q, lengths_k, heads=4, heads_kv=2, head_dim=8, head_dim_v=6, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    return (normal(sum(lengths_q), heads, head_dim), normal(sum(lengths_k), heads_kv, head_dim),
            normal(sum(lengths_k), heads_kv, head_dim_v))


def as_batch_of_one(tensor: torch.Tensor) -> torch.Tensor:
    """``(T, H, D)`` packed rows seen as ``(1, H, T, D)``."""
    return tensor.transpose(0, 1).unsqueeze(0)


def run(function, leaves: dict[str, torch.Tensor], dout, dlse, **options):
    """out, lse and the gradient of every leaf of ``function(**leaves, **options)``, on fresh leaves."""
    fresh = {name: tensor.detach().clone().requires_grad_() for name, tensor in leaves.items()}
    out, lse = function(**fresh, **options)
    grads = torch.autograd.grad((out, lse), list(fresh.values()), (dout, dlse))
    return out.detach(), lse.detach(), dict(zip(fresh, grads))


def varlen(lengths_q, lengths_k, **options):
    def function(q, k, v, sinks=None):
        return reference.attention_varlen(q, k, v, offsets(lengths_q), offsets(lengths_k), sinks=sinks,
                                          return_lse=True, **options)

    return function


def dense(lengths_q, lengths_k, *, causal=False, window_size=(-1, -1), alibi_slopes=None, dropout_mask=None,
          **options):
    """The independent formulation: one attention over every packed row, the structure in a float bias."""

    def function(q, k, v, sinks=None):
        bias = dense_bias(lengths_q, lengths_k, q.shape[1], causal=causal, window_size=window_size,
                          alibi_slopes=alibi_slopes)
        out, lse = reference.attention(as_batch_of_one(q), as_batch_of_one(k), as_batch_of_one(v), attn_bias=bias,
                                       sinks=sinks, return_lse=True, dropout_mask=dropout_mask, **options)
        return out[0].transpose(0, 1), lse[0]

    return function


# Empty sequences first, in the middle and last; queries without keys and keys without queries; Sq < Sk and
# Sq > Sk (causal: the first rows see no key).
LENGTHS_Q = [0, 5, 1, 9, 0, 7, 3, 0]
LENGTHS_K = [4, 5, 6, 2, 0, 11, 0, 0]
N = len(LENGTHS_Q)

CASES = {
    "plain": {},
    "causal": dict(causal=True),
    "window": dict(window_size=(2, 1)),
    "causal-window": dict(causal=True, window_size=(3, -1)),
    "softcap-scale": dict(softcap=1.5, softmax_scale=0.7),
    "alibi-heads": dict(causal=True, alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)),
    "alibi-sequences": dict(window_size=(4, 4),
                            alibi_slopes=torch.rand(N, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)),
}


@pytest.mark.parametrize("with_sinks", [False, True], ids=["no-sinks", "sinks"])
@pytest.mark.parametrize("name", list(CASES))
def test_loop_over_sequences_equals_one_dense_block_diagonal_attention(name, with_sinks):
    """out, lse and the gradients of q, k, v (and sinks) of the loop equal the dense formulation's, with a loss
    on both out and lse."""
    options = CASES[name]
    q, k, v = packed_inputs(LENGTHS_Q, LENGTHS_K)
    leaves = {"q": q, "k": k, "v": v}
    if with_sinks:
        leaves["sinks"] = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    generator = torch.Generator().manual_seed(1)
    dout = torch.randn(q.shape[0], 4, v.shape[-1], generator=generator, dtype=torch.float64)
    dlse = torch.randn(4, q.shape[0], generator=generator, dtype=torch.float64)

    out, lse, grads = run(varlen(LENGTHS_Q, LENGTHS_K, **options), leaves, dout, dlse)
    expected_out, expected_lse, expected_grads = run(dense(LENGTHS_Q, LENGTHS_K, **options), leaves, dout, dlse)

    assert out.shape == (sum(LENGTHS_Q), 4, 6) and lse.shape == (4, sum(LENGTHS_Q)) and lse.dtype == torch.float32
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, expected_lse.float(), rtol=1e-6, atol=1e-6)
    assert grads.keys() == expected_grads.keys()
    for leaf in grads:
        torch.testing.assert_close(grads[leaf], expected_grads[leaf], rtol=1e-10, atol=1e-10, msg=leaf)
    # The dense formulation would not notice a mask that removes nothing: the rows of a sequence whose keys
    # all lie elsewhere really see none.
    without_keys = offsets(LENGTHS_Q)[6].item() + torch.arange(LENGTHS_Q[6])  # sequence 6: 3 queries, 0 keys
    assert torch.all(out[without_keys] == 0)
    assert torch.all(lse[:, without_keys] == (leaves["sinks"].float()[:, None] if with_sinks else -math.inf))


def test_the_dense_formulation_is_not_trivially_equal():
    """A sanity check of the oracle: ignoring the sequence boundaries (one long sequence) gives another result."""
    q, k, v = packed_inputs([5, 7], [6, 4])
    separate = reference.attention_varlen(q, k, v, offsets([5, 7]), offsets([6, 4]))
    joined = reference.attention_varlen(q, k, v, offsets([12]), offsets([10]))
    assert (separate - joined).abs().max() > 1e-2


def test_dropout_follows_the_batch_index_of_each_sequence():
    """With dropout, sequence n drops what batch n of a dense batch would: the dense mask is gathered from
    dropout_keep_mask of the whole batch."""
    q, k, v = packed_inputs(LENGTHS_Q, LENGTHS_K)
    rng_state = torch.tensor([123456789, 42])
    mask = dense_dropout_mask(rng_state, 0.3, LENGTHS_Q, LENGTHS_K, heads=4)
    leaves = {"q": q, "k": k, "v": v}
    dout = torch.randn(q.shape[0], 4, v.shape[-1], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    dlse = torch.zeros(4, q.shape[0], dtype=torch.float64)
    out, lse, grads = run(varlen(LENGTHS_Q, LENGTHS_K, causal=True, dropout_p=0.3, rng_state=rng_state), leaves,
                          dout, dlse)
    expected_out, expected_lse, expected_grads = run(
        dense(LENGTHS_Q, LENGTHS_K, causal=True, dropout_p=0.3, dropout_mask=mask), leaves, dout, dlse)
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, expected_lse.float())
    for leaf in grads:
        torch.testing.assert_close(grads[leaf], expected_grads[leaf], rtol=1e-10, atol=1e-10, msg=leaf)
    # Without dropout the result differs: the mask above did drop something.
    plain = reference.attention_varlen(q, k, v, offsets(LENGTHS_Q), offsets(LENGTHS_K), causal=True)
    assert (plain - out).abs().max() > 1e-2


def test_equal_lengths_drop_exactly_what_a_dense_batch_drops():
    """N sequences of one length, after the same seed, are flash_attention's batch of N: the same rng_state
    drawn (one draw per call, from the default generator), the same elements dropped."""
    sequences, length, heads = 3, 6, 2
    q, k, v = packed_inputs([length] * sequences, [length] * sequences, heads=heads, heads_kv=heads)
    cu_seqlens = offsets([length] * sequences)
    torch.manual_seed(5)
    out = reference.attention_varlen(q, k, v, cu_seqlens, cu_seqlens, dropout_p=0.4)
    torch.manual_seed(5)
    batched = reference.attention(*(tensor.view(sequences, length, heads, -1).transpose(1, 2) for tensor in (q, k, v)),
                                  dropout_p=0.4)
    torch.testing.assert_close(out, batched.transpose(1, 2).reshape(sequences * length, heads, -1), rtol=1e-12,
                               atol=1e-12)
    torch.manual_seed(5)
    state = dropout_rng_state(torch.device("cpu"))
    torch.testing.assert_close(reference.attention_varlen(q, k, v, cu_seqlens, cu_seqlens, dropout_p=0.4,
                                                          rng_state=state), out, rtol=0, atol=0)


def test_dropout_keep_mask_of_one_batch_index_is_that_batchs_slice():
    rng_state = torch.tensor([987654321, 7])
    full = reference.dropout_keep_mask(rng_state, 0.5, 4, 3, 5, 9)
    for index in range(4):
        assert torch.equal(reference.dropout_keep_mask(rng_state, 0.5, 4, 3, 5, 9, batch_index=index),
                           full[index:index + 1])
    # A shorter sequence's mask is the top-left corner of the longest one's: counters count within a sequence.
    assert torch.equal(reference.dropout_keep_mask(rng_state, 0.5, 4, 3, 2, 4, batch_index=2), full[2:3, :, :2, :4])
    for wrong in (4, -1, True, 1.0):
        with pytest.raises(ValueError, match=r"batch_index must be an int in \[0, 4\) \(the batch size\), got"):
            reference.dropout_keep_mask(rng_state, 0.5, 4, 3, 5, 9, batch_index=wrong)


def test_output_dtype_lse_layout_and_no_sequences_at_all():
    q, k, v = (tensor.half() for tensor in packed_inputs([3, 4], [2, 5]))
    out, lse = reference.attention_varlen(q, k, v, offsets([3, 4]), offsets([2, 5]), return_lse=True)
    assert (out.dtype, out.shape, lse.dtype, lse.shape) == (torch.float16, (7, 4, 6), torch.float32, (4, 7))
    # lse[h, r] of row r = 3 + i of sequence 1 is that sequence's own lse[0, h, i] (int64 offsets accepted).
    _, lse_1 = reference.attention(as_batch_of_one(q[3:]), as_batch_of_one(k[2:]), as_batch_of_one(v[2:]),
                                   return_lse=True)
    cu_int64 = offsets([3, 4]).long(), offsets([2, 5]).long()
    torch.testing.assert_close(reference.attention_varlen(q, k, v, *cu_int64, return_lse=True)[1][:, 3:], lse_1[0])
    torch.testing.assert_close(lse[:, 3:], lse_1[0])
    # softmax_scale defaults to 1 / sqrt(D)
    torch.testing.assert_close(out, reference.attention_varlen(q, k, v, offsets([3, 4]), offsets([2, 5]),
                                                               softmax_scale=1 / math.sqrt(8)))

    empty = torch.zeros(1, dtype=torch.int32)
    out, lse = reference.attention_varlen(q[:0], k[:0], v[:0], empty, empty, return_lse=True)
    assert (out.shape, out.dtype, lse.shape) == ((0, 4, 6), torch.float16, (4, 0))


@pytest.mark.parametrize(
    "cu_seqlens_q,cu_seqlens_k,options,error,message",
    [
        ([0, 3, 7], [0, 2, 6], {}, ValueError, r"cu_seqlens_k must start at 0, never decrease and end at Tk "
                                               r"\(k.shape\[0\]\) = 7, got \[0, 2, 6\]"),
        ([0, 4, 3, 7], [0, 2, 2, 7], {}, ValueError, r"cu_seqlens_q must start at 0, never decrease"),
        ([1, 7], [0, 7], {}, ValueError, r"cu_seqlens_q must start at 0"),
        ([0, 3, 7], [0, 7], {}, ValueError, "must hold the same number of sequences, got 2 and 1"),
        ([0, 3, 7], [0, 2, 7], dict(alibi_slopes=torch.ones(3, 4)), ValueError,
         r"alibi_slopes must have shape \(Hq,\) = \(4,\) or \(N, Hq\) = \(2, 4\), got \(3, 4\)"),
    ],
)
def test_bad_offsets_name_the_argument(cu_seqlens_q, cu_seqlens_k, options, error, message):
    q, k, v = packed_inputs([3, 4], [2, 5])
    with pytest.raises(error, match=message):
        reference.attention_varlen(q, k, v, torch.tensor(cu_seqlens_q), torch.tensor(cu_seqlens_k), **options)


def test_offsets_must_be_an_integer_tensor():
    q, k, v = packed_inputs([3, 4], [2, 5])
    with pytest.raises(TypeError, match="cu_seqlens_q must be an int32 or int64 tensor, got torch.float32"):
        reference.attention_varlen(q, k, v, torch.tensor([0.0, 3.0, 7.0]), offsets([2, 5]))
    with pytest.raises(ValueError, match=r"cu_seqlens_k must be 1-d with N \+ 1 >= 1 offsets, got shape \(1, 3\)"):
        reference.attention_varlen(q, k, v, offsets([3, 4]), offsets([2, 5]).view(1, 3))
