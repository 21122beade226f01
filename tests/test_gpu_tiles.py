"""The GPU launch configurations (``configs.SPACES``) with their exact tiles, run where the tests run.

Without a GPU, Triton's interpreter normally runs one small 32 x 32 tile (``configs.interpreter_config``),
so the tiles, warps and stages Hopper (``sm_90a``) and Ampere (``sm_80``) use by default and in each
variant would otherwise only ever run compiled. Here each of them is forced with ``configs.override``,
which wins over the interpreter's tile, and judged against the float64 reference by the accuracy policy
(``attention_checks.check_attention``).

``num_warps`` and ``num_stages`` change nothing in the interpreter (it runs a program as one sequential
block of numpy), but the tile sizes and the variant switches do. Entries of the spaces that differ only
by warps/stages are therefore run once, as their first entry, and coverage is counted modulo warps and
stages: ``test_every_space_entry_is_exercised`` fails when an entry of either architecture's space has no
case here.

Lengths sit at a multiple of the forced tiles plus or minus one (127/129/257 for 128 and 64, 63/65 for
64 and 32), with Sq < Sk and Sq > Sk, and some span more than two key blocks so that the mask-free
interior of a causal or windowed band is reached with the large tiles too. Across the cases each masking
path is taken at least once: causal, sliding window, grouped-query heads, additive bias, bool mask,
padded head dims (40, 59, 72, 96, 144, 200), Dv != D and softcap, plus one bfloat16 case (the interpreter
is slower in bfloat16). Head dim 256 tiles are the costliest to interpret, so those cases use lengths of
a couple of blocks.

On a GPU the same tests compile the forced configurations. There a case that forces an entry of another
architecture's space only (e.g. Hopper's TMA tiles on an Ampere card, which may not fit its shared
memory) is skipped: its tiles are checked in the interpreter, and compiled on their own architecture.
``configs.INTERPRETER_SM_COUNT`` is what the interpreter takes as the SM count; the tests that vary it
also set the cached SM count of a real device, so the persistent and GQA-split paths are the same there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from flash_softmax.attention import backward, configs
from flash_softmax.attention.configs import KernelConfig
from flash_softmax.testing import assert_close, compare

from attention_checks import FACTORS, NAMES, check_attention, grads_of, kernel_results, make_inputs, references
from conftest import DEVICE

pytestmark = pytest.mark.gpu_tiles


# --- space entries, named by tile and variants ---------------------------------------------------------

def tile_label(config: KernelConfig) -> str:
    """``KernelConfig.label`` without warps and stages: ``"128x64"``, ``"128x64 tma persistent"``."""
    words = config.label.split()
    return " ".join([words[0], *words[3:]])


def space_keys() -> set[tuple[str, int, str]]:
    """Every ``(kernel, head-dim bucket, tile label)`` of both architectures' spaces. The spaces hold only
    16-bit configurations (float64 launches take ``configs.small_config``, outside the spaces), so this is
    every entry a GPU can pick, modulo warps and stages."""
    return {(kernel, bucket, tile_label(entry))
            for kernels in configs.SPACES.values()
            for kernel, buckets in kernels.items()
            for bucket, entries in buckets.items()
            for entry in entries}


def space_entry(kernel: str, bucket: int, label: str) -> KernelConfig:
    """The first entry of ``kernel``'s ``bucket`` with tile and variants ``label``: the exact configuration
    a GPU launches, warps and stages included. Hopper's space is searched first, then Ampere's; on a GPU,
    the device's own architecture first (its warps and stages are the ones that compile there)."""
    arches = list(configs.ARCHITECTURES)
    if DEVICE == "cuda":
        arches.sort(key=lambda arch: arch != configs.device_arch())
    for arch in arches:
        for entry in configs.SPACES[arch][kernel].get(bucket, []):
            if tile_label(entry) == label:
                return entry
    raise AssertionError(f"no {kernel} entry {label!r} in the head-dim-{bucket} spaces: update this file's cases")


def entry_arches(kernel: str, bucket: int, config: KernelConfig) -> set[str]:
    return {arch for arch in configs.ARCHITECTURES if config in configs.SPACES[arch][kernel].get(bucket, [])}


@dataclass(frozen=True)
class Case:
    """One call of the kernels under forced configurations.

    ``forward``, ``backward_dkdv``, ``backward_dq``: a tile label of that kernel's space in the bucket of
    the head dims, or a ``KernelConfig`` that is not a space entry (not counted as coverage).
    ``shape``: ``(B, Hq, Hkv, Sq, Sk, D, Dv)``. ``bias``: None, ``"full"`` (float ``(B, Hq, Sq, Sk)``),
    ``"broadcast"`` (float ``(Sq, Sk)``, read with stride 0) or ``"mask"`` (bool ``(B, 1, Sq, Sk)``).
    """

    id: str
    forward: str | KernelConfig
    backward_dkdv: str | KernelConfig
    backward_dq: str | KernelConfig
    shape: tuple[int, int, int, int, int, int, int]
    options: dict = field(default_factory=dict)
    bias: str | None = None
    dtype: torch.dtype = torch.float16

    @property
    def bucket(self) -> int:
        return configs.head_dim_bucket(self.shape[5], self.shape[6])

    def forced(self) -> dict[str, KernelConfig]:
        return {kernel: spec if isinstance(spec, KernelConfig) else space_entry(kernel, self.bucket, spec)
                for kernel, spec in self.specs().items()}

    def specs(self) -> dict[str, str | KernelConfig]:
        return dict(forward=self.forward, backward_dkdv=self.backward_dkdv, backward_dq=self.backward_dq)

    def covered(self) -> set[tuple[str, int, str]]:
        return {(kernel, self.bucket, spec) for kernel, spec in self.specs().items() if isinstance(spec, str)}


def params(cases):
    return [pytest.param(case, id=case.id) for case in cases]


# --- running a case --------------------------------------------------------------------------------------

def build(case: Case, seed: int = 0):
    """``q, k, v`` (leaves), ``dout`` and the options (bias included) of ``case``."""
    batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, head_dim_v = case.shape
    q, k, v = make_inputs(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, case.dtype,
                          head_dim_v=head_dim_v, seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    dout = torch.randn(batch, heads_q, seqlen_q, head_dim_v, generator=generator).to(DEVICE, case.dtype)
    options = dict(case.options)
    if case.bias == "full":
        options["attn_bias"] = torch.randn(batch, heads_q, seqlen_q, seqlen_k, generator=generator).to(DEVICE, case.dtype)
    elif case.bias == "broadcast":
        options["attn_bias"] = torch.randn(seqlen_q, seqlen_k, generator=generator).to(DEVICE, case.dtype)
    elif case.bias == "mask":
        options["attn_bias"] = (torch.rand(batch, 1, seqlen_q, seqlen_k, generator=generator) < 0.75).to(DEVICE)
    else:
        assert case.bias is None, case.bias
    return q, k, v, dout, options


def skip_if_not_for_this_device(case: Case) -> None:
    """On a GPU, skip a case that forces an entry of another architecture's space only (see the module
    docstring). Never skips in the interpreter, where every architecture's entries run."""
    if DEVICE != "cuda":
        return
    arch = configs.device_arch()
    for kernel, config in case.forced().items():
        arches = entry_arches(kernel, case.bucket, config)
        if arches and arch not in arches:
            pytest.skip(f"{kernel} {config.label} is an entry of {sorted(arches)} only; this GPU is {arch}")


def checked(q, k, v, dout, **options) -> dict[str, torch.Tensor]:
    """``check_attention`` (float64 truth, accuracy policy), returning the results it judged."""
    out, lse = check_attention(q, k, v, dout=dout, **options)
    return dict(out=out.detach(), lse=lse, **grads_of(q, k, v))


def check_forced(case: Case, spy: Spy, q, k, v, dout, options) -> dict[str, KernelConfig]:
    """``check_attention`` of q, k, v under ``case``'s forced configurations, and that those and only those
    launched. Returns the forced configurations."""
    forced = case.forced()
    with configs.override(**forced):
        check_attention(q, k, v, dout=dout, **options)
    spy.assert_forced(forced)
    return forced


def assert_bitwise_equal(first: dict, second: dict, what: str) -> None:
    for name in NAMES:
        a, b = first[name], second[name]
        assert torch.equal(a, b), (
            f"{name} differs between {what}: max |diff| {(a.double() - b.double()).abs().max().item():.3e}")


@dataclass
class Launch:
    kernel: str
    config: KernelConfig
    source: str


@dataclass
class Grid:
    config: KernelConfig | None
    use_tma: bool
    programs: int
    tiles: int


class Spy:
    """What the launchers chose: each ``select_config`` answer, each ``grid_and_arguments`` result (the
    TMA switch after the layout check, and the programs of the grid), and each GQA head split count."""

    def __init__(self, monkeypatch):
        self.launches: list[Launch] = []
        self.grids: list[Grid] = []
        self.head_splits: list[int] = []
        select, grid_and_arguments, head_splits = (
            configs.select_config, configs.grid_and_arguments, configs.gqa_head_splits)

        def spy_select(kernel, *args, **kwargs):
            config, source = select(kernel, *args, **kwargs)
            self.launches.append(Launch(kernel, config, source))
            return config, source

        def spy_grid(config, launch_options, rows, batch_heads, block_key, tensors, device_index=0, num_seqs=None):
            result = grid_and_arguments(config, launch_options, rows, batch_heads, block_key, tensors, device_index,
                                        num_seqs)
            _, (_, programs), options = result
            blocks = (-(-rows // options[block_key]) if num_seqs is None
                      else configs.packed_tiles(rows, num_seqs, options[block_key]))
            tiles = blocks * batch_heads
            self.grids.append(Grid(config, bool(options.get("USE_TMA")), programs, tiles))
            return result

        def spy_splits(*args, **kwargs):
            splits = head_splits(*args, **kwargs)
            self.head_splits.append(splits)
            return splits

        monkeypatch.setattr(configs, "select_config", spy_select)
        monkeypatch.setattr(configs, "grid_and_arguments", spy_grid)
        monkeypatch.setattr(configs, "gqa_head_splits", spy_splits)

    def assert_forced(self, forced: dict[str, KernelConfig]) -> None:
        """Every kernel of ``forced`` launched, and only with its forced configuration."""
        seen = {(launch.kernel, launch.config, launch.source) for launch in self.launches}
        assert seen == {(kernel, config, "override") for kernel, config in forced.items()}, seen

    def clear(self) -> None:
        self.launches.clear()
        self.grids.clear()
        self.head_splits.clear()


@pytest.fixture
def spy(monkeypatch):
    return Spy(monkeypatch)


def set_sm_count(monkeypatch, count: int) -> None:
    """The SM count persistent grids and GQA head splits are sized by: the interpreter's, and on a GPU the
    cached count of device 0 (``configs.sm_count`` reads that cache first)."""
    monkeypatch.setattr(configs, "INTERPRETER_SM_COUNT", count)
    if DEVICE == "cuda":
        monkeypatch.setitem(configs._sm_counts, 0, count)


# --- every space entry, through the masking paths ---------------------------------------------------------

# Each case forces one configuration of each kernel. The first of each bucket is Hopper's default triple,
# the second Ampere's (the first entries of their spaces); the others pair up the remaining plain
# entries. The variant entries (tma, persistent, ws, split) have tests of their own below.
SPACE_CASES = [
    # Head dims <= 64.
    Case("sm_90a-default-64-causal-sq<sk", "128x128", "32x128", "128x64", (1, 2, 2, 129, 257, 64, 64),
         dict(causal=True)),
    Case("sm_80-default-64-window-gqa41-d40", "128x128", "32x64", "32x64", (1, 4, 1, 127, 257, 40, 40),
         dict(window_size=(50, 10))),
    Case("64-bias-softcap-dv40", "128x64", "32x128", "32x128", (2, 2, 2, 65, 63, 64, 40),
         dict(softcap=20.0), bias="full"),
    Case("64-mask-gqa42-bf16", "64x64", "32x64", "64x64", (1, 4, 2, 63, 65, 64, 64),
         bias="mask", dtype=torch.bfloat16),
    # Head dims 65..128.
    Case("sm_90a-default-128-causal-sq>sk", "128x64", "32x128", "128x32", (1, 2, 2, 257, 129, 128, 128),
         dict(causal=True)),
    Case("sm_80-default-128-wide-window-d96-softcap", "128x64", "32x64", "32x64", (1, 2, 2, 257, 255, 96, 96),
         dict(window_size=(250, 20), softcap=5.0)),
    Case("128-window-gqa41-d72-dv128", "64x64", "64x64", "128x64", (1, 4, 1, 129, 65, 72, 128),
         dict(window_size=(40, 0))),
    Case("128-broadcast-bias-dv64", "128x64", "64x64", "64x32", (2, 2, 2, 65, 63, 128, 64),
         bias="broadcast"),
    Case("128-mask-gqa42-causal", "64x64", "32x128", "64x64", (1, 4, 2, 129, 63, 128, 128),
         dict(causal=True), bias="mask"),
    # Head dims 129..256: a couple of blocks.
    Case("sm_90a-default-256-causal", "64x64", "32x128 split", "128x32", (1, 2, 2, 129, 127, 256, 256),
         dict(causal=True)),
    Case("sm_80-default-256-window-gqa42-d200", "64x64", "32x32", "32x32", (1, 4, 2, 63, 65, 200, 256),
         dict(window_size=(20, 5))),
    Case("256-mask-softcap-dv144", "64x32", "32x32", "128x32", (1, 1, 1, 65, 33, 256, 144),
         dict(softcap=10.0), bias="mask"),
]


@pytest.mark.parametrize("case", params(SPACE_CASES))
def test_space_entries(case, spy):
    skip_if_not_for_this_device(case)
    check_forced(case, spy, *build(case))


# --- TMA: descriptors where the layout allows them, pointers where it does not -----------------------------

def strided_inputs(case: Case):
    """q, k, v of ``case`` as views at an odd element offset in rows of odd length: neither the start nor the
    row stride is a multiple of 16 bytes, and the last dim is still contiguous (so nothing is copied)."""
    batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, head_dim_v = case.shape
    generator = torch.Generator().manual_seed(7)

    def view(heads, rows, width):
        base = torch.randn(batch, heads, rows, width + 3, generator=generator).to(DEVICE, case.dtype)
        return base[..., 1:width + 1].detach().requires_grad_()

    return view(heads_q, seqlen_q, head_dim), view(heads_kv, seqlen_k, head_dim), view(heads_kv, seqlen_k, head_dim_v)


TMA_CASES = [
    # Head dim 40: an aligned layout (80-byte rows) read through descriptors into a padded 64-wide tile.
    (Case("aligned-64-causal-d40", "128x128 tma", "32x128 tma", "128x64 tma", (1, 2, 2, 129, 127, 40, 40),
          dict(causal=True)), True),
    (Case("aligned-128-window-gqa42-dv72", "128x64 tma", "32x128 tma", "128x32 tma", (1, 4, 2, 127, 129, 128, 72),
          dict(window_size=(60, -1))), True),
    # No dK/dV TMA entry at 256: the bucket's default (split) runs with the TMA forward and dQ.
    (Case("aligned-256-softcap", "64x64 tma", "32x128 split", "128x32 tma", (1, 1, 1, 129, 63, 256, 256),
          dict(softcap=15.0)), True),
    # 59 halves = 118-byte rows: the launcher must fall back to pointer tiles.
    (Case("unaligned-64-head-dim-59", "128x128 tma", "32x128 tma", "128x64 tma", (1, 2, 2, 127, 129, 59, 59),
          dict(causal=True), bias="full"), False),
    (Case("unaligned-128-strided-views", "128x64 tma", "32x128 tma", "128x32 tma", (1, 2, 1, 129, 127, 128, 128),
          dict(window_size=(30, 30))), False),
]


@pytest.mark.parametrize("case,aligned", [pytest.param(case, aligned, id=case.id) for case, aligned in TMA_CASES])
def test_tma(case, aligned, spy):
    skip_if_not_for_this_device(case)
    q, k, v, dout, options = build(case)
    if case.id.endswith("strided-views"):
        q, k, v = strided_inputs(case)
        assert q.stride(-1) == 1 and not q.is_contiguous()
    # The case is what it claims to be: descriptors can (or cannot) describe these tensors.
    assert configs.tma_layout_ok(q, k, v, dout) == aligned
    check_forced(case, spy, q, k, v, dout, options)
    tma_grids = [grid for grid in spy.grids if grid.config.tma]
    assert tma_grids, "no launch used a TMA configuration"
    # Aligned: every TMA configuration kept its descriptors; unaligned: each fell back to pointers.
    assert all(grid.use_tma == aligned for grid in tma_grids), [(g.config.label, g.use_tma) for g in tma_grids]


# --- persistent grids: any SM count, the same bits -----------------------------------------------------

# Hq == Hkv: with grouped heads the dK/dV kernel's head splits depend on the SM count too, and split
# partial sums are added in float32, so the bits would (legitimately) change with it.
PERSISTENT_CASES = [
    Case("64-causal", "128x128 tma persistent", "32x128 tma persistent", "128x64 tma persistent",
         (2, 2, 2, 129, 127, 64, 64), dict(causal=True)),
    # No persistent dK/dV entry at 128 or 256; those buckets' forward and dQ entries are the point.
    Case("128-window-d72", "128x64 tma persistent", "32x128 tma", "128x32 tma persistent",
         (2, 2, 2, 127, 129, 72, 72), dict(window_size=(25, 40))),
    Case("256-bias", "64x64 tma persistent", "32x128 split", "128x32 tma", (1, 2, 2, 65, 63, 256, 256),
         bias="full"),
]
SM_COUNTS = (1, 3, 7)


@pytest.mark.parametrize("case", params(PERSISTENT_CASES))
def test_persistent_grid_gives_the_same_bits_for_any_sm_count(case, spy, monkeypatch):
    skip_if_not_for_this_device(case)
    forced = case.forced()
    q, k, v, dout, options = build(case)
    results = {}
    with configs.override(**forced):
        for count in SM_COUNTS:
            set_sm_count(monkeypatch, count)
            spy.clear()
            results[count] = (checked(q, k, v, dout, **options) if count == SM_COUNTS[0]
                              else kernel_results(q, k, v, dout, **options))
            spy.assert_forced(forced)
            persistent = [grid for grid in spy.grids if grid.config.persistent]
            assert persistent, "no launch used a persistent configuration"
            for grid in persistent:
                # One program per SM, never more than there are tiles; with 1 SM one program walks all.
                assert grid.programs == min(count, grid.tiles), (grid, count)
            assert set(spy.head_splits) <= {1}
    for count in SM_COUNTS[1:]:
        assert_bitwise_equal(results[SM_COUNTS[0]], results[count], f"{SM_COUNTS[0]} and {count} SMs")


# --- dK/dV in two passes -------------------------------------------------------------------------------

SPLIT_CASES = [
    Case("256-gqa42-window-dv200", "64x64", "32x128 split", "128x32", (1, 4, 2, 65, 127, 256, 200),
         dict(window_size=(30, 30))),
    # Not a space entry at this head dim: the split passes at a small (padded) head dim.
    Case("40-bias-softcap", "128x128", KernelConfig(32, 128, 8, 2, split_dkdv=True), "128x64",
         (1, 2, 2, 127, 129, 40, 64), dict(softcap=8.0, causal=True), bias="broadcast"),
]


@pytest.mark.parametrize("case", params(SPLIT_CASES))
def test_split_dkdv(case, spy, monkeypatch):
    skip_if_not_for_this_device(case)
    forced = case.forced()
    assert forced["backward_dkdv"].split_dkdv
    parts = []
    original = backward.dkdv_parts
    monkeypatch.setattr(backward, "dkdv_parts", lambda config: parts.append(original(config)) or parts[-1])
    check_forced(case, spy, *build(case))
    # The dK/dV kernel really ran twice: dV alone, then dK alone.
    assert parts == [[dict(COMPUTE_DK=False, COMPUTE_DV=True), dict(COMPUTE_DK=True, COMPUTE_DV=False)]]


# --- GQA head splits -------------------------------------------------------------------------------------

# Hq = 8 on one K/V head and one key block: one dK/dV program for many SMs, so the group is split. With
# 64 SMs each share is one query head; with 3, the shares hold 3, 3 and 2 heads (an uneven last share).
GQA_CASES = [
    (Case("default-64-sm64", "128x128", "32x128", "128x64", (1, 8, 1, 129, 127, 64, 64), dict(causal=True)), 64),
    (Case("default-64-sm3-uneven", "128x128", "32x128", "128x64", (1, 8, 1, 129, 127, 64, 64),
          dict(window_size=(70, 0))), 3),
    (Case("persistent-64-sm64", "128x128", "32x128 tma persistent", "128x64", (1, 8, 1, 127, 129, 64, 64),
          dict(causal=True)), 64),
]


@pytest.mark.parametrize("case,sm_count", [pytest.param(c, n, id=c.id) for c, n in GQA_CASES])
def test_gqa_head_splits(case, sm_count, spy, monkeypatch):
    skip_if_not_for_this_device(case)
    forced = case.forced()
    batch, heads_q, heads_kv, _, seqlen_k, _, _ = case.shape
    key_programs = -(-seqlen_k // forced["backward_dkdv"].block_n) * batch * heads_kv
    q, k, v, dout, options = build(case)
    with configs.override(**forced):
        set_sm_count(monkeypatch, sm_count)
        expected_splits = configs.gqa_head_splits(key_programs, heads_q // heads_kv)
        assert expected_splits > 1
        spy.clear()
        split = checked(q, k, v, dout, **options)
        assert spy.head_splits == [expected_splits]  # the backward took the split path
        again = kernel_results(q, k, v, dout, **options)
        assert spy.head_splits == [expected_splits] * 2
        assert_bitwise_equal(split, again, "two split runs")

        set_sm_count(monkeypatch, 1)
        spy.clear()
        unsplit = kernel_results(q, k, v, dout, **options)
        assert spy.head_splits == [1]
    spy.assert_forced(forced)
    # Both are judged against the float64 truth, and the split and unsplit results differ by no more
    # than the policy's bound for this case.
    truth, lowp = references(q, k, v, dout, **options)
    for name in NAMES:
        assert_close(name, unsplit[name], truth[name], lowp[name], factor=FACTORS[name])
        bound = compare(name, split[name], truth[name], lowp[name], factor=FACTORS[name]).bound
        a, b = split[name].double(), unsplit[name].double()
        # Equal values (the -inf lse of rows that see no key included) differ by 0, NaN counts as inf.
        difference = torch.where(a == b, 0.0, (a - b).abs()).nan_to_num(nan=float("inf")).max().item()
        assert difference <= bound, f"{name}: split and unsplit differ by {difference:.3e} > bound {bound:.3e}"


# --- warp-specialised loops ----------------------------------------------------------------------------

WS_CASES = [
    Case("64-window-sq<sk", "128x128 tma ws", "32x128 tma ws", "128x64 tma ws", (1, 2, 2, 127, 129, 64, 64),
         dict(window_size=(100, 3))),
    Case("128-causal-gqa41", "128x64 tma ws", "32x128 tma ws", "128x32 tma ws", (1, 4, 1, 129, 127, 128, 128),
         dict(causal=True)),
    # No dK/dV ws entry at 256: the bucket's default (split) runs with the ws forward and dQ.
    Case("256-bias-sq>sk", "64x64 tma ws", "32x128 split", "128x32 tma ws", (1, 1, 1, 65, 63, 256, 256),
         bias="full"),
    # Head dim 59 cannot be read through descriptors: warp-specialised loops over pointer tiles.
    Case("64-pointer-tiles-d59-mask", "128x128 tma ws", "32x128 tma ws", "128x64 tma ws",
         (1, 2, 2, 129, 127, 59, 59), dict(causal=True), bias="mask"),
]


@pytest.mark.parametrize("case", params(WS_CASES))
def test_warp_specialize(case, spy):
    skip_if_not_for_this_device(case)
    forced = check_forced(case, spy, *build(case))
    assert any(config.warp_specialize for config in forced.values())


# --- coverage ------------------------------------------------------------------------------------------

ALL_CASES = [*SPACE_CASES, *(case for case, _ in TMA_CASES), *PERSISTENT_CASES, *SPLIT_CASES,
             *(case for case, _ in GQA_CASES), *WS_CASES]


def test_every_space_entry_is_exercised():
    """Each entry of both architectures' spaces (modulo warps and stages) is forced by some case above, and
    every tile a case names is an entry of its bucket's space (no stale names)."""
    covered = set().union(*(case.covered() for case in ALL_CASES))
    spaces = space_keys()
    assert not spaces - covered, f"space entries no test forces: {sorted(spaces - covered)}"
    assert not covered - spaces, f"cases name tiles no space holds: {sorted(covered - spaces)}"

