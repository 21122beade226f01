"""Compile every kernel for sm_80 and sm_90a without a GPU and report registers, spills and shared memory.

Triton compiles for a named target with no device present, and its bundled ``ptxas`` assembles the
PTX, so a CPU-only machine can see what each configuration of the autotune space costs: registers per
thread, bytes spilled to local memory, and the dynamic shared memory the launch will request. The
autotune space in ``flash_softmax/attention/configs.py`` is pruned with this report: a configuration that
spills or does not fit an architecture's shared memory has no place there.

This must run with compiled kernels, i.e. without ``TRITON_INTERPRET`` (the CLI makes sure of that).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from flash_softmax.attention import backward as attention_backward
from flash_softmax.attention import configs as attention_configs
from flash_softmax.attention import forward as attention_forward

#: Compute capability and the most dynamic shared memory one block may request (bytes, opt-in limit).
ARCHITECTURES = {
    "sm_80": (80, 166_912),  # A100: 163 KB
    "sm_90a": (90, 232_448),  # H100 / H200: 227 KB
}
DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
_FLOAT_ARGUMENTS = {"softmax_scale", "qk_scale", "softcap_scale", "softcap_log2"}
_STATISTICS_POINTERS = {"LSE", "Delta"}  # float32, float64 for float64 inputs


@dataclass
class Report:
    """Resources of one compiled configuration."""

    kernel: str
    arch: str
    dtype: str
    head_dim: int
    config: str
    registers: int = -1
    spill_bytes: int = -1
    shared_bytes: int = -1
    shared_limit: int = 0
    error: str = ""
    flags: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.error and self.spill_bytes == 0 and self.shared_bytes <= self.shared_limit

    @property
    def verdict(self) -> str:
        if self.error:
            return "error"
        problems = []
        if self.spill_bytes:
            problems.append("spills")
        if self.shared_bytes > self.shared_limit:
            problems.append("shared memory")
        return ", ".join(problems) or "ok"


def _signature(jit_function, constexprs: dict, dtype: str) -> dict:
    """Triton type strings for every argument of an attention kernel."""
    signature = {}
    for name in jit_function.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _STATISTICS_POINTERS:
            signature[name] = "*fp64" if dtype == "fp64" else "*fp32"
        elif name[0].isupper() and not name.endswith("_BUCKET"):
            signature[name] = f"*{dtype}"
        elif name in _FLOAT_ARGUMENTS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def _ptxas_usage(ptx: str, arch: str) -> tuple[int, int]:
    """``(registers, spilled bytes)`` from Triton's bundled ptxas run on ``ptx`` for ``arch``."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        result = subprocess.run(
            [ptxas, "-v", f"--gpu-name={arch}", source, "-o", os.path.join(folder, "kernel.cubin")],
            capture_output=True, text=True, check=True,
        )
    log = result.stdout + result.stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return registers, spills


def _alignment(jit_function, signature: dict, strides_aligned: bool) -> dict:
    """The divisibility-by-16 facts a real launch gives Triton: torch allocations are 16-byte aligned, and
    the strides of a contiguous layout are multiples of 16 when the head dim is. Without them Triton
    cannot vectorise loads, and the report would describe a kernel no launch ever runs."""
    aligned = []
    for index, name in enumerate(jit_function.arg_names):
        if signature[name].startswith("*") or (strides_aligned and name.startswith("stride_")):
            aligned.append((index,))
    return {path: [["tt.divisibility", 16]] for path in aligned}


def compile_one(jit_function, constexprs: dict, dtype: str, arch: str, num_warps: int, num_stages: int):
    """Compile one kernel configuration for ``arch``; return ``(registers, spill bytes, shared bytes)``."""
    capability, _ = ARCHITECTURES[arch]
    signature = _signature(jit_function, constexprs, dtype)
    strides_aligned = constexprs["HEAD_DIM"] % 16 == 0 and constexprs["HEAD_DIM_V"] % 16 == 0
    source = ASTSource(fn=jit_function, signature=signature, constexprs=constexprs,
                       attrs=_alignment(jit_function, signature, strides_aligned))
    compiled = triton.compile(
        source, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    registers, spills = _ptxas_usage(compiled.asm["ptx"], arch)
    return registers, spills, compiled.metadata.shared


def attention_kernels():
    """``(name, jit function, autotune spaces per head-dim bucket)`` of the autotuned attention kernels."""
    return [
        ("attention_forward", attention_forward._attn_fwd_kernel, attention_configs.FORWARD_SPACES),
        ("attention_backward_dkdv", attention_backward._attn_bwd_dkdv_kernel, attention_configs.BACKWARD_SPACES),
        ("attention_backward_dq", attention_backward._attn_bwd_dq_kernel, attention_configs.BACKWARD_SPACES),
    ]


def attention_constexprs(head_dim: int, causal: bool) -> dict:
    """Compile-time switches of a plain (optionally causal) attention call in a 16- or 32-bit dtype."""
    width = attention_configs.padded_head_dim(head_dim)
    return dict(
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim, BLOCK_D=width, BLOCK_DV=width,
        HAS_LEFT=False, HAS_RIGHT=causal, HAS_SOFTCAP=False, BIAS_KIND=0, ACC_DTYPE=tl.float32, UPCAST=False,
    )


def run_reports(archs, dtypes, head_dims, kernels=None, causal: bool = True, pruned: bool = True, progress=None):
    """Compile every configuration of each kernel's space (after pruning, when ``pruned``) and report it."""
    reports = []
    for name, jit_function, spaces in attention_kernels():
        if kernels and name not in kernels:
            continue
        for arch in archs:
            _, shared_limit = ARCHITECTURES[arch]
            for dtype in dtypes:
                element_size = 4 if dtype == "float32" else 2
                for head_dim in head_dims:
                    configs = attention_configs.space_configs(spaces)
                    if pruned:
                        configs = attention_configs.prune_for(
                            configs, spaces, head_dim, head_dim, element_size, shared_limit
                        )
                    for config in configs:
                        constexprs = {**attention_constexprs(head_dim, causal), **config.kwargs}
                        label = (f"BLOCK_M={config.kwargs['BLOCK_M']} BLOCK_N={config.kwargs['BLOCK_N']} "
                                 f"warps={config.num_warps} stages={config.num_stages}")
                        report = Report(name, arch, dtype, head_dim, label, shared_limit=shared_limit)
                        try:
                            report.registers, report.spill_bytes, report.shared_bytes = compile_one(
                                jit_function, constexprs, DTYPES[dtype], arch, config.num_warps, config.num_stages
                            )
                        except Exception as error:  # a configuration that does not compile is reported
                            report.error = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
                        reports.append(report)
                        if progress is not None:
                            progress(report)
    return reports


def format_report(report: Report) -> str:
    return (f"{report.kernel:<24} {report.arch:<6} {report.dtype:<8} D={report.head_dim:<3} {report.config:<44} "
            f"regs={report.registers:>3} spill={report.spill_bytes:>5}B "
            f"smem={report.shared_bytes:>6}/{report.shared_limit}B  {report.verdict}"
            + (f"  {report.error}" if report.error else ""))


def run(args) -> int:
    """``flash-softmax compile-report``: print one line per configuration; exit 1 if a kept one is bad."""
    print(f"Compiling with Triton {triton.__version__} and its bundled ptxas (no GPU needed).", flush=True)
    reports = run_reports(
        args.archs, args.dtypes, args.head_dims, kernels=args.kernels, causal=args.causal,
        pruned=not args.unpruned, progress=lambda report: print(format_report(report), flush=True),
    )
    bad = [report for report in reports if not report.ok]
    print(f"{len(reports)} configurations compiled, {len(bad)} spill, exceed shared memory or fail.")
    return 1 if bad and not args.unpruned else 0
