"""``flash-softmax info``: versions, the device, which backend each path will use, and which attention
configurations (tuned table, defaults, autotuning) launches on this device get.

The same facts, gathered by :func:`environment`, go into the ``env.json`` of every benchmark run so a
result can always be traced to the machine and code that produced it. Nothing here records the host name.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

_REPO_ROOT = Path(__file__).resolve().parent.parent


def device_name() -> str:
    """The CUDA GPU's name, or ``"CPU only"``."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "CPU only"


def device_slug() -> str:
    """A folder name for the device: the GPU name lowercased with non-alphanumerics as '-'; CPU: ``interpreter``.

    >>> # "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"
    """
    if not torch.cuda.is_available():
        return "interpreter"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def _run_quietly(command: list[str], cwd: Path | None = None) -> str | None:
    """stdout of ``command`` stripped, or None when it cannot run (tool missing, not a git checkout, ...)."""
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def gpu_driver_version() -> str | None:
    """The NVIDIA driver version from ``nvidia-smi``, or None where there is none."""
    if not torch.cuda.is_available():
        return None
    output = _run_quietly(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return output.splitlines()[0].strip() if output else None


def git_commit() -> dict[str, object] | None:
    """The commit of the checkout the package runs from, and whether tracked files differ from it."""
    commit = _run_quietly(["git", "rev-parse", "HEAD"], cwd=_REPO_ROOT)
    if commit is None:
        return None
    changes = _run_quietly(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO_ROOT)
    return {"commit": commit, "modified": bool(changes)}


def versions() -> dict[str, str | None]:
    """Versions of python and the libraries the kernels depend on."""
    import triton

    try:
        import numpy  # only Triton's interpreter needs it
    except ImportError:
        numpy = None

    import flash_softmax

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "numpy": numpy.__version__ if numpy is not None else None,
        "flash_softmax": flash_softmax.__version__,
        "cuda": torch.version.cuda,
    }


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backends() -> dict[str, str]:
    """Which engine runs attention and softmax for tensors on each device present."""
    from flash_softmax._backend import backend_for

    return {device: backend_for(torch.device(device)) for device in _devices()}


#: The public entry points and the ops of ``flash_softmax.stats()`` they run, for the report of ``paths``.
OPS = (
    ("flash_attention, FlashAttention, MultiheadAttention, fs_attention", "attention_forward"),
    ("their backward", "attention_backward"),
    ("scaled_dot_product_attention, patch_sdpa", "scaled_dot_product_attention"),
    ("softmax, log_softmax, Softmax, LogSoftmax", "softmax_forward"),
    ("their backward", "softmax_backward"),
)


def _config_source(op: str, backend: str) -> str:
    """Where the launch configurations of ``op``'s kernels come from on ``backend``."""
    from flash_softmax.attention import configs

    if backend == "torch":
        return "-"
    if op.startswith("softmax"):
        return "fixed small tiles (interpreter)" if backend == "triton-interpreter" else "by row length (softmax/configs.py)"
    if backend == "triton-interpreter":
        return "fixed small tiles (interpreter)"
    if configs.AUTOTUNE:
        return "autotune at the first launch of each shape (FLASH_SOFTMAX_AUTOTUNE)"
    return f"tuned table, else defaults: {config_table()}"


def paths() -> list[dict[str, str]]:
    """For each op and each device present: the path its calls take, why, and the configuration source.

    ``path`` is ``"triton"`` (compiled kernels), ``"triton-interpreter"`` or ``"torch"``, as
    ``flash_softmax.stats()`` counts them; ``scaled_dot_product_attention`` may still hand a call the
    kernels cannot serve to torch's function (it warns once, naming why).
    """
    from flash_softmax._backend import backend_for, backend_reason

    rows = []
    for device in _devices():
        backend = backend_for(torch.device(device))
        why = backend_reason(torch.device(device))
        for entry, op in OPS:
            path, reason = backend, why
            if backend == "torch" and op.endswith("_backward"):
                reason = "PyTorch's autograd of the PyTorch path (not counted)"
            elif op == "scaled_dot_product_attention" and backend != "torch":
                reason = why + "; what they cannot serve goes to torch's function (warned, counted)"
            rows.append({"device": device, "op": op, "entry": entry, "path": path, "why": reason,
                         "configs": _config_source(op, backend)})
    return rows


#: Shapes whose configurations ``flash-softmax info`` reports: (dtype, head dim, causal, seqlen).
REPRESENTATIVE_SHAPES = [("bfloat16", head_dim, causal, 4096) for head_dim in (64, 128) for causal in (False, True)]


def autotune_enabled() -> bool:
    """Whether ``FLASH_SOFTMAX_AUTOTUNE`` (read when the package is imported) switched autotuning on."""
    from flash_softmax.attention import configs

    return configs.AUTOTUNE


def config_table() -> str:
    """Which tuned table launches on this device use: its path, or ``none: default configurations (why)``."""
    from flash_softmax.attention import table

    return table.describe_current()


def attention_configs(shapes=REPRESENTATIVE_SHAPES) -> list[dict[str, object]]:
    """Per shape and kernel, the configuration a launch on the current device uses and where it comes from
    (``configs.select_config``: override, interpreter, table or default; ``autotune`` when the autotuner
    picks at launch time instead)."""
    from flash_softmax._backend import INTERPRETED
    from flash_softmax.attention import configs

    rows = []
    for dtype, head_dim, causal, seqlen in shapes:
        element_size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
        for kernel in configs.KERNEL_NAMES:
            row = {"dtype": dtype, "head_dim": head_dim, "causal": causal, "seqlen": seqlen, "kernel": kernel}
            if configs.AUTOTUNE and not INTERPRETED:
                row.update(config="chosen by the autotuner at the first launch", source="autotune")
            else:
                try:
                    config, source = configs.select_config(kernel, dtype, element_size, head_dim, head_dim, causal,
                                                           seqlen, seqlen)
                    row.update(config=config.label, source=source)
                except (OSError, ValueError) as error:  # an invalid table: say so rather than fail the report
                    row.update(config="-", source=f"error: {error}")
            rows.append(row)
    return rows


def environment(command_line: str | None = None) -> dict[str, object]:
    """Everything ``env.json`` records about a run (no host name)."""
    return {
        "gpu": device_name() if torch.cuda.is_available() else None,
        "driver": gpu_driver_version(),
        **versions(),
        "platform": platform.platform(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "backends": backends(),
        "paths": paths(),
        "config_table": config_table(),
        "autotune": autotune_enabled(),
        "git": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line,
    }


def run() -> int:
    """Print the report of ``flash-softmax info``; return the exit status (always 0). Plain text where
    rich (an optional extra) is not installed."""
    from flash_softmax.bench.output import make_console, print_table

    console = make_console()  # wide when written to a file, so paths are not wrapped
    facts = [(name, str(version) if version else "-") for name, version in versions().items()]
    facts += [("device", device_name()), ("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "unset"))]
    commit = git_commit()
    if commit is not None:
        facts.append(("git commit", commit["commit"] + (" (modified)" if commit["modified"] else "")))
    facts += [("config table", config_table()), ("FLASH_SOFTMAX_AUTOTUNE", "on" if autotune_enabled() else "off")]
    plain = [None] * len(facts)
    print_table(console, "flash_softmax", ("what", "value"), facts, styles=plain, left_aligned=("what", "value"))

    routes = [(row["device"], row["op"], row["entry"], row["path"], row["why"], row["configs"]) for row in paths()]
    columns = ("device", "op", "entry points", "path", "why", "configs")
    print_table(console, "what runs each op (flash_softmax.stats() counts calls by the same names)", columns, routes,
                styles=[None] * len(routes), left_aligned=columns)

    if set(backends().values()) == {"torch"}:
        console.print("attention configurations: none, no tensor on this machine runs the kernels (see above)")
        return 0
    shapes = []
    for row in attention_configs():
        shape = f"{row['dtype']} D={row['head_dim']} {'causal' if row['causal'] else 'full'} S={row['seqlen']}"
        shapes.append((shape, row["kernel"], row["config"], row["source"]))
    columns = ("shape", "kernel", "config", "source")
    print_table(console, f"attention configurations on {device_name()}", columns, shapes,
                styles=[None] * len(shapes), left_aligned=columns)
    return 0
