"""What only a GPU shows: races, long grids, and shared-memory-heavy tiles, compiled.

The interpreter runs one program at a time, so a race between programs or warps (a missing barrier in a
warp-specialised loop, two persistent programs writing one tile, a reduction whose order depends on
scheduling) cannot show there; nor can a tile that does not fit the device's shared memory. Every test
is ``gpu`` and is skipped without CUDA (tests/conftest.py).

- Determinism: forward and backward repeated 20 times must give bitwise equal out, dq, dk and dv, for
  grouped-query heads, causal and sliding-window bands at ragged lengths, with the default configuration
  of each bucket and with every configuration of each kernel's space forced in turn.
- Long sequences: 64k keys for a few queries, 64k queries over a few keys, and 16k x 16k, against the
  float64 reference by the accuracy policy (``attention_checks.assert_matches_reference``).
- Head dim 256: every configuration of each kernel's pruned space for this device, run and checked
  (and the defaults in float16, without a band, and at head dim 192, padded to 256).
"""

from __future__ import annotations

import pytest
import torch

from flash_softmax.attention import configs

from attention_checks import NAMES, assert_matches_reference, kernel_results
from conftest import DEVICE

pytestmark = pytest.mark.gpu

REPEATS = 20

# (name, batch, heads_q, heads_kv, seqlen_q, seqlen_k, options): grouped-query causal at a ragged length,
# a sliding window, and a cross-attention band with Sq != Sk (both causal alignments differ there).
SHAPES = [
    ("gqa-causal-1023", 2, 8, 2, 1023, 1023, {"causal": True}),
    ("gqa-window-2048", 1, 8, 2, 2048, 2048, {"window_size": (256, 0)}),
    ("gqa-full-1023x2048", 2, 8, 2, 1023, 2048, {}),
    ("window-both-sides-2048", 1, 4, 4, 2048, 2048, {"window_size": (300, 77)}),
]


def make_inputs(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, dtype=torch.bfloat16, seed=0):
    """Seeded random q, k, v (head dim ``head_dim`` for values too) and an output gradient ``dout``, on the
    test device; plain tensors (``kernel_results`` runs on leaves of its own)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=DEVICE, dtype=dtype)

    q = randn(batch, heads_q, seqlen_q, head_dim)
    k = randn(batch, heads_kv, seqlen_k, head_dim)
    v = randn(batch, heads_kv, seqlen_k, head_dim)
    dout = randn(batch, heads_q, seqlen_q, head_dim)
    return q, k, v, dout


def assert_repeatable(q, k, v, dout, **options):
    """``REPEATS`` runs of forward and backward, each bitwise equal to the first; the first one correct."""
    first = kernel_results(q, k, v, dout, **options)
    for repeat in range(1, REPEATS):
        again = kernel_results(q, k, v, dout, **options)
        for name in NAMES:
            a, b = first[name], again[name]
            if not torch.equal(a, b):
                differing = (a != b).sum().item()
                raise AssertionError(f"{name} differs between run 0 and run {repeat} in {differing} elements")
    assert_matches_reference(first, q, k, v, dout, **options)


def _shared_limit() -> int:
    return configs._shared_memory_limit()


def _space_configs(kernel: str, head_dim: int, element_size: int = 2) -> list[configs.KernelConfig]:
    return configs.prune(kernel, head_dim, head_dim, element_size, _shared_limit(), configs.device_arch())


def _variant_overrides(head_dim: int) -> list[dict]:
    """Overrides that between them force every configuration of every kernel's space: the i-th of each
    space together (a kernel with fewer keeps its default), so a handful of runs covers them all."""
    spaces = {kernel: _space_configs(kernel, head_dim) for kernel in configs.KERNEL_NAMES}
    longest = max(len(space) for space in spaces.values())
    return [{kernel: space[index] if index < len(space) else space[0] for kernel, space in spaces.items()}
            for index in range(longest)]


def _label(overrides: dict) -> str:
    return " | ".join(f"{kernel}={config.label}" for kernel, config in overrides.items())


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("shape", SHAPES, ids=[shape[0] for shape in SHAPES])
def test_default_configurations_are_deterministic(shape, head_dim):
    _, batch, heads_q, heads_kv, seqlen_q, seqlen_k, options = shape
    q, k, v, dout = make_inputs(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim)
    assert_repeatable(q, k, v, dout, **options)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("variant", range(6))
def test_every_space_configuration_is_deterministic(variant, head_dim):
    """Each configuration of the spaces (TMA, persistent, warp-specialised ...) on grouped-query causal heads."""
    overrides = _variant_overrides(head_dim)
    if variant >= len(overrides):
        pytest.skip(f"the spaces of head dim {head_dim} have {len(overrides)} configurations at most")
    q, k, v, dout = make_inputs(2, 8, 2, 1023, 1023, head_dim, seed=variant)
    with configs.override(**overrides[variant]):
        try:
            assert_repeatable(q, k, v, dout, causal=True)
        except AssertionError as error:
            raise AssertionError(f"{_label(overrides[variant])}: {error}") from None


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_long_keys_few_queries(causal):
    """65537 keys: the dQ and forward loops walk a thousand key blocks; dK/dV a grid of that many tiles."""
    q, k, v, dout = make_inputs(1, 4, 1, 300, 65537, 128)
    results = kernel_results(q, k, v, dout, causal=causal)
    assert_matches_reference(results, q, k, v, dout, causal=causal)


def test_long_queries_few_keys():
    """65537 queries over 700 keys, causal (the first 64837 queries see no key: zero output, no NaN)."""
    q, k, v, dout = make_inputs(1, 2, 1, 65537, 700, 64)
    results = kernel_results(q, k, v, dout, causal=True)
    assert torch.isfinite(results["out"]).all() and torch.isfinite(results["dq"]).all()
    assert_matches_reference(results, q, k, v, dout, causal=True)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sixteen_k_square(causal):
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:  # other tests may run beside this one (scripts/gpu_check.sh runs shards)
        pytest.skip(f"the float64 reference of a 16k x 16k score matrix needs about 25 GiB; {free / 2**30:.0f} free")
    q, k, v, dout = make_inputs(1, 1, 1, 16411, 16411, 128)
    results = kernel_results(q, k, v, dout, causal=causal)
    assert_matches_reference(results, q, k, v, dout, causal=causal)


def _wide_cases():
    """Every configuration kept for 256-wide bfloat16 tiles, causal (the masked path); then the default in
    float16, without the band, and at head dim 192 (padded to 256, the tail masked)."""
    cases = [pytest.param(kernel, config, torch.bfloat16, True, 256, id=f"{kernel}-{config.label.replace(' ', '-')}")
             for kernel in configs.KERNEL_NAMES for config in _space_configs(kernel, 256)]
    cases += [pytest.param(None, None, torch.float16, False, 256, id="default-float16-full"),
              pytest.param(None, None, torch.bfloat16, False, 256, id="default-bfloat16-full"),
              pytest.param(None, None, torch.bfloat16, True, 192, id="default-bfloat16-causal-192")]
    return cases


@pytest.mark.parametrize("kernel,config,dtype,causal,head_dim", _wide_cases() if torch.cuda.is_available() else [])
def test_wide_heads_every_configuration(kernel, config, dtype, causal, head_dim):
    """Each configuration the pruning keeps for 256-wide tiles must compile, fit and be correct here."""
    q, k, v, dout = make_inputs(2, 4, 2, 1000, 1537, head_dim, dtype=dtype)
    with configs.override(**({} if kernel is None else {kernel: config})):
        results = kernel_results(q, k, v, dout, causal=causal)
    assert_matches_reference(results, q, k, v, dout, causal=causal)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_modifiers_repeat_bitwise_and_match_the_reference(dtype):
    """Sinks, ALiBi, dropout, a learned bias and a loss on lse, compiled at GPU sizes: every gradient
    (dsinks and dbias included) bitwise equal over repeats under one seed, and correct by the accuracy
    policy (test_score_modifiers.check, with its float64 truth)."""
    from test_score_modifiers import check, make_case

    shape = (2, 8, 2, 1023, 1537, 128, 128)
    tensors, extras = make_case(shape, dtype, sinks=True, alibi="heads", bias=(1, 8, 1023, 1537))
    first = check(tensors, extras, dropout_p=0.1, causal=True, lse_loss=True)
    for _ in range(4):
        again = check(tensors, extras, dropout_p=0.1, causal=True, lse_loss=True)
        for name, tensor in first.items():
            assert torch.equal(tensor, again[name]), name
