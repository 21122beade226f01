"""``flash-softmax compile-report``: the kernel configurations compile for sm_80 and sm_90a without register
spills and within the architecture's shared memory, and on sm_90a to wide wgmma (HGMMA with N > 16). No GPU
is needed: Triton compiles for a named target, its bundled ptxas reports the resources and its cuobjdump
disassembles the cubin."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from flash_softmax.attention import configs

HEAD_DIMS = (64, 128, 256)
SHARED_LIMITS = {"sm_80": 166_912, "sm_90a": 232_448}
_LINE = re.compile(
    r"^(?P<kernel>forward|backward_dkdv|backward_dq)\s+"
    r"(?P<arch>\S+)\s+(?P<dtype>\S+)\s+(?P<causal>causal|noncausal)\s+"
    r"D=(?P<head_dim>\d+)\s+(?P<config>.+?)\s+regs=\s*(?P<registers>-?\d+) spill=\s*(?P<spills>-?\d+)B "
    r"smem=\s*(?P<shared>-?\d+)/(?P<limit>\d+)B\s+(?P<mma>wgmma|mma\.sync only|no MMA)\s+HGMMA=(?P<shapes>\S+) "
    r".*?  (?P<verdict>\S.*)$"
)


def _compiled_environment() -> dict:
    """The report needs compiled kernels: run it without the interpreter."""
    return {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}


def _report(*arguments: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run ``flash-softmax compile-report`` and parse its lines."""
    result = subprocess.run(
        [sys.executable, "-m", "flash_softmax", "compile-report", *arguments],
        env=_compiled_environment(), capture_output=True, text=True, timeout=600,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith(configs.KERNEL_NAMES)]
    parsed = []
    for line in lines:
        match = _LINE.match(line)
        assert match is not None, f"unparsable report line: {line!r}"
        parsed.append({**match.groupdict(), "line": line})
    return result, parsed


def _narrow_share(shapes: str) -> float:
    """Share of HGMMA instructions with N <= 16, from ``64x32x16:32,64x128x16:4``."""
    counts = {shape: int(count) for shape, count in (item.split(":") for item in shapes.split(","))}
    narrow = sum(count for shape, count in counts.items() if int(shape.split("x")[1]) <= 16)
    return narrow / sum(counts.values())


def _labels(config: configs.KernelConfig) -> list[str]:
    """The report lines one configuration gives: a split dK/dV configuration compiles as two launches."""
    return [f"{config.label} [dv]", f"{config.label} [dk]"] if config.split_dkdv else [config.label]


def _assert_wide_wgmma_without_spills(row: dict) -> None:
    line = row["line"]
    assert row["mma"] == "wgmma", f"no HGMMA (shapes {row['shapes']}): {line}"
    assert _narrow_share(row["shapes"]) <= 0.5, f"mostly HGMMA with N <= 16 (shapes {row['shapes']}): {line}"
    assert int(row["spills"]) == 0, f"spills (HGMMA shapes {row['shapes']}): {line}"
    assert 0 <= int(row["shared"]) <= int(row["limit"]), f"shared memory (HGMMA shapes {row['shapes']}): {line}"
    assert row["verdict"] == "ok", line


def test_default_hopper_configurations_use_wide_wgmma_without_spilling():
    """The configuration every launch on an H100/H200 uses without a tuned table, for each kernel, head-dim
    bucket, 16-bit dtype and causality: wgmma, not mostly N <= 16 slivers, no spills, within shared memory."""
    result, rows = _report("--defaults-only", "--archs", "sm_90a", "--dtypes", "bfloat16", "float16",
                           "--causal", "false", "true", "--head-dims", *map(str, HEAD_DIMS))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    expected = sorted(
        (kernel, dtype, causal, str(head_dim), label)
        for kernel in configs.KERNEL_NAMES for dtype in ("bfloat16", "float16") for causal in ("causal", "noncausal")
        for head_dim in HEAD_DIMS
        for label in _labels(configs.default_config(kernel, head_dim, head_dim, 2, shared_limit=232_448,
                                                    arch="sm_90a"))
    )
    assert sorted((r["kernel"], r["dtype"], r["causal"], r["head_dim"], r["config"]) for r in rows) == expected, output
    for row in rows:
        _assert_wide_wgmma_without_spills(row)


def test_pruned_spaces_compile_spill_free_and_to_wgmma_on_hopper():
    """Every configuration the pruning keeps, in bfloat16: spill-free and within shared memory on sm_80 and
    sm_90a, and on sm_90a wgmma that is not mostly N <= 16."""
    result, rows = _report("--archs", "sm_80", "sm_90a", "--dtypes", "bfloat16", "--head-dims", *map(str, HEAD_DIMS))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    expected = sorted(
        (kernel, arch, str(head_dim), label)
        for kernel in configs.KERNEL_NAMES for arch in SHARED_LIMITS for head_dim in HEAD_DIMS
        for config in configs.prune(kernel, head_dim, head_dim, 2, SHARED_LIMITS[arch], arch=arch)
        for label in _labels(config)
    )
    assert sorted((r["kernel"], r["arch"], r["head_dim"], r["config"]) for r in rows) == expected, output
    for row in rows:
        if row["arch"] == "sm_90a":
            _assert_wide_wgmma_without_spills(row)
        else:
            assert int(row["spills"]) == 0 and row["verdict"] == "ok", row["line"]


def test_report_flags_mma_sync_and_small_wgmma():
    """The check can fail: on sm_90a a dQ tile of 32 query rows falls back to mma.sync, and a dK/dV tile
    of 16 query rows at D=256 runs mostly 64x8x16 wgmma; neither is ok."""
    script = (
        "import json\n"
        "from flash_softmax import compile_report as cr\n"
        "from flash_softmax.attention.configs import KernelConfig\n"
        "reports = (cr.reports_for('backward_dq', KernelConfig(32, 64, 8, 2), 'sm_90a', 'bfloat16', 128, True)\n"
        "           + cr.reports_for('backward_dkdv', KernelConfig(16, 64, 8, 2), 'sm_90a', 'bfloat16', 256, True))\n"
        "print(json.dumps([dict(mma=r.mma, small=r.small_wgmma, ok=r.ok, verdict=r.verdict, hmma=r.hmma,\n"
        "                       shapes=r.hgmma_shapes, error=r.error) for r in cr.compile_reports(reports, jobs=2)]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=_compiled_environment(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    mma_sync, small = json.loads(result.stdout)
    assert mma_sync["mma"] == "mma.sync only" and mma_sync["hmma"] > 0 and not mma_sync["shapes"], mma_sync
    assert not mma_sync["ok"] and "no wgmma" in mma_sync["verdict"], mma_sync
    narrow = sum(count for shape, count in small["shapes"].items() if int(shape.split("x")[1]) <= 16)
    assert small["mma"] == "wgmma" and 2 * narrow > sum(small["shapes"].values()), small
    assert small["small"] and not small["ok"] and "small wgmma" in small["verdict"], small


@pytest.mark.parametrize("kernel", configs.KERNEL_NAMES)
@pytest.mark.parametrize("arch", sorted(SHARED_LIMITS))
@pytest.mark.parametrize("head_dim", [1, 40, 64, 65, 128, 200, 256])
def test_default_configuration_is_the_first_of_its_bucket_that_fits(kernel, arch, head_dim):
    """Without a tuned table a launch uses the first configuration of its head-dim bucket that fits the
    device's shared memory: fixed per shape, so two processes run the same tiles in the same order."""
    bucket = configs.SPACES[arch][kernel][configs.head_dim_bucket(head_dim, head_dim)]
    # 16-bit dtypes on the architecture's shared memory, and float32 on a smaller one (where wide heads fit
    # no entry, and the small fallback configuration is used).
    for element_size, limit in ((2, SHARED_LIMITS[arch]), (4, 101_376)):
        fitting = [c for c in bucket if configs.fits(kernel, c, head_dim, head_dim, element_size, limit)]
        expected = fitting[0] if fitting else configs.small_config(kernel, head_dim, head_dim)
        chosen = configs.default_config(kernel, head_dim, head_dim, element_size, shared_limit=limit, arch=arch)
        assert chosen == expected, (element_size, limit)


def test_decode_kernel_compiles_spill_free_on_hopper():
    """The decode kernel's tiles (decode_config's 16-, 32- and 64-row ones) at D=128 in bfloat16, over contiguous
    and paged caches, split or not, with every score modifier on: no spills within shared memory on sm_90a,
    cp.async loads of the cache, and wgmma once the tile has 64 rows (below it, mma.sync, which a decode
    kernel streaming the cache can afford)."""
    script = (
        "import json\n"
        "from flash_softmax import compile_report as cr\n"
        "if __name__ == '__main__':\n"
        "    reports = cr.run_reports(['sm_90a'], ['bfloat16'], [128], kernels=['decode'], jobs=2)\n"
        "    print(json.dumps([dict(config=r.config, ok=r.ok, verdict=r.verdict, spills=r.spill_bytes, mma=r.mma,\n"
        "                           ldgsts=r.ldgsts, rows=r.launch.block_m) for r in reports]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=_compiled_environment(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    reports = json.loads(result.stdout)
    assert len(reports) == 12, reports  # three tiles x (contiguous, paged) x (split or not)
    for report in reports:
        assert report["ok"] and report["spills"] == 0 and report["ldgsts"] > 0, report
        assert report["mma"] == ("wgmma" if report["rows"] == 64 else "mma.sync only"), report
