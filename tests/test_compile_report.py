"""``flash-softmax compile-report``: every kernel configuration in the autotune space compiles for sm_80 and
sm_90a without register spills and within the architecture's shared memory. No GPU is needed: Triton
compiles for a named target and its bundled ptxas reports the resources."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from flash_softmax.attention import configs

HEAD_DIMS = (64, 128, 256)


def _compiled_environment() -> dict:
    """The report needs compiled kernels: run it without the interpreter."""
    return {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}


def _run(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flash_softmax", *arguments],
        env=_compiled_environment(), capture_output=True, text=True, timeout=1200,
    )


def test_autotune_space_neither_spills_nor_overflows_shared_memory():
    result = _run("compile-report", "--archs", "sm_80", "sm_90a", "--dtypes", "bfloat16",
                  "--head-dims", *map(str, HEAD_DIMS))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    lines = [line for line in result.stdout.splitlines() if line.startswith("attention_")]
    assert lines and all(line.endswith("ok") for line in lines), output
    # Every kernel keeps at least one configuration for every head-dim bucket on both architectures.
    for kernel in ("attention_forward", "attention_backward_dkdv", "attention_backward_dq"):
        for arch in ("sm_80", "sm_90a"):
            for head_dim in HEAD_DIMS:
                assert any(line.split()[:2] == [kernel, arch] and f"D={head_dim} " in line for line in lines), (
                    f"{kernel} on {arch} has no configuration for head dim {head_dim}"
                )


def test_report_detects_a_spilling_configuration():
    """The check can fail: a dK/dV tile too large for the registers is reported as spilling."""
    script = (
        "from flash_softmax import compile_report as cr\n"
        "name, kernel, _ = cr.attention_kernels()[1]\n"
        "constexprs = {**cr.attention_constexprs(256, True), 'BLOCK_M': 64, 'BLOCK_N': 128}\n"
        "registers, spills, shared = cr.compile_one(kernel, constexprs, 'bf16', 'sm_90a', 4, 2)\n"
        "print(registers, spills, shared)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=_compiled_environment(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    registers, spills, shared = map(int, result.stdout.split())
    assert registers == 255 and spills > 0


@pytest.mark.parametrize("spaces", [configs.FORWARD_SPACES, configs.BACKWARD_SPACES], ids=["forward", "backward"])
@pytest.mark.parametrize("head_dim", [1, 40, 64, 65, 128, 200, 256])
def test_default_configuration_is_the_first_of_its_bucket_that_fits(spaces, head_dim):
    """Without autotuning a launch uses the first configuration of its head-dim bucket that fits the
    device's shared memory: fixed per shape, so two processes run the same tiles in the same order."""
    bucket = spaces[configs.head_dim_bucket(head_dim, head_dim)]
    everything = configs.space_configs(spaces)
    on_hopper = configs.prune_for(everything, spaces, head_dim, head_dim, 2, 232_448)[0]
    assert configs._shape(on_hopper) == bucket[0]
    on_ampere_float32 = configs.prune_for(everything, spaces, head_dim, head_dim, 4, 166_912)[0]
    assert configs._shape(on_ampere_float32) in bucket
