"""``flash-softmax bench --varlen``: attention over one packed batch of sequences of mixed lengths.

What a training step on packed documents pays, three ways: ``flash_attention_varlen`` on the sequences
concatenated along dim 0 (``(T, H, D)`` with ``cu_seqlens``); ``flash_attention`` and torch's SDPA on the
same sequences padded to the longest (``(N, H, S_max, D)``, every sequence a batch row, with a bool
key-padding mask so that the real rows get the right result); and FlexAttention on the packed tokens with a
document mask (a ``BlockMask`` built from each token's sequence id, so blocks across documents are skipped).
Causal runs are causal within each sequence (queries and keys are the same tokens, so bottom-right and
top-left alignment agree).

The lengths are drawn uniformly from ``--varlen-lengths MIN MAX`` (default 128 to 8192) by a generator seeded
with ``--varlen-seed`` (default 0): sequences are drawn until their lengths add up to at least
``--varlen-tokens`` (default 32k), or exactly ``--varlen-sequences`` of them. One packed batch per run, timed
for every dtype, head dim, causal setting and mode; the CSV records the lengths and the seed on every row.

Throughput counts the real work only, whatever a provider computes: ``tokens_per_s`` is the real tokens
``T = sum(lengths)`` per second, and TFLOP/s uses the FLOPs of the pairs each sequence's softmax sees,
``4 * H * D * sum_n pairs_n`` for the forward (``pairs_n = n * n``, causal ``n * (n + 1) / 2``), 2.5x that for
the backward and 3.5x for both, the convention of :mod:`~flash_softmax.bench.attention`. The padded
providers thus show a lower TFLOP/s for the padding they compute and throw away.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from flash_softmax.bench.attention import BACKWARD_FLOP_FACTOR, HIDDEN, MODES
from flash_softmax.bench.providers import Provider
from flash_softmax.bench.sweep import Result, common_fields, modes

GPU_DEFAULTS = {"tokens": 32 * 1024, "length_range": (128, 8192), "head_dims": [128], "dtypes": ["bfloat16"],
                "heads": None}
# The interpreter runs every program one after another: a few short sequences.
CPU_DEFAULTS = {"tokens": 64, "length_range": (8, 32), "head_dims": [16], "dtypes": ["float16"], "heads": 2}

CSV_COLUMNS = ("provider", "mode", "causal", "dtype", "sequences", "tokens", "max_seqlen", "padded_tokens", "heads",
               "head_dim", "seed", "lengths", "ms_median", "ms_p20", "ms_p80", "tokens_per_s", "tflops", "peak_mem_mib",
               "threads", "status")


def draw_lengths(seed: int, shortest: int, longest: int, *, tokens: int | None = None,
                 sequences: int | None = None) -> tuple[int, ...]:
    """Sequence lengths drawn uniformly from ``[shortest, longest]`` by a CPU generator seeded with ``seed``:
    exactly ``sequences`` of them, or else as many as it takes for their sum to reach ``tokens`` (so the
    last one may overshoot it; at least one sequence either way)."""
    if (tokens is None) == (sequences is None):
        raise ValueError(f"draw_lengths: expected one of tokens and sequences, got tokens={tokens}, "
                         f"sequences={sequences}")
    if not 1 <= shortest <= longest:
        raise ValueError(f"--varlen-lengths MIN MAX: expected 1 <= MIN <= MAX, got {shortest} {longest}")
    generator = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while not lengths or (len(lengths) < sequences if sequences is not None else sum(lengths) < tokens):
        lengths.append(int(torch.randint(shortest, longest + 1, (1,), generator=generator)))
    return tuple(lengths)


def visible_pairs(length: int, causal: bool) -> int:
    """(query, key) pairs one sequence of ``length`` tokens attends over: all of them, or causally the lower
    triangle with its diagonal."""
    return length * (length + 1) // 2 if causal else length * length


@dataclass(frozen=True)
class VarlenConfig:
    """One packed batch and what is timed of it."""

    mode: str
    causal: bool
    dtype: str
    heads: int
    head_dim: int
    lengths: tuple[int, ...]
    seed: int
    group_size: int = 1  # query heads per K/V head

    @property
    def kv_heads(self) -> int:
        return self.heads // self.group_size

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def max_seqlen(self) -> int:
        return max(self.lengths)

    def kept_pairs(self) -> int:
        """The real work: pairs seen summed over the sequences, none across them and none of the padding."""
        return sum(visible_pairs(length, self.causal) for length in self.lengths)

    def flops(self) -> float:
        """Matmul FLOPs of the real work: forward 4*H*pairs*D; backward 2.5x, forward+backward 3.5x of that."""
        forward = 4.0 * self.heads * self.kept_pairs() * self.head_dim
        return forward * {"fwd": 1.0, "bwd": BACKWARD_FLOP_FACTOR, "fwd_bwd": 1.0 + BACKWARD_FLOP_FACTOR}[self.mode]


@dataclass(frozen=True)
class Packing:
    """How the tokens are laid out, on the inputs' device: what the providers need besides q, k and v.

    Attributes:
        cu_seqlens: int32 ``(N + 1,)`` offsets of the sequences in the packed rows.
        max_seqlen: the longest length, ``S`` of the padded layout.
        document: int32 ``(T,)``: the sequence each packed row belongs to (FlexAttention's document mask).
        key_padding: bool ``(N, 1, 1, S)``: True where a padded row holds a real key.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    document: torch.Tensor
    key_padding: torch.Tensor


def record(result: Result, threads: int) -> dict[str, object]:
    """The CSV row of one result (also what the table reads); ``threads``: torch's thread count."""
    config, timing = result.config, result.measurement.timing
    seconds = timing.median * 1e-3 if timing else None
    return {**common_fields(result, threads), "mode": config.mode, "causal": config.causal, "dtype": config.dtype,
            "sequences": len(config.lengths), "tokens": config.tokens, "max_seqlen": config.max_seqlen,
            "padded_tokens": len(config.lengths) * config.max_seqlen, "heads": config.heads,
            "head_dim": config.head_dim, "seed": config.seed, "lengths": " ".join(map(str, config.lengths)),
            "tokens_per_s": config.tokens / seconds if seconds else None,
            "tflops": config.flops() / seconds / 1e12 if seconds else None,
            "peak_mem_mib": result.measurement.peak_mem_mib}


def resolve_sweep(args, on_gpu: bool) -> dict[str, object]:
    """The run's packed batch and axes: each flag given, else the device's default.

    Raises:
        ValueError: both ``--varlen-tokens`` and ``--varlen-sequences``, or a length range with MIN > MAX.
    """
    defaults = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
    if args.varlen_tokens is not None and args.varlen_sequences is not None:
        raise ValueError(f"--varlen-tokens and --varlen-sequences: give one of them, got {args.varlen_tokens} and "
                         f"{args.varlen_sequences}")
    shortest, longest = args.varlen_lengths or defaults["length_range"]
    size = ({"sequences": args.varlen_sequences} if args.varlen_sequences is not None
            else {"tokens": args.varlen_tokens or defaults["tokens"]})
    seed = 0 if args.varlen_seed is None else args.varlen_seed
    return {
        "lengths": draw_lengths(seed, shortest, longest, **size),
        "seed": seed,
        "head_dims": args.head_dims or defaults["head_dims"],
        "dtypes": args.dtypes or defaults["dtypes"],
        "causal": list(dict.fromkeys(args.causal)) if args.causal else [False, True],
        "modes": modes(args.modes, MODES),
        "heads": args.heads or defaults["heads"],
        "group_size": args.gqa or 1,
    }


def configurations(sweep: dict[str, object]) -> list[VarlenConfig]:
    """Every configuration of the run, those sharing inputs (all but causal and mode) adjacent."""
    configs = []
    for dtype in sweep["dtypes"]:
        for head_dim in sweep["head_dims"]:
            heads = sweep["heads"] or max(1, HIDDEN // head_dim)
            if heads % sweep["group_size"]:
                raise ValueError(f"--gqa {sweep['group_size']} must divide the number of heads, {heads} at head dim "
                                 f"{head_dim}")
            for causal in sweep["causal"]:
                for mode in sweep["modes"]:
                    configs.append(VarlenConfig(mode, causal, dtype, heads, head_dim, sweep["lengths"], sweep["seed"],
                                                sweep["group_size"]))
    return configs


def runs(config: VarlenConfig, provider: Provider) -> bool:
    """Every provider runs every packed configuration."""
    return True


def make_inputs(config: VarlenConfig, device: torch.device, seed: int = 0) -> dict[str, object]:
    """Random normal q, k, v and dout for the packed tokens, the same values padded, and the :class:`Packing`.

    ``"packed"``: ``(T, H, D)`` tensors. ``"padded"``: ``(N, H, S, D)`` views of ``(N, S, H, D)`` tensors (a model's
    layout, read in place by every provider), zero in the padding, so a backward's ``dout`` there changes
    nothing.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, config.dtype)
    sequences, longest = len(config.lengths), config.max_seqlen
    lengths = torch.tensor(config.lengths, dtype=torch.int64, device=device)
    document = torch.repeat_interleave(torch.arange(sequences, device=device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    position = torch.arange(config.tokens, device=device) - starts[document]

    def normal(heads: int) -> torch.Tensor:
        return torch.randn(config.tokens, heads, config.head_dim, generator=generator, device=device, dtype=dtype)

    packed = (normal(config.heads), normal(config.kv_heads), normal(config.kv_heads), normal(config.heads))

    def padded(tensor: torch.Tensor) -> torch.Tensor:
        rows = tensor.new_zeros(sequences, longest, *tensor.shape[1:])
        rows[document, position] = tensor
        return rows.transpose(1, 2)

    packing = Packing(
        cu_seqlens=torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)]).to(torch.int32),
        max_seqlen=longest,
        document=document.to(torch.int32),
        key_padding=(torch.arange(longest, device=device)[None, :] < lengths[:, None]).view(sequences, 1, 1, longest),
    )
    return {"packed": packed, "padded": tuple(padded(tensor) for tensor in packed), "packing": packing}


def call_for_mode(config: VarlenConfig, provider: Provider, inputs: dict[str, object]) -> Callable[[], object]:
    """What is timed, on the provider's layout (:attr:`Provider.padded`): the forward; the backward alone (its
    forward runs once, here, untimed); or both. The backward computes the gradients of q, k and v."""
    q, k, v, dout = inputs["padded" if provider.padded else "packed"]
    needs_grad = config.mode != "fwd"
    q, k, v = (tensor.detach().requires_grad_(needs_grad) for tensor in (q, k, v))
    forward = provider.build(config, q, k, v, inputs["packing"])
    if config.mode == "fwd":
        return forward
    if config.mode == "bwd":
        out = forward()
        # The graph is kept so that the backward can be replayed for every timed repetition.
        return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    return lambda: torch.autograd.grad(forward(), (q, k, v), dout)


def inputs_key(config: VarlenConfig) -> tuple:
    """Configurations that differ only in mode or causality share inputs."""
    return (config.dtype, config.heads, config.head_dim, config.group_size, config.lengths)
