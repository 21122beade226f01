"""``flash-softmax bench --op attention``: a sequence-length sweep over attention providers.

By default every configuration holds the token budget fixed, as in the FlashAttention papers:
``batch * seqlen = 16k`` tokens and ``heads * head_dim = 2048`` hidden, so the work per token stays
comparable across lengths. ``--batch`` / ``--heads`` fix either instead. ``--gqa G`` gives every K/V
head G query heads; ``--window W`` limits each query to a band of W keys on each side (W to the left only
when causal), so the cost grows as O(S * W) instead of O(S^2). Both apply to the whole run and are
recorded in env.json's command line; the CSV keeps its fixed columns. Every row also records the torch
thread count the run was pinned to (``--threads``).

``--modifiers`` adds, for every configuration, one per score modifier (:data:`MODIFIERS`), timed on the
providers that take them (flash_softmax: the others lack sinks and in-kernel dropout, or would time a
materialised bias instead), on the plain configuration's q, k, v. Its row's ``overhead_vs_plain`` is its
time over the same provider's plain time (same shape, mode and dtype); the FLOP count, hence TFLOP/s, is
the plain one's. In ``bwd`` and ``fwd_bwd`` the sinks and the bias require grad, so their gradients are
part of what is timed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import torch

from flash_softmax.bench.providers import Provider
from flash_softmax.bench.sweep import Result, common_fields, modes

TOKENS = 16 * 1024
HIDDEN = 2048
MODES = ("fwd", "bwd", "fwd_bwd")
#: Backward does about 2.5x the forward's matmul work (five matmuls instead of two).
BACKWARD_FLOP_FACTOR = 2.5

GPU_DEFAULTS = {"seqlens": [512, 1024, 2048, 4096, 8192, 16384], "head_dims": [64, 128],
                "dtypes": ["bfloat16", "float16"], "batch": None, "heads": None}
# The interpreter runs every program of a kernel one after another in numpy: keep it tiny.
CPU_DEFAULTS = {"seqlens": [64, 128], "head_dims": [32], "dtypes": ["float16"], "batch": 1, "heads": 2}

#: The score modifiers of ``--modifiers``: what each adds to the call is in :func:`modifier_inputs`.
MODIFIERS = ("sinks", "alibi", "dropout", "bias")
#: The dropout probability of the ``dropout`` modifier.
DROPOUT_P = 0.1

CSV_COLUMNS = ("provider", "mode", "causal", "dtype", "batch", "heads", "seqlen_q", "seqlen_k", "head_dim",
               "modifier", "ms_median", "ms_p20", "ms_p80", "tflops", "peak_mem_mib", "overhead_vs_plain", "threads",
               "status")


@dataclass(frozen=True)
class AttentionConfig:
    """One attention problem and what is timed of it."""

    mode: str
    causal: bool
    dtype: str
    batch: int
    heads: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    group_size: int = 1  # query heads per K/V head
    window: int = -1  # keys on each side of the diagonal (left only when causal); -1 = unbounded
    modifier: str = "none"  # one of MODIFIERS, or "none" for plain attention

    @property
    def kv_heads(self) -> int:
        return self.heads // self.group_size

    def window_size(self) -> tuple[int, int]:
        """``flash_attention``'s ``window_size`` for this configuration (causal is applied separately)."""
        if self.window < 0:
            return (-1, -1)
        return (self.window, 0 if self.causal else self.window)

    def kept_pairs(self) -> int:
        """(query, key) pairs the softmax sees: exactly those the bottom-right aligned band keeps."""
        left, right = self.window_size()
        if self.causal:
            right = 0
        # Query i sees keys i + Sk - Sq - left .. i + Sk - Sq + right, clipped to [0, Sk - 1].
        diagonal = torch.arange(self.seqlen_q, dtype=torch.int64) + (self.seqlen_k - self.seqlen_q)
        first = (diagonal - left).clamp(min=0) if left >= 0 else torch.zeros_like(diagonal)
        last = (diagonal + right).clamp(max=self.seqlen_k - 1) if right >= 0 else torch.full_like(
            diagonal, self.seqlen_k - 1)
        return int((last - first + 1).clamp(min=0).sum())

    def flops(self) -> float:
        """Matmul FLOPs: forward 4*B*H*pairs*D; backward 2.5x, forward+backward 3.5x of that."""
        forward = 4.0 * self.batch * self.heads * self.kept_pairs() * self.head_dim
        return forward * {"fwd": 1.0, "bwd": BACKWARD_FLOP_FACTOR, "fwd_bwd": 1.0 + BACKWARD_FLOP_FACTOR}[self.mode]


def record(result: Result, threads: int) -> dict[str, object]:
    """The CSV row of one result (also what the table and plots read); ``threads``: torch's thread count."""
    config, timing = result.config, result.measurement.timing
    configuration = {name: value for name, value in asdict(config).items() if name in CSV_COLUMNS}
    throughput = config.flops() / (timing.median * 1e-3) / 1e12 if timing else None
    # overhead_vs_plain needs the plain row too: see overheads().
    return {**common_fields(result, threads), **configuration, "tflops": throughput,
            "peak_mem_mib": result.measurement.peak_mem_mib, "overhead_vs_plain": None}


def overheads(results: Sequence[Result]) -> dict[int, float]:
    """For each modifier row measured ``ok`` (by index): its median time over the same provider's on the plain
    configuration (same shape, mode and dtype), where that was measured ``ok`` too."""
    plain_ms = {
        (result.provider, result.config): result.measurement.timing.median
        for result in results if result.config.modifier == "none" and result.measurement.ok
    }
    ratios = {}
    for index, result in enumerate(results):
        plain = (result.provider, replace(result.config, modifier="none"))
        if result.config.modifier != "none" and result.measurement.ok and plain in plain_ms:
            ratios[index] = result.measurement.timing.median / plain_ms[plain]
    return ratios


def resolve_sweep(args, on_gpu: bool) -> dict[str, object]:
    """The sweep's axes: each flag given, else the device's default."""
    defaults = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
    return {
        "seqlens": args.seqlens or defaults["seqlens"],
        "head_dims": args.head_dims or defaults["head_dims"],
        "dtypes": args.dtypes or defaults["dtypes"],
        "causal": list(dict.fromkeys(args.causal)) if args.causal else [False, True],
        "modes": modes(args.modes, MODES),
        "batch": args.batch or defaults["batch"],
        "heads": args.heads or defaults["heads"],
        "group_size": args.gqa or 1,
        "window": -1 if args.window is None else args.window,
        "modifiers": list(dict.fromkeys(args.modifiers or ())),
    }


def configurations(sweep: dict[str, object]) -> list[AttentionConfig]:
    """Every configuration of the sweep, grouped so that those sharing inputs are adjacent: per mode the plain
    one, then one per modifier."""
    configs = []
    for dtype in sweep["dtypes"]:
        for head_dim in sweep["head_dims"]:
            for causal in sweep["causal"]:
                for seqlen in sweep["seqlens"]:
                    batch = sweep["batch"] or max(1, TOKENS // seqlen)
                    heads = sweep["heads"] or max(1, HIDDEN // head_dim)
                    if heads % sweep["group_size"]:
                        raise ValueError(f"--gqa {sweep['group_size']} must divide the number of heads, "
                                         f"{heads} at head dim {head_dim}")
                    for mode in sweep["modes"]:
                        for modifier in ("none", *sweep["modifiers"]):
                            configs.append(AttentionConfig(mode, causal, dtype, batch, heads, seqlen, seqlen,
                                                           head_dim, sweep["group_size"], sweep["window"], modifier))
    return configs


def make_inputs(config: AttentionConfig, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random normal q, k, v and dout (never zeros, which would make some kernels look faster)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, config.dtype)

    def normal(heads: int, seqlen: int) -> torch.Tensor:
        shape = (config.batch, heads, seqlen, config.head_dim)
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    return (normal(config.heads, config.seqlen_q), normal(config.kv_heads, config.seqlen_k),
            normal(config.kv_heads, config.seqlen_k), normal(config.heads, config.seqlen_q))


def modifier_inputs(config: AttentionConfig, q: torch.Tensor, requires_grad: bool) -> dict[str, object]:
    """``flash_attention``'s keyword arguments for the configuration's modifier, on q's device; none when plain.

    ``sinks``: ``(Hq,)`` normal logits in q's dtype (a model's parameter). ``alibi``: the ``(Hq,)`` float32
    slopes of the ALiBi paper, ``2 ** (-8 * h / Hq)`` for h = 1..Hq. ``dropout``: ``dropout_p`` =
    :data:`DROPOUT_P`. ``bias``: a normal ``(B, 1, Sq, Sk)`` float bias in q's dtype, shared by the heads. The
    sinks and the bias require grad with ``requires_grad``, so a backward computes their gradients.
    """
    if config.modifier == "none":
        return {}
    generator = torch.Generator(device=q.device).manual_seed(1)
    if config.modifier == "sinks":
        sinks = torch.randn(config.heads, generator=generator, device=q.device, dtype=q.dtype)
        return {"sinks": sinks.requires_grad_(requires_grad)}
    if config.modifier == "alibi":
        exponents = torch.arange(1, config.heads + 1, dtype=torch.float32, device=q.device)
        return {"alibi_slopes": torch.exp2(-8.0 * exponents / config.heads)}
    if config.modifier == "dropout":
        return {"dropout_p": DROPOUT_P}
    if config.modifier == "bias":
        shape = (config.batch, 1, config.seqlen_q, config.seqlen_k)
        bias = torch.randn(shape, generator=generator, device=q.device, dtype=q.dtype)
        return {"attn_bias": bias.requires_grad_(requires_grad)}
    raise ValueError(f"modifier: expected 'none' or one of {', '.join(MODIFIERS)}, got {config.modifier!r}")


def runs(config: AttentionConfig, provider: Provider) -> bool:
    """Whether the sweep measures ``provider`` on ``config``: every provider runs plain attention, only those
    that take the modifiers run a modifier (the others get no row rather than an ``unsupported`` one each)."""
    return config.modifier == "none" or provider.takes_modifiers


def call_for_mode(config: AttentionConfig, provider: Provider, inputs: tuple[torch.Tensor, ...]) -> Callable[[], object]:
    """What is timed: the forward; the backward alone (its forward runs once, here, untimed); or both. The
    backward computes the gradients of q, k, v and of the modifier's sinks or bias."""
    q, k, v, dout = inputs
    needs_grad = config.mode != "fwd"
    q, k, v = (tensor.detach().requires_grad_(needs_grad) for tensor in (q, k, v))
    modifiers = modifier_inputs(config, q, needs_grad)
    forward = provider.build(config, q, k, v, **modifiers)
    if config.mode == "fwd":
        return forward
    differentiable = [value for value in modifiers.values() if isinstance(value, torch.Tensor) and value.requires_grad]
    leaves = (q, k, v, *differentiable)
    if config.mode == "bwd":
        out = forward()
        # The graph is kept so that the backward can be replayed for every timed repetition.
        return lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True)
    return lambda: torch.autograd.grad(forward(), leaves, dout)


def inputs_key(config: AttentionConfig) -> tuple:
    """Configurations that differ only in mode or modifier share inputs."""
    return (config.causal, config.dtype, config.batch, config.heads, config.seqlen_q, config.seqlen_k,
            config.head_dim, config.group_size, config.window)
