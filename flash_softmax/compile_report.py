"""Compile every attention kernel configuration for sm_80 and sm_90a without a GPU, and report what it costs
and which instructions it runs.

Triton compiles for a named target with no device present, and the tools bundled with it (``ptxas``,
``cuobjdump``) read the result, so a CPU-only machine can see, per configuration of each kernel's space in
``flash_softmax/attention/configs.py``:

- registers per thread and bytes spilled to local memory (``ptxas -v`` on the PTX);
- the dynamic shared memory the launch will request (``compiled.metadata.shared``);
- the instruction mix of the SASS (``cuobjdump -sass`` on the cubin): ``HGMMA`` (wgmma, Hopper's
  warpgroup MMA) with the histogram of its ``MxNxK`` shapes, ``HMMA`` (mma.sync), ``UTMALDG`` /
  ``UTMASTG`` (TMA loads and stores) and ``LDGSTS`` (cp.async).

From the instructions comes the MMA verdict: ``wgmma`` (some HGMMA), ``mma.sync only`` (HMMA and no HGMMA)
or ``no MMA``. A wgmma kernel whose HGMMA instructions are mostly ``64xNx16`` with N <= 16 is flagged as
*small wgmma*: such slivers of a product run the tensor cores at a fraction of their rate.

A configuration is ok when it compiles, spills nothing and fits the architecture's shared memory; on
sm_90a a 16-bit kernel (they are all matmul kernels) must in addition use wgmma and not be small-wgmma,
since Triton silently falls back to mma.sync when a tile shape does not suit wgmma. The spaces are pruned
with this report, and the test suite checks that every configuration they keep is ok.

A dK/dV configuration with ``split_dkdv`` is launched twice (dV, then dK: ``backward.dkdv_parts``) and is
reported as its two compiled parts.

The decode kernel (``decode``, ``flash_attention_with_kvcache``; asked for by name, it is not in the default
set) is reported per row tile that ``decode.decode_config`` picks (16, 32 and 64 query rows), each over a
contiguous and a paged cache, with and without split-KV, and with every score modifier on (the most
registers). It streams the cache once and its row tile is often a single group's 16 rows, below the 64 that
wgmma needs, so it is held to compiling without spills within shared memory, not to wgmma. Compilation runs in worker processes, one configuration per task.

This must run with compiled kernels, i.e. without ``TRITON_INTERPRET`` (the CLI makes sure of that).
"""

from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from flash_softmax.attention import backward, decode, forward
from flash_softmax.attention import configs as attention_configs

#: Compute capability and the most dynamic shared memory one block may request (bytes, opt-in limit).
ARCHITECTURES = {
    "sm_80": (80, 166_912),  # A100: 163 KB
    "sm_90a": (90, 232_448),  # H100 / H200: 227 KB
}
DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
#: dtypes whose matmuls must run on wgmma on sm_90a for a configuration to be ok.
WGMMA_DTYPES = ("float16", "bfloat16")
#: Which configurations of a space a report covers.
SELECTIONS = ("defaults", "pruned", "unpruned")
_FLOAT_ARGUMENTS = {"softmax_scale", "qk_scale", "softcap_scale", "softcap_log2", "dropout_scale"}
_STATISTICS_POINTERS = {"LSE", "Delta"}  # float32, float64 for float64 inputs
# Pointers of a fixed type whatever the inputs': ALiBi slopes are float32, dropout's state int64, the decode
# kernel's lengths and page table int32 and its split workspace float32.
_TYPED_POINTERS = {"Alibi": "*fp32", "Rng": "*i64", "CacheSeqlens": "*i32", "BlockTable": "*i32",
                   "OutPartial": "*fp32", "LSEPartial": "*fp32"}
#: Kernels the report compiles: the tuned ones (``configs.KERNEL_NAMES``) and, when named, ``decode``.
REPORT_KERNELS = attention_configs.KERNEL_NAMES + ("decode",)
#: Query rows per (batch, K/V head) whose decode tiles the report compiles: a decode step's group (16-row
#: tile), and the 32- and 64-row tiles of speculative decoding and chunks.
DECODE_ROWS = (1, 32, 64)
# The instructions counted in the SASS; HGMMA is counted per shape.
_COUNTED = ("HMMA", "UTMALDG", "UTMASTG", "LDGSTS")
# A SASS instruction line: "/*0a90*/  @!P0 HGMMA.64x32x16.F32.BF16 R104, ..." -> opcode and modifiers.
_SASS_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[0-9T]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Za-z0-9_]+)*)")
_MMA_SHAPE = re.compile(r"^\d+x\d+x\d+$")
#: A wgmma of N <= this is a sliver; more than half of a kernel's HGMMAs that narrow make it small-wgmma.
SMALL_WGMMA_N = 16


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def jit_function(kernel: str) -> JITFunction:
    """The Triton kernel of a kernel name of ``configs.KERNEL_NAMES`` (``forward``, ``backward_dkdv``,
    ``backward_dq``)."""
    functions = {
        "decode": decode._attn_decode_kernel,
        "forward": forward._attn_fwd_kernel,
        "backward_dkdv": backward._attn_bwd_dkdv_kernel,
        "backward_dq": backward._attn_bwd_dq_kernel,
    }
    if kernel not in functions:
        raise ValueError(f"kernel must be one of {tuple(functions)}, got {kernel!r}")
    function = functions[kernel]
    if not isinstance(function, JITFunction):
        raise RuntimeError("the compile report needs compiled kernels: unset TRITON_INTERPRET before importing "
                           "flash_softmax")
    return function


def parts(kernel: str, config: attention_configs.KernelConfig) -> list[dict]:
    """The constexprs of each launch a configuration makes (one, or dV then dK for a split dK/dV)."""
    if kernel == "backward_dkdv":
        return backward.dkdv_parts(config)
    if kernel == "decode":
        return [dict(PAGED=paged, SPLIT=split) for paged in (False, True) for split in (False, True)]
    return [{}]


def _part_suffix(part: dict, count: int) -> str:
    if "PAGED" in part:
        return " " + " ".join(("paged" if part["PAGED"] else "contiguous", *(("split",) if part["SPLIT"] else ())))
    if count == 1:
        return ""
    computed = [name for name, key in (("dk", "COMPUTE_DK"), ("dv", "COMPUTE_DV")) if part.get(key)]
    return f" [{'+'.join(computed) or 'none'}]"


@dataclass
class Report:
    """One compiled launch of one configuration: what it costs and which instructions it runs."""

    kernel: str  # one of configs.KERNEL_NAMES, as ``flash-softmax tune --kernels`` takes them
    arch: str
    dtype: str
    head_dim: int
    causal: bool
    launch: attention_configs.KernelConfig
    part: dict = field(default_factory=dict)  # constexprs of this launch (dkdv_parts), {} for one launch
    config: str = ""  # the label: the configuration's, with the part of a split launch
    kept: bool = True  # whether the pruned space keeps this configuration
    shared_limit: int = 0
    registers: int = -1
    spill_bytes: int = -1
    shared_bytes: int = -1
    hgmma_shapes: dict = field(default_factory=dict)  # "64x128x16" -> count
    hmma: int = 0
    utmaldg: int = 0
    utmastg: int = 0
    ldgsts: int = 0
    error: str = ""

    @property
    def hgmma(self) -> int:
        return sum(self.hgmma_shapes.values())

    @property
    def mma(self) -> str:
        """``wgmma``, ``mma.sync only`` or ``no MMA``."""
        if self.hgmma:
            return "wgmma"
        return "mma.sync only" if self.hmma else "no MMA"

    @property
    def small_wgmma(self) -> bool:
        """More than half of the HGMMA instructions are ``64xNx16`` with N <= ``SMALL_WGMMA_N``."""
        narrow = sum(count for shape, count in self.hgmma_shapes.items()
                     if int(shape.split("x")[1]) <= SMALL_WGMMA_N)
        return 2 * narrow > self.hgmma

    @property
    def needs_wgmma(self) -> bool:
        return self.arch == "sm_90a" and self.dtype in WGMMA_DTYPES and self.kernel != "decode"

    def problems(self) -> list[str]:
        if self.error:
            return ["error"]
        problems = []
        if self.spill_bytes:
            problems.append("spills")
        if self.shared_bytes > self.shared_limit:
            problems.append("shared memory")
        if self.needs_wgmma and not self.hgmma:
            problems.append("no wgmma")
        if self.needs_wgmma and self.small_wgmma:
            problems.append("small wgmma")
        return problems

    @property
    def ok(self) -> bool:
        return not self.problems()

    @property
    def verdict(self) -> str:
        return ", ".join(self.problems()) or "ok"

    def shapes_text(self) -> str:
        """``64x32x16:32,64x128x16:4`` (most frequent first), ``-`` without HGMMA."""
        ranked = sorted(self.hgmma_shapes.items(), key=lambda item: (-item[1], item[0]))
        return ",".join(f"{shape}:{count}" for shape, count in ranked) or "-"


def _signature(jit_function, constexprs: dict, dtype: str) -> dict:
    """Triton type strings for every argument of an attention kernel: its constexprs, then by name,
    uppercase for tensor pointers (``LSE``/``Delta`` are float32 statistics), ``*_BUCKET`` and lowercase
    for int32 sizes and strides, and the float scales."""
    missing = [param.name for param in jit_function.params if param.is_constexpr and param.name not in constexprs]
    if missing:
        raise ValueError(f"constexprs of {jit_function.__name__} lack {missing}")
    signature = {}
    for param in jit_function.params:
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name in _TYPED_POINTERS:
            signature[name] = _TYPED_POINTERS[name]
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
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        result = subprocess.run(
            [_tool("ptxas"), "-v", f"--gpu-name={arch}", source, "-o", os.path.join(folder, "kernel.cubin")],
            capture_output=True, text=True, check=True,
        )
    log = result.stdout + result.stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return registers, spills


def disassemble(cubin: bytes) -> str:
    """The SASS of a cubin, from Triton's bundled ``cuobjdump -sass``."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as handle:
            handle.write(cubin)
        return subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout


def sass_counts(sass: str) -> dict:
    """Counts of the instructions the report reads, from SASS text: ``hgmma_shapes`` (``"64x128x16"`` ->
    count) and ``hmma``, ``utmaldg``, ``utmastg``, ``ldgsts``."""
    shapes: Counter = Counter()
    counts = dict.fromkeys(_COUNTED, 0)
    for line in sass.splitlines():
        match = _SASS_INSTRUCTION.match(line)
        if match is None:
            continue
        opcode, modifiers = match.groups()
        if opcode == "HGMMA":
            shape = next((m for m in modifiers.split(".") if _MMA_SHAPE.match(m)), None)
            if shape is None:
                raise ValueError(f"HGMMA without an MxNxK shape in the SASS: {line.strip()!r}")
            shapes[shape] += 1
        elif opcode in counts:
            counts[opcode] += 1
    return {"hgmma_shapes": dict(shapes), **{name.lower(): count for name, count in counts.items()}}


def _alignment(jit_function, signature: dict, strides_aligned: bool) -> dict:
    """The divisibility-by-16 facts a real launch gives Triton: torch allocations are 16-byte aligned, and
    the strides of a contiguous layout are multiples of 16 when the head dim is. Without them Triton
    cannot vectorise loads, and the report would describe a kernel no launch ever runs."""
    aligned = []
    for index, name in enumerate(jit_function.arg_names):
        if signature[name].startswith("*") or (strides_aligned and name.startswith("stride_")):
            aligned.append((index,))
    return {path: [["tt.divisibility", 16]] for path in aligned}


def compile_one(jit_function, constexprs: dict, dtype: str, arch: str, num_warps: int, num_stages: int) -> dict:
    """Compile one kernel configuration for ``arch`` (``dtype`` a Triton name such as ``"bf16"``); return
    ``registers``, ``spill_bytes``, ``shared_bytes`` and the ``sass_counts`` of the cubin."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {tuple(ARCHITECTURES)}, got {arch!r}")
    capability, _ = ARCHITECTURES[arch]
    signature = _signature(jit_function, constexprs, dtype)
    strides_aligned = constexprs["HEAD_DIM"] % 16 == 0 and constexprs["HEAD_DIM_V"] % 16 == 0
    source = ASTSource(fn=jit_function, signature=signature, constexprs=constexprs,
                       attrs=_alignment(jit_function, signature, strides_aligned))
    compiled = triton.compile(
        source, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    registers, spills = _ptxas_usage(compiled.asm["ptx"], arch)
    return dict(registers=registers, spill_bytes=spills, shared_bytes=compiled.metadata.shared,
                **sass_counts(disassemble(compiled.asm["cubin"])))


def attention_constexprs(head_dim: int, causal: bool) -> dict:
    """Compile-time switches of a plain (optionally causal) attention call in a 16- or 32-bit dtype."""
    width = attention_configs.padded_head_dim(head_dim)
    return dict(
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim, BLOCK_D=width, BLOCK_DV=width,
        HAS_LEFT=False, HAS_RIGHT=causal, HAS_SOFTCAP=False, BIAS_KIND=0, ACC_DTYPE=tl.float32,
        HAS_SINKS=False, HAS_ALIBI=False, HAS_DROPOUT=False,
        INTERPRETED_BFLOAT16=False, VARLEN=False,
    )


def kernel_constexprs(kernel: str, head_dim: int, causal: bool, config, part: dict) -> dict:
    """Every constexpr of one launch of ``kernel``: the call's, the configuration's and the part's. A dK/dV
    launch that splits grouped heads into shares (``SPLIT_GROUPS``) only happens with few K/V heads on a
    large GPU; the report compiles the plain one."""
    if kernel == "decode":
        return decode_constexprs(head_dim, causal, config, part)
    extra = {"SPLIT_GROUPS": False} if kernel == "backward_dkdv" else {}
    return {**attention_constexprs(head_dim, causal), **config.constexprs(), **extra, **part}


def decode_constexprs(head_dim: int, causal: bool, config, part: dict) -> dict:
    """The decode kernel's constexprs for a launch with every score modifier on (window, softcap, sinks, ALiBi)
    and per-sequence lengths, on the cache layout and split of ``part``."""
    width = attention_configs.padded_head_dim(head_dim)
    return dict(
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim, BLOCK_D=width, BLOCK_DV=width, HAS_LEFT=True, HAS_RIGHT=causal,
        HAS_SOFTCAP=True, HAS_SINKS=True, HAS_ALIBI=True, HAS_SEQLENS=True, ACC_DTYPE=tl.float32,
        INTERPRETED_BFLOAT16=False, BLOCK_M=config.block_m, BLOCK_N=config.block_n, **part,
    )


def decode_configs(head_dim: int, arch: str, dtype: str) -> list:
    """The decode tiles ``decode.decode_config`` picks on ``arch`` for ``DECODE_ROWS`` query rows at this
    head dim and dtype."""
    chosen = []
    for rows in DECODE_ROWS:
        shape = decode.DecodeShape(batch=1, heads_q=rows, heads_kv=1, seqlen_q=1, capacity=4096)
        config = decode.decode_config(shape, head_dim, head_dim, 4 if dtype == "float32" else 2, arch,
                                      ARCHITECTURES[arch][1])
        if config not in chosen:
            chosen.append(config)
    return chosen


def compile_report(report: Report) -> Report:
    """``report`` with the results of compiling its launch filled in, or its ``error``."""
    try:
        constexprs = kernel_constexprs(report.kernel, report.head_dim, report.causal, report.launch, report.part)
        results = compile_one(jit_function(report.kernel), constexprs, DTYPES[report.dtype], report.arch,
                              report.launch.num_warps, report.launch.num_stages)
    except Exception as error:  # a configuration that does not compile is reported, not raised
        message = str(error).strip().splitlines()
        return replace(report, error=f"{type(error).__name__}: {message[0][:160] if message else ''}")
    return replace(report, **results)


def reports_for(kernel: str, config, arch: str, dtype: str, head_dim: int, causal: bool,
                kept: bool = True) -> list[Report]:
    """The reports (not yet compiled) of one configuration: one per launch it makes."""
    if kernel not in REPORT_KERNELS:
        raise ValueError(f"kernel must be one of {REPORT_KERNELS}, got {kernel!r}")
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {tuple(ARCHITECTURES)}, got {arch!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    launches = parts(kernel, config)
    return [Report(kernel, arch, dtype, head_dim, causal, config, part,
                   config.label + _part_suffix(part, len(launches)), kept=kept, shared_limit=ARCHITECTURES[arch][1])
            for part in launches]


def selected_configs(kernel: str, arch: str, dtype: str, head_dim: int, selection: str = "pruned"):
    """``[(config, kept)]`` of ``kernel``'s space for ``head_dim`` on ``arch``: the default only
    (``"defaults"``), those the pruning keeps (``"pruned"``), or the whole bucket (``"unpruned"``)."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if kernel == "decode":  # no space to prune: the tiles decode_config picks
        return [(config, True) for config in decode_configs(head_dim, arch, dtype)]
    _, shared_limit = ARCHITECTURES[arch]
    element_size = 4 if dtype == "float32" else 2
    kept = attention_configs.prune(kernel, head_dim, head_dim, element_size, shared_limit, arch=arch)
    if selection == "defaults":
        return [(attention_configs.default_config(kernel, head_dim, head_dim, element_size,
                                                  shared_limit=shared_limit, arch=arch), True)]
    if selection == "pruned":
        return [(config, True) for config in kept]
    return [(config, config in kept) for config in attention_configs.space(kernel, head_dim, head_dim, arch)]


def default_jobs() -> int:
    """Worker processes: one per available core, at most 8 (each compile holds one core)."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def compile_reports(reports: list[Report], jobs: int | None = None, progress=None) -> list[Report]:
    """Compile ``reports`` in ``jobs`` worker processes (default ``default_jobs()``; 1 compiles in this
    process); return them filled in, in order, calling ``progress(report)`` on each as soon as it and those
    before it are done.

    Workers are spawned, not forked, since forking a process that holds torch's and Triton's native state is
    unsafe; so, as with any spawning pool, a script that calls this must guard its top-level code with
    ``if __name__ == "__main__":``. A configuration that kills its worker (Triton aborts on some pass
    failures) is compiled again alone and reported with an error; the others are compiled as usual."""
    jobs = default_jobs() if jobs is None else jobs
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    done: list[Report] = []

    def finish(report: Report) -> None:
        done.append(report)
        if progress is not None:
            progress(report)

    if jobs == 1:
        for report in reports:
            finish(compile_report(report))
        return done
    context = multiprocessing.get_context("spawn")
    pending = list(reports)
    while pending:
        with ProcessPoolExecutor(min(jobs, len(pending)), mp_context=context) as pool:
            futures = [pool.submit(compile_report, report) for report in pending]
            broken_at = None
            for index, future in enumerate(futures):
                try:
                    finish(future.result())
                except BrokenProcessPool:
                    broken_at = index
                    break
        if broken_at is None:
            break
        # The pool died while this report or one running next to it compiled: alone, it tells which.
        suspect = pending[broken_at]
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            try:
                finish(pool.submit(compile_report, suspect).result())
            except BrokenProcessPool:
                finish(replace(suspect, error="its worker process died: Triton aborted on this configuration, or "
                               "the calling script lacks an `if __name__ == \"__main__\":` guard"))
        pending = pending[broken_at + 1:]
    return done


def run_reports(archs, dtypes, head_dims, kernels=None, causal=(True,), selection: str = "pruned",
                progress=None, jobs: int | None = None) -> list[Report]:
    """Compile the selected configurations (``selected_configs``) of each kernel (``REPORT_KERNELS``; default
    ``configs.KERNEL_NAMES``, the decode kernel only when named) for every arch, dtype, head dim and causal
    setting, and report them."""
    unknown = set(kernels or ()) - set(REPORT_KERNELS)
    if unknown:
        raise ValueError(f"kernels must be some of {REPORT_KERNELS}, got {sorted(unknown)}")
    if isinstance(causal, bool):
        causal = (causal,)
    reports = []
    for kernel in REPORT_KERNELS:
        if kernel not in (kernels or attention_configs.KERNEL_NAMES):
            continue
        for arch in archs:
            for dtype in dtypes:
                for head_dim in head_dims:
                    for is_causal in causal:
                        for config, kept in selected_configs(kernel, arch, dtype, head_dim, selection):
                            reports += reports_for(kernel, config, arch, dtype, head_dim, is_causal, kept)
    return compile_reports(reports, jobs=jobs, progress=progress)


def format_report(report: Report) -> str:
    return (f"{report.kernel:<14} {report.arch:<6} {report.dtype:<8} {'causal' if report.causal else 'noncausal':<9} "
            f"D={report.head_dim:<3} {report.config:<34} regs={report.registers:>3} spill={report.spill_bytes:>5}B "
            f"smem={report.shared_bytes:>6}/{report.shared_limit}B  {report.mma:<13} HGMMA={report.shapes_text()} "
            f"HMMA={report.hmma} TMA={report.utmaldg}/{report.utmastg} LDGSTS={report.ldgsts}  "
            f"{'' if report.kept else '(pruned) '}{report.verdict}"
            + (f"  {report.error}" if report.error else ""))


def run(args) -> int:
    """``flash-softmax compile-report``: print one line per compiled launch; exit 1 if a kept one is not ok."""
    selection = "defaults" if args.defaults_only else "unpruned" if args.unpruned else "pruned"
    print(f"Compiling with Triton {triton.__version__} and its bundled ptxas and cuobjdump (no GPU needed).",
          flush=True)
    reports = run_reports(
        args.archs, args.dtypes, args.head_dims, kernels=args.kernels, causal=args.causal, selection=selection,
        progress=lambda report: print(format_report(report), flush=True),
    )
    bad = [report for report in reports if report.kept and not report.ok]
    print(f"{len(reports)} launches compiled; {len(bad)} kept ones fail, spill, exceed shared memory, "
          f"or on sm_90a lack wgmma or are small-wgmma.")
    return 1 if bad else 0
