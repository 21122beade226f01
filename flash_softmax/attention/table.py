"""Tuned configuration tables: which ``KernelConfig`` won, per shape bucket, on one kind of GPU.

``flash-softmax tune`` times every configuration of each kernel's pruned space on the GPU it runs on and
writes the winners to ``flash_softmax/configs/<device-slug>.json`` (the slug of
``flash_softmax.info.device_slug()``, e.g. ``nvidia-h200``). ``configs.select_config`` consults the table
of the current device before falling back to each bucket's default configuration.

The file::

    {
      "format": 1,
      "device": "NVIDIA H200", "device_slug": "nvidia-h200", "arch": "sm_90a", "shared_memory": 232448,
      "torch": "2.11.0", "triton": "3.6.0", "date": "2025-01-01T00:00:00+00:00",
      "command": "flash-softmax tune ...",
      "timing": "what the milliseconds measure",
      "complete": true,
      "entries": [
        {"kernel": "forward", "dtype": "bfloat16", "head_dim_bucket": 128, "causal": true,
         "seqlen_bucket": 4096,
         "config": {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3, "tma": false, ...},
         "ms": 1.234, "runner_up": {"block_m": ...} or null, "runner_up_ms": 1.301 or null}
      ]
    }

Only ``format``, ``device`` and ``entries`` (with each entry's key fields, ``config`` and ``ms``) are
required; the rest documents where the numbers came from. A file that does not match is rejected with a
``ValueError`` naming the file and the field, rather than half-read: a table silently misread would pick
configurations nobody measured.

``FLASH_SOFTMAX_CONFIG_TABLE=<path>`` makes every process use that file instead (on any device, which is
how a table is tried before it is committed); ``FLASH_SOFTMAX_CONFIG_TABLE=none`` disables tables.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path

from flash_softmax.attention import configs
from flash_softmax.attention.configs import ConfigKey, KernelConfig

FORMAT_VERSION = 1
ENV_VAR = "FLASH_SOFTMAX_CONFIG_TABLE"
#: Where the tables shipped with the package live (package data, see pyproject.toml).
TABLE_DIR = Path(__file__).resolve().parent.parent / "configs"
#: dtypes a table may hold entries for (the kernels' 16- and 32-bit inputs).
DTYPE_NAMES = ("float16", "bfloat16", "float32")

_KEY_FIELDS = ("kernel", "dtype", "head_dim_bucket", "causal", "seqlen_bucket")


@dataclass(frozen=True)
class Entry:
    """One measured winner: its key, configuration and time, and the runner-up's (None when alone)."""

    key: ConfigKey
    config: KernelConfig
    ms: float
    runner_up: KernelConfig | None = None
    runner_up_ms: float | None = None

    def to_dict(self) -> dict:
        return {
            "kernel": self.key.kernel, "dtype": self.key.dtype, "head_dim_bucket": self.key.head_dim_bucket,
            "causal": self.key.causal, "seqlen_bucket": self.key.seqlen_bucket,
            "config": self.config.to_dict(), "ms": self.ms,
            "runner_up": None if self.runner_up is None else self.runner_up.to_dict(),
            "runner_up_ms": self.runner_up_ms,
        }


@dataclass
class Table:
    """A tuned table: ``entries`` by key, and the file's descriptive fields in ``meta``."""

    entries: dict[ConfigKey, Entry]
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    @classmethod
    def from_entries(cls, entries: Iterable[Entry], meta: dict | None = None) -> "Table":
        table = cls({}, dict(meta or {}))
        for entry in entries:
            if entry.key in table.entries:
                raise ValueError(f"entries: two entries for {entry.key}")
            table.entries[entry.key] = entry
        return table

    def lookup(self, key: ConfigKey) -> KernelConfig | None:
        """The configuration for ``key``: its own entry, else that of the nearest length bucket with the same
        kernel, dtype, head-dim bucket and causality, else None (the caller then uses the default).

        Buckets are powers of two, so "nearest" is measured in octaves (``|log2(a / b)|``): a 32k launch
        takes the 16k entry, a 2k launch between 1k and 4k entries is a tie, and ties go to the smaller
        bucket, whose tiles are the more conservative choice for the shorter sequences of the tie.
        """
        entry = self.entries.get(key)
        if entry is not None:
            return entry.config
        wanted = max(key.seqlen_bucket, 1)
        siblings = [candidate for candidate in self.entries.values()
                    if (candidate.key.kernel, candidate.key.dtype, candidate.key.head_dim_bucket,
                        candidate.key.causal) == (key.kernel, key.dtype, key.head_dim_bucket, key.causal)]
        if not siblings:
            return None
        nearest = min(siblings, key=lambda candidate: (abs(math.log2(candidate.key.seqlen_bucket / wanted)),
                                                       candidate.key.seqlen_bucket))
        return nearest.config

    def to_dict(self) -> dict:
        ordered = sorted(self.entries.values(), key=lambda entry: (
            configs.KERNEL_NAMES.index(entry.key.kernel), entry.key.dtype, entry.key.head_dim_bucket,
            entry.key.causal, entry.key.seqlen_bucket))
        return {"format": FORMAT_VERSION, **{k: v for k, v in self.meta.items() if k not in ("format", "entries")},
                "entries": [entry.to_dict() for entry in ordered]}

    def __len__(self) -> int:
        return len(self.entries)


# --- reading and writing --------------------------------------------------------------------------------

def _fail(source: str, where: str, expected: str, got) -> ValueError:
    return ValueError(f"{source}: {where}: expected {expected}, got {got!r}")


def _is_int(value) -> bool:
    # JSON true/false arrive as bool, which is an int subclass: never accept them as numbers.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_power_of_two(value) -> bool:
    return _is_int(value) and value > 0 and value & (value - 1) == 0


def _positive_ms(source: str, where: str, value, allow_none: bool) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        expected = "a positive number of milliseconds" + (" or null" if allow_none else "")
        raise _fail(source, where, expected, value)
    return float(value)


# Field name -> whether it is a switch (bool) rather than a size (positive int). configs.py uses postponed
# annotations, so the types arrive as strings.
_CONFIG_SWITCHES = {f.name: f.type in ("bool", bool) for f in fields(KernelConfig)}


def _parse_config(source: str, where: str, data) -> KernelConfig:
    if not isinstance(data, dict):
        raise _fail(source, where, "an object of KernelConfig fields", data)
    try:
        config = KernelConfig.from_dict(data)
    except (TypeError, ValueError) as error:  # unknown or missing fields
        raise ValueError(f"{source}: {where}: {error}") from None
    for name, is_switch in _CONFIG_SWITCHES.items():
        value = getattr(config, name)
        if is_switch:
            if not isinstance(value, bool):
                raise _fail(source, f"{where}.{name}", "true or false", value)
        elif not _is_int(value) or value < 1:
            raise _fail(source, f"{where}.{name}", "a positive integer", value)
    for name in ("block_m", "block_n"):
        if not _is_power_of_two(getattr(config, name)):
            raise _fail(source, f"{where}.{name}", "a power of two", getattr(config, name))
    return config


def _parse_entry(source: str, index: int, data) -> Entry:
    where = f"entries[{index}]"
    if not isinstance(data, dict):
        raise _fail(source, where, "an object", data)
    missing = [name for name in (*_KEY_FIELDS, "config", "ms") if name not in data]
    if missing:
        raise ValueError(f"{source}: {where}: missing field(s) {', '.join(missing)}")
    unknown = set(data) - {*_KEY_FIELDS, "config", "ms", "runner_up", "runner_up_ms"}
    if unknown:
        raise ValueError(f"{source}: {where}: unknown field(s) {', '.join(sorted(unknown))}")
    if data["kernel"] not in configs.KERNEL_NAMES:
        raise _fail(source, f"{where}.kernel", f"one of {', '.join(configs.KERNEL_NAMES)}", data["kernel"])
    if data["dtype"] not in DTYPE_NAMES:
        raise _fail(source, f"{where}.dtype", f"one of {', '.join(DTYPE_NAMES)}", data["dtype"])
    bucket = data["head_dim_bucket"]
    if not _is_power_of_two(bucket) or not 64 <= bucket <= configs.MAX_HEAD_DIM:
        raise _fail(source, f"{where}.head_dim_bucket", f"a power of two from 64 to {configs.MAX_HEAD_DIM}", bucket)
    if not isinstance(data["causal"], bool):
        raise _fail(source, f"{where}.causal", "true or false", data["causal"])
    seqlen_bucket = data["seqlen_bucket"]
    if not _is_power_of_two(seqlen_bucket) or seqlen_bucket < 128:
        raise _fail(source, f"{where}.seqlen_bucket", "a power of two >= 128", seqlen_bucket)
    runner_up = data.get("runner_up")
    return Entry(
        key=ConfigKey(data["kernel"], data["dtype"], bucket, data["causal"], seqlen_bucket),
        config=_parse_config(source, f"{where}.config", data["config"]),
        ms=_positive_ms(source, f"{where}.ms", data["ms"], allow_none=False),
        runner_up=None if runner_up is None else _parse_config(source, f"{where}.runner_up", runner_up),
        runner_up_ms=_positive_ms(source, f"{where}.runner_up_ms", data.get("runner_up_ms"), allow_none=True),
    )


def parse_table(data, source: str = "<table>") -> Table:
    """A ``Table`` from the decoded JSON ``data``; ``source`` names it in error messages."""
    if not isinstance(data, dict):
        raise _fail(source, "top level", "a JSON object", type(data).__name__)
    if data.get("format") != FORMAT_VERSION:
        raise _fail(source, "format", f"{FORMAT_VERSION} (the table format this version reads)", data.get("format"))
    if not isinstance(data.get("device"), str) or not data["device"]:
        raise _fail(source, "device", "the GPU's name as a string", data.get("device"))
    if not isinstance(data.get("entries"), list):
        raise _fail(source, "entries", "a list", data.get("entries"))
    parsed = [_parse_entry(source, index, item) for index, item in enumerate(data["entries"])]
    seen: dict[ConfigKey, int] = {}
    for index, entry in enumerate(parsed):
        if entry.key in seen:
            raise ValueError(f"{source}: entries[{index}]: same kernel, dtype, head_dim_bucket, causal and "
                             f"seqlen_bucket as entries[{seen[entry.key]}]")
        seen[entry.key] = index
    meta = {name: value for name, value in data.items() if name not in ("format", "entries")}
    return Table({entry.key: entry for entry in parsed}, meta)


def load_table(path: str | os.PathLike) -> Table:
    """Read and validate the table at ``path``.

    Raises:
        ValueError: the file is not JSON or does not match the format; the message names the file and field.
        FileNotFoundError: there is no such file.
    """
    path = Path(path)
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from None
    table = parse_table(data, str(path))
    table.path = path
    return table


def write_table(table: Table, path: str | os.PathLike) -> Path:
    """Write ``table`` to ``path`` (folders created), through a temporary file so a reader never sees half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = table.to_dict()
    # One line per entry: a table of a few hundred entries stays readable, and a re-tune diffs line by line.
    head = [f" {json.dumps(name)}: {json.dumps(value)}" for name, value in data.items() if name != "entries"]
    rows = ",\n".join(f"  {json.dumps(entry)}" for entry in data["entries"])
    text = "{\n" + ",\n".join(head) + ',\n "entries": [\n' + rows + ("\n" if rows else "") + " ]\n}\n"
    parse_table(json.loads(text), str(path))  # never write what load_table would refuse
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)
    table.path = path
    return path


# --- the current device's table -------------------------------------------------------------------------

def default_table_path(slug: str | None = None) -> Path:
    """``flash_softmax/configs/<slug>.json`` (default slug: the current device's)."""
    if slug is None:
        from flash_softmax.info import device_slug

        slug = device_slug()
    return TABLE_DIR / f"{slug}.json"


def table_path() -> Path | None:
    """The file ``current_table`` reads, whether or not it exists; None when tables are off.

    ``FLASH_SOFTMAX_CONFIG_TABLE`` wins (``none`` turns tables off); otherwise the shipped table of the
    current CUDA device, and None without one (the interpreter and the CPU path take no tiles from it).
    """
    requested = os.environ.get(ENV_VAR, "").strip()
    if requested.lower() == "none":
        return None
    if requested:
        return Path(requested)
    import torch

    if not torch.cuda.is_available():
        return None
    return default_table_path()


# Parsed tables by (path, modification time, size): a rewritten file (after `flash-softmax tune`) is read
# again, an unchanged one is parsed once per process.
_loaded: dict[tuple, Table] = {}


def current_table() -> Table | None:
    """The table launches use on this device, or None (no file, tables off, or no GPU).

    Raises ``ValueError`` for an invalid file, and ``FileNotFoundError`` when ``FLASH_SOFTMAX_CONFIG_TABLE``
    names a file that does not exist: a table asked for explicitly and silently ignored would leave
    every launch on defaults without anyone noticing.
    """
    path = table_path()
    if path is None:
        return None
    try:
        status = path.stat()
    except FileNotFoundError:
        if os.environ.get(ENV_VAR, "").strip():
            raise FileNotFoundError(f"{ENV_VAR}={path}: no such file (set it to 'none' to use no table)") from None
        return None
    cache_key = (str(path.resolve()), status.st_mtime_ns, status.st_size)
    table = _loaded.get(cache_key)
    if table is None:
        table = load_table(path)
        _loaded.clear()
        _loaded[cache_key] = table
    return table


def clear_cache() -> None:
    """Forget parsed tables (``current_table`` reads its file again)."""
    _loaded.clear()


def describe_current() -> str:
    """For ``flash-softmax info``: the path of the table in use and its entry count, or why there is none."""
    requested = os.environ.get(ENV_VAR, "").strip()
    path = table_path()
    if path is None:
        reason = f"{ENV_VAR}=none" if requested.lower() == "none" else "no CUDA device"
        return f"none: default configurations ({reason})"
    try:
        table = current_table()
    except (OSError, ValueError) as error:
        return f"invalid, attention launches will raise until it is fixed or {ENV_VAR}=none: {error}"
    if table is None:
        return f"none: default configurations (no {path})"
    origin = f" (from {ENV_VAR})" if requested else ""
    device = table.meta.get("device", "?")
    return f"{path}{origin}: {len(table)} entries, measured on {device}"
