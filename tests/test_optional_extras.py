"""The package without its optional extras: rich, matplotlib and transformers made unimportable.

A fresh interpreter gets an import hook that refuses those three (as a machine without them would) before
anything imports flash_softmax. There the kernels must still run, ``flash-softmax verify`` must print a
plain-text report, and ``flash-softmax bench`` and the transformers integration must say which extra to
install instead of failing with a traceback.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent('''
    import importlib.abc
    import sys

    BLOCKED = {"rich", "matplotlib", "transformers"}


    class Refuse(importlib.abc.MetaPathFinder):
        """What importing them does where they are not installed."""

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None


    sys.meta_path.insert(0, Refuse())

    import torch

    import flash_softmax as fs
    from flash_softmax import cli

    q = torch.randn(1, 2, 9, 16)
    k = torch.randn(1, 1, 11, 16)
    v = torch.randn(1, 1, 11, 8)
    out = fs.flash_attention(q, k, v, causal=True)
    expected = fs.reference.attention(q, k, v, causal=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    x = torch.randn(3, 70)
    torch.testing.assert_close(fs.softmax(x, dim=-1), torch.softmax(x, dim=-1), rtol=1e-5, atol=1e-6)
    print("kernels ok")

    status = cli.main(["bench", "--seqlens", "16", "--head-dims", "16", "--no-plots", "--out", sys.argv[1]])
    print(f"bench exit {status}")

    status = cli.main(["verify", "--seqlens", "17", "--head-dims", "16", "--dtypes", "float32", "--causal", "true",
                       "--ops", "attention"])
    print(f"verify exit {status}")

    status = cli.main(["info"])
    print(f"info exit {status}")

    try:
        import flash_softmax.integrations.transformers  # noqa: F401
    except ImportError as error:
        print(f"transformers integration: {error}")

    loaded = sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED)
    print(f"loaded {loaded}")
''')


def test_kernels_verify_and_clear_messages_without_the_extras(tmp_path):
    environment = dict(os.environ)
    if not torch.cuda.is_available():
        environment["TRITON_INTERPRET"] = "1"  # the kernels themselves, in the interpreter
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "bench")], cwd=REPO_ROOT, env=environment,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out, err = done.stdout, done.stderr

    assert "kernels ok" in out
    assert "bench exit 2" in out
    assert "flash-softmax bench needs rich and matplotlib: pip install 'flash-softmax[bench]'" in err
    assert "Traceback" not in err
    assert not (tmp_path / "bench").exists()  # it stopped before writing anything

    # verify's report in plain text: the table's header and its verdict
    assert "verify exit 0" in out
    assert "case" in out and "max error" in out and "1/1 cases passed" in out and "all passed" in out

    # info's report in plain text, with the path each op takes
    assert "info exit 0" in out and "attention_forward" in out and "triton-interpreter" in out

    assert "transformers integration:" in out and "pip install 'flash-softmax[hf]'" in out
    assert "loaded []" in out


def test_pyproject_keeps_the_optional_packages_in_extras():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements):
        return {re.split(r"[<>=!~ \[]", requirement)[0] for requirement in requirements}

    assert names(project["dependencies"]) == {"torch", "triton", "einops"}
    extras = project["optional-dependencies"]
    assert names(extras["bench"]) >= {"rich", "matplotlib"}
    assert names(extras["hf"]) == {"transformers"}
    assert names(extras["interpreter"]) == {"numpy"}
    assert names(extras["test"]) >= {"pytest", "transformers", "rich", "matplotlib", "numpy"}
