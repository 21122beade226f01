"""What runs where, told truthfully: ``flash-softmax info``, ``fs.stats()`` and the fallback warnings.

Three situations decide the path of a call: CUDA tensors (compiled kernels), CPU tensors with
``TRITON_INTERPRET=1`` set before triton is imported (the same kernels, interpreted), and CPU tensors
without it (PyTorch). The first two run in this process where they apply; the CPU ones run in fresh
subprocesses, since the switch is read once per process. Each checks that ``info`` names the path that
``stats()`` then counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import flash_softmax as fs
from flash_softmax import info, sdpa
from flash_softmax._backend import INTERPRETED
from flash_softmax.testing import GRADIENT_FACTOR, assert_close

from conftest import DEVICE

REPO = Path(__file__).resolve().parent.parent
KERNEL_PATH = "triton" if DEVICE == "cuda" else "triton-interpreter"


@pytest.fixture(autouse=True)
def fresh_stats():
    """Counts from zero, and every fallback reason warning again, in each test."""
    fs.reset_stats(warnings_too=True)
    yield
    fs.reset_stats(warnings_too=True)


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


# A fresh process: the path info reports for cpu tensors, then the counts of a forward and backward of
# each op. Without a GPU and with TRITON_INTERPRET unset, the package must import and serve every call.
PROBE = textwrap.dedent("""
    import json, warnings
    import torch
    import flash_softmax as fs
    from flash_softmax import info
    reported = {row["op"]: row["path"] for row in info.paths() if row["device"] == "cpu"}
    q, k, v = (torch.randn(1, 2, 9, 8, requires_grad=True) for _ in range(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            fs.flash_attention(q, k, v, causal=True).sum().backward()
            fs.softmax(q, dim=-1).sum().backward()
            fs.scaled_dot_product_attention(q, k, v)
    fallback_warnings = [str(w.message) for w in caught if issubclass(w.category, fs.FallbackWarning)]
    print(json.dumps({"reported": reported, "stats": fs.stats(), "warnings": fallback_warnings}))
""")


def run_probe(interpret: bool) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_cpu_without_the_interpreter_is_the_torch_path_and_says_so():
    result = run_probe(interpret=False)
    assert set(result["reported"].values()) == {"torch"}
    stats = result["stats"]
    assert stats["attention_forward"] == {"torch": 2}
    assert stats["softmax_forward"] == {"torch": 2}
    assert stats["scaled_dot_product_attention"] == {"torch": 2}
    assert "attention_backward" not in stats and "softmax_backward" not in stats  # autograd of torch's ops
    assert all(count == 2 for count in stats["fallbacks"].values()) and len(stats["fallbacks"]) == 3
    # One warning per reason, not per call, each naming the switch that would run the kernels.
    assert len(result["warnings"]) == 3
    assert all("TRITON_INTERPRET=1" in message for message in result["warnings"])


def test_cpu_with_the_interpreter_runs_the_kernels_and_says_so():
    result = run_probe(interpret=True)
    assert set(result["reported"].values()) == {"triton-interpreter"}
    stats = result["stats"]
    for op in ("attention_forward", "attention_backward", "softmax_forward", "softmax_backward"):
        assert stats[op] == {"triton-interpreter": 4 if op == "attention_forward" else 2}, op
    assert stats["scaled_dot_product_attention"] == {"triton-interpreter": 2}
    assert stats["fallbacks"] == {} and result["warnings"] == []


def test_info_command_reports_the_torch_path_when_the_interpreter_is_off():
    """The command itself must not switch the interpreter on before reporting: it describes the user's
    environment."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-m", "flash_softmax", "info"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "TRITON_INTERPRET=1 was not set" in done.stdout
    assert "triton-interpreter" not in done.stdout
    assert "attention configurations: none" in done.stdout


def test_info_reports_compiled_kernels_for_cuda_tensors(monkeypatch):
    """The CUDA rows, on any machine: what ``backend_for`` answers for a CUDA device, and the table source."""
    monkeypatch.setattr(info, "_devices", lambda: ["cpu", "cuda"])
    monkeypatch.setattr(info, "config_table", lambda: "none: default configurations (no table)")
    rows = [row for row in info.paths() if row["device"] == "cuda"]
    assert {row["op"] for row in rows} == {
        "attention_forward", "attention_backward", "scaled_dot_product_attention", "softmax_forward",
        "softmax_backward"}
    assert all(row["path"] == "triton" and "compiled" in row["why"] for row in rows)
    attention = next(row for row in rows if row["op"] == "attention_forward")
    assert "default configurations" in attention["configs"]


@pytest.mark.gpu
def test_info_matches_what_cuda_calls_take():
    reported = {row["op"]: row["path"] for row in info.paths() if row["device"] == "cuda"}
    q, k, v = (randn(1, 2, 64, 32, seed=s).requires_grad_() for s in range(3))
    fs.flash_attention(q, k, v).sum().backward()
    assert fs.stats()["attention_forward"] == {reported["attention_forward"]: 1} == {"triton": 1}
    assert fs.stats()["attention_backward"] == {"triton": 1}


def test_this_process_reports_what_it_runs():
    expected = "triton-interpreter" if INTERPRETED else "torch"
    assert {row["path"] for row in info.paths() if row["device"] == "cpu"} == {expected}


# ---- Fallbacks of the SDPA drop-in warn once per reason and are counted ------------------------------

def sdpa_inputs(seqlen_q=5, seqlen_k=7, heads_kv=2):
    return randn(1, 2, seqlen_q, 8, seed=1), randn(1, heads_kv, seqlen_k, 8, seed=2), randn(1, heads_kv, seqlen_k, 8, seed=3)


def test_sdpa_fallbacks_warn_once_and_are_counted():
    q, k, v = sdpa_inputs()
    with pytest.warns(fs.FallbackWarning, match="dtypes torch.float64") as caught:
        for _ in range(3):
            fs.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert len([w for w in caught if issubclass(w.category, fs.FallbackWarning)]) == 1
    fs.scaled_dot_product_attention(q, k, v, is_causal=True)
    stats = fs.stats()
    assert stats["scaled_dot_product_attention"] == {"torch": 3, KERNEL_PATH: 1}
    (reason, count), = stats["fallbacks"].items()
    assert count == 3 and reason.startswith("scaled_dot_product_attention: dtypes torch.float64")
    assert stats["attention_forward"] == {KERNEL_PATH: 1}


def test_a_fallback_can_be_made_an_error():
    q, k, v = sdpa_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", fs.FallbackWarning)
        with pytest.raises(fs.FallbackWarning, match="float64"):
            fs.scaled_dot_product_attention(q.double(), k.double(), v.double())


def test_reset_stats():
    q, k, v = sdpa_inputs()
    fs.flash_attention(q, k, v)
    assert fs.stats()["attention_forward"] == {KERNEL_PATH: 1}
    fs.reset_stats()
    assert fs.stats() == {"fallbacks": {}}


# ---- MultiheadAttention, ours and torch's under the patch ------------------------------------------

def test_our_multihead_attention_runs_the_kernel_in_eval_mode():
    module = fs.MultiheadAttention(32, 4).to(DEVICE).eval()
    with torch.no_grad():
        module(randn(2, 6, 32))
    assert fs.stats()["attention_forward"] == {KERNEL_PATH: 1}


def test_torch_multihead_attention_runs_the_kernel_under_the_patch_in_eval_mode():
    """torch's eval-mode fast path computes attention in one native op, out of the patch's reach: the
    patch switches it off while installed, and puts the setting back after."""
    module = torch.nn.MultiheadAttention(32, 4, batch_first=True).to(DEVICE).eval()
    x = randn(2, 6, 32)
    assert torch.backends.mha.get_fastpath_enabled()
    with torch.no_grad():
        expected, _ = module(x, x, x, need_weights=False)
        with fs.patch_sdpa():
            assert not torch.backends.mha.get_fastpath_enabled()
            got, _ = module(x, x, x, need_weights=False)
    assert torch.backends.mha.get_fastpath_enabled()
    assert fs.stats()["attention_forward"] == {KERNEL_PATH: 1}
    truth, _ = module.double()(x.double(), x.double(), x.double(), need_weights=False)
    assert_close("out", got, truth, None)
    assert_close("torch's out", expected, truth, None)


def test_the_patch_as_a_switch_restores_the_fast_path():
    fs.patch_sdpa()
    fs.patch_sdpa()  # twice: the setting remembered is still the user's
    assert not torch.backends.mha.get_fastpath_enabled()
    fs.patch_sdpa(enable=False)
    assert torch.backends.mha.get_fastpath_enabled() and not fs.sdpa.sdpa_is_patched()


# ---- torch's CausalBias masks -----------------------------------------------------------------------

def truth_sdpa(q, k, v, **kwargs):
    return sdpa.TORCH_SDPA(q.double(), k.double(), v.double(), **kwargs)


@pytest.mark.parametrize("patched", [False, True], ids=["function", "patch_sdpa"])
@pytest.mark.parametrize("seqlens", [(5, 7), (7, 5), (6, 6)], ids=lambda s: f"q{s[0]}-k{s[1]}")
@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
def test_causal_bias_masks_run_as_the_kernels_causal_band(variant, seqlens, patched):
    seqlen_q, seqlen_k = seqlens
    q, k, v = (t.requires_grad_() for t in sdpa_inputs(seqlen_q, seqlen_k))
    make = causal_upper_left if variant == "upper_left" else causal_lower_right
    mask = make(seqlen_q, seqlen_k)
    if patched:
        with fs.patch_sdpa():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        out = fs.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert fs.stats()["attention_forward"] == {KERNEL_PATH: 1}, "the kernels did not run it"
    assert fs.stats()["fallbacks"] == {}
    # The truth, written out: a bool keep-mask in float64 through torch's math.
    rows = torch.arange(seqlen_q)[:, None] + (0 if variant == "upper_left" else seqlen_k - seqlen_q)
    keep = (torch.arange(seqlen_k)[None, :] <= rows).to(DEVICE)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    truth = sdpa.TORCH_SDPA(*leaves, attn_mask=keep)
    dout = randn(*out.shape, seed=9)
    out.backward(dout)
    truth.backward(dout.double())
    # A row that sees no key is 0 for both (torch's math gives NaN there; the kernels give 0 by design).
    truth_out = torch.nan_to_num(truth.detach(), nan=0.0)
    assert_close("out", out, truth_out, None)
    for name, got, leaf in zip("qkv", (q.grad, k.grad, v.grad), leaves):
        assert_close(f"d{name}", got, torch.nan_to_num(leaf.grad, nan=0.0), None)


def test_upper_left_mask_is_not_read_as_a_bias():
    """The case that once read the mask's uninitialised storage as a float bias: q (1,1,5,8), k (1,1,7,8)."""
    q, k, v = randn(1, 1, 5, 8, seed=4), randn(1, 1, 7, 8, seed=5), randn(1, 1, 7, 8, seed=6)
    got = fs.scaled_dot_product_attention(q, k, v, attn_mask=causal_upper_left(5, 7))
    assert_close("out", got, truth_sdpa(q, k, v, is_causal=True), None)


@pytest.mark.parametrize("patched", [False, True], ids=["function", "patch_sdpa"])
def test_causal_bias_with_is_causal_is_torchs_error(patched):
    q, k, v = sdpa_inputs()
    with fs.patch_sdpa(enable=patched), pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
        function = F.scaled_dot_product_attention if patched else fs.scaled_dot_product_attention
        function(q, k, v, attn_mask=causal_lower_right(5, 7), is_causal=True)


def test_causal_bias_that_the_kernels_cannot_serve_goes_to_torch():
    q, k, v = sdpa_inputs(5, 7)
    with pytest.warns(fs.FallbackWarning, match="dtypes torch.float64"):
        fs.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=causal_lower_right(5, 7))
    assert fs.stats()["scaled_dot_product_attention"] == {"torch": 1}


def test_causal_bias_of_other_lengths_goes_to_torch():
    q, k, v = sdpa_inputs(5, 7)
    with pytest.warns(fs.FallbackWarning, match=r"causal_lower_right\(4, 7\)"):
        with pytest.raises(RuntimeError):  # torch's own verdict on a mask of the wrong size
            fs.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(4, 7))


class RecordingMask(torch.Tensor):
    """A tensor subclass with attention semantics of its own: torch functions given it are recorded."""

    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is sdpa.TORCH_SDPA:
            cls.seen.append(kwargs["attn_mask"] if "attn_mask" in (kwargs or {}) else args[3])
            return torch.zeros(args[0].shape[:-1] + args[2].shape[-1:], device=args[0].device)
        return super().__torch_function__(func, types, args, kwargs)


def test_other_tensor_subclasses_go_to_torch_untouched():
    q, k, v = sdpa_inputs()
    mask = torch.ones(5, 7, dtype=torch.bool, device=DEVICE).as_subclass(RecordingMask)
    RecordingMask.seen.clear()
    with pytest.warns(fs.FallbackWarning, match="RecordingMask"):
        out = fs.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert len(RecordingMask.seen) == 1 and RecordingMask.seen[0] is mask
    assert torch.equal(out, torch.zeros(1, 2, 5, 8, device=DEVICE))


def test_parameters_are_plain_tensors():
    q, k, v = sdpa_inputs()
    bias = torch.nn.Parameter(randn(5, 7), requires_grad=False)
    fs.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert fs.stats()["scaled_dot_product_attention"] == {KERNEL_PATH: 1}


# ---- softmax's dtype argument -----------------------------------------------------------------------

@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_softmax_dtype_argument_is_torchs(op):
    """Cast first, then the op in that dtype; the gradient flows back through the cast to x's dtype."""
    x = randn(3, 37, dtype=torch.float16).requires_grad_()
    got = getattr(fs, op)(x, dim=-1, dtype=torch.float32)
    assert got.dtype == torch.float32
    x64 = x.detach().double().requires_grad_()
    truth = getattr(torch, op)(x64, dim=-1)
    assert_close("y", got, truth, None)
    dy = randn(3, 37, seed=8)
    got.backward(dy)
    truth.backward(dy.double())
    torch_grad, = torch.autograd.grad(getattr(torch, op)(x, dim=-1, dtype=torch.float32), x, dy)
    assert x.grad.dtype == torch.float16
    assert_close("dx", x.grad, x64.grad, torch_grad, factor=GRADIENT_FACTOR)


def test_softmax_dtype_errors():
    x = randn(2, 5)
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        fs.softmax(x, dtype="float32")
    with pytest.raises(TypeError, match="dtype must be float16, bfloat16 or float32"):
        fs.log_softmax(x, dtype=torch.float64)
