"""The keywords transformers' attention layers pass to ``fs_attention`` (docs/semantics.md, 'Drop-in for
transformer code'): each is honoured, accepted as not changing the scores, or refused; none falls through.

The first test reads the modeling files of the installed transformers and collects the keyword names of
every call to the attention interface; the others check, against the float64 reference and against the
models' own eager formulas, that each honoured keyword means what the models mean by it.
"""

from __future__ import annotations

import ast
import functools
import inspect
import os
import re
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from conftest import DEVICE  # noqa: E402
from transformers.modeling_flash_attention_utils import FlashAttentionKwargs  # noqa: E402
from transformers.utils.generic import TransformersKwargs  # noqa: E402

import flash_softmax as fs  # noqa: E402
from flash_softmax.integrations.transformers import (  # noqa: E402
    HARMLESS_KEYWORDS,
    HONOURED_KEYWORDS,
    REFUSED_KEYWORDS,
    fs_attention_forward,
)
from flash_softmax.testing import GRADIENT_FACTOR, assert_close  # noqa: E402

#: The attention function's positional parameters, which some layers pass by name.
PARAMETERS = {"module", "query", "key", "value", "attention_mask"}


# --------------------------------------------------------------------------------------------------------
# Every keyword is classified


def attention_call_keywords(source: str) -> set[str]:
    """The keyword names passed to the attention interface in a piece of Python source: calls to a name or
    attribute containing ``attention_interface``, with the keys of dict literals they splat (``**kw`` where
    ``kw = {...}`` in the same source)."""
    tree = ast.parse(source)
    dict_keys: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            keys = {key.value for key in node.value.keys if isinstance(getattr(key, "value", None), str)}
            for target in node.targets:
                if isinstance(target, ast.Name):
                    dict_keys.setdefault(target.id, set()).update(keys)
    keywords = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        function = node.func
        name = function.id if isinstance(function, ast.Name) else getattr(function, "attr", "")
        if "attention_interface" not in name:
            continue
        for keyword in node.keywords:
            if keyword.arg is not None:
                keywords.add(keyword.arg)
            elif isinstance(keyword.value, ast.Name):
                keywords |= dict_keys.get(keyword.value.id, set())
    return keywords


_TOP_LEVEL = re.compile(r"^(?=(?:@|def |async def |class ))", re.MULTILINE)


def file_attention_call_keywords(source: str) -> set[str]:
    """``attention_call_keywords`` of a modeling file, parsing only its top-level definitions that mention
    the interface (whole files take seconds to parse); the whole file where a piece does not parse alone."""
    pieces = [piece for piece in _TOP_LEVEL.split(source) if "attention_interface" in piece]
    try:
        return set().union(*(attention_call_keywords(piece) for piece in pieces))
    except SyntaxError:
        return attention_call_keywords(source)


@functools.cache
def installed_model_keywords() -> dict[str, set[str]]:
    """``{keyword: model folders}`` over every ``transformers/models/*/modeling_*.py`` installed (read once:
    parsing them takes seconds)."""
    models = Path(transformers.__file__).parent / "models"
    found: dict[str, set[str]] = {}
    for path in sorted(models.glob("*/modeling_*.py")):
        source = path.read_text(encoding="utf-8")
        if "attention_interface" not in source:
            continue
        for keyword in file_attention_call_keywords(source):
            found.setdefault(keyword, set()).add(path.parent.name)
    return found


def unclassified(keywords) -> set[str]:
    """The keywords ``fs_attention`` neither honours, accepts as harmless nor refuses."""
    known = PARAMETERS | HONOURED_KEYWORDS | HARMLESS_KEYWORDS | set(REFUSED_KEYWORDS)
    return set(keywords) - known


def test_the_three_sets_are_disjoint_and_honoured_ones_are_parameters():
    assert not HONOURED_KEYWORDS & HARMLESS_KEYWORDS
    assert not HONOURED_KEYWORDS & set(REFUSED_KEYWORDS)
    assert not HARMLESS_KEYWORDS & set(REFUSED_KEYWORDS)
    parameters = inspect.signature(fs_attention_forward).parameters
    named = {name for name, p in parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    assert named == PARAMETERS | HONOURED_KEYWORDS


def test_the_scan_finds_keywords_and_flags_a_new_one():
    """The scan is what the next test relies on: it must see the known model-specific keywords, and a
    keyword nobody classified must come out as unclassified."""
    source = (
        "def forward(self, q, k, v, mask):\n"
        "    extra = {'dropout': 0.0, 'brand_new_bias': 1}\n"
        "    return attention_interface(self, q, k, v, mask, scaling=1.0, **extra, **kwargs)\n"
    )
    assert attention_call_keywords(source) == {"scaling", "dropout", "brand_new_bias"}
    assert unclassified(attention_call_keywords(source)) == {"brand_new_bias"}
    found = installed_model_keywords()
    assert len(found["scaling"]) > 100
    assert {"s_aux", "position_bias", "sliding_window", "softcap"} <= found.keys()


def test_every_keyword_installed_models_pass_is_classified():
    """Explicit keywords of every attention call in the installed transformers, and the keys of the typed
    ``**kwargs`` the models thread down to their attention layers."""
    found = installed_model_keywords()
    threaded = set(TransformersKwargs.__annotations__) | set(FlashAttentionKwargs.__annotations__)
    missing = {
        keyword: sorted(found.get(keyword, {"**kwargs"}))[:5] for keyword in unclassified(found.keys() | threaded)
    }
    assert not missing, f"keywords fs_attention does not classify (keyword: some models): {missing}"


@pytest.mark.parametrize("keyword", ["brand_new_bias", "alibi"])
def test_an_unknown_keyword_is_refused_even_when_none(keyword):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=rf"{keyword}=None is not supported.*attn_implementation='eager'"):
        fs_attention_forward(_Layer(), q, k, v, None, **{keyword: None})


@pytest.mark.parametrize("keyword", sorted(REFUSED_KEYWORDS))
def test_refused_keywords_raise_with_a_value_and_pass_as_none(keyword):
    q, k, v = _qkv()
    out, _ = fs_attention_forward(_Layer(), q, k, v, None, **{keyword: None})
    assert out.shape == (2, 6, 4, 8)
    with pytest.raises(ValueError, match=rf"{keyword}=<tensor of shape \(2, 6, 3\).*not supported"):
        fs_attention_forward(_Layer(), q, k, v, None, **{keyword: torch.zeros(2, 6, 3, dtype=torch.long)})


def test_harmless_keywords_leave_the_result_unchanged():
    q, k, v = _qkv()
    expected, _ = fs_attention_forward(_Layer(), q, k, v, None)
    harmless = dict(
        output_attentions=False, output_hidden_states=True, output_router_logits=False, use_cache=True,
        past_key_values=object(), cache_position=torch.arange(6), position_embeddings=(q, q),
        num_items_in_batch=torch.tensor(5), logits_to_keep=1, deterministic=True, max_length_q=6, max_length_k=9,
        position_ids=torch.arange(3, 9)[None], seq_idx=torch.zeros(1, 6, dtype=torch.int32),
        encoder_hidden_states=None, token_type_ids=torch.zeros(2, 6, dtype=torch.long), return_dict=True,
    )
    assert set(harmless) <= HARMLESS_KEYWORDS | HONOURED_KEYWORDS
    out, weights = fs_attention_forward(_Layer(), q, k, v, None, **harmless)
    assert weights is None and torch.equal(out, expected)


def test_output_attentions_warns_and_gives_no_weights():
    q, k, v = _qkv()
    with pytest.warns(UserWarning, match="output_attentions=True returns None"):
        _, weights = fs_attention_forward(_Layer(), q, k, v, None, output_attentions=True)
    assert weights is None


# --------------------------------------------------------------------------------------------------------
# Honoured keywords, one layer against the float64 reference


class _Layer(torch.nn.Module):
    """Stands for a transformers attention layer: what the attention function reads from ``module``."""

    def __init__(self, is_causal: bool = True, num_key_value_groups: int = 2):
        super().__init__()
        self.is_causal = is_causal
        self.num_key_value_groups = num_key_value_groups


def _qkv(batch=2, heads_q=4, heads_kv=2, seqlen_q=6, seqlen_k=9, head_dim=8, seed=6):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads_q, seqlen_q, head_dim, generator=generator)
    k = torch.randn(batch, heads_kv, seqlen_k, head_dim, generator=generator)
    v = torch.randn(batch, heads_kv, seqlen_k, head_dim, generator=generator)
    return q, k, v


def _double(*tensors):
    return [t.detach().double() for t in tensors]


def _padding_mask(batch=2, seqlen_q=6, seqlen_k=9):
    """transformers' bool keep-mask ``(B, 1, Sq, Sk)``: bottom-right causal, the second row's first 3 keys
    padding."""
    keep = fs.reference.band_mask(seqlen_q, seqlen_k, True, (-1, 0), "cpu").expand(batch, 1, seqlen_q, seqlen_k)
    keep = keep.clone()
    keep[1, :, :, :3] = False
    return keep


@pytest.mark.parametrize("mask", ["none", "bool", "float"])
def test_position_bias_is_added_under_the_mask_and_gets_its_gradient(mask):
    """T5's relative bias ``(1, Hq, Sq, Sk)``: added to the scaled scores with the causal band (no mask), a
    bool keep-mask or a float mask on top, as T5's eager function adds ``position_bias`` and then the mask.
    Its gradient is the float64 reference's."""
    q, k, v = _qkv()
    generator = torch.Generator().manual_seed(7)
    bias = torch.randn(1, 4, 6, 9, generator=generator).requires_grad_()
    masks = {"none": None, "bool": _padding_mask(), "float": torch.randn(2, 1, 6, 9, generator=generator)}
    attention_mask = masks[mask]
    out, _ = fs_attention_forward(_Layer(), q, k, v, attention_mask, scaling=1.0, position_bias=bias)
    grad_out = torch.randn(out.shape, generator=generator)
    (grad_bias,) = torch.autograd.grad(out, bias, grad_out)

    q64, k64, v64, bias64 = _double(q, k, v, bias)
    bias64.requires_grad_()
    if mask == "none":
        truth = fs.reference.attention(q64, k64, v64, causal=True, softmax_scale=1.0, attn_bias=bias64)
    elif mask == "bool":
        combined = bias64.masked_fill(~attention_mask, float("-inf"))
        truth = fs.reference.attention(q64, k64, v64, softmax_scale=1.0, attn_bias=combined)
    else:
        truth = fs.reference.attention(q64, k64, v64, softmax_scale=1.0, attn_bias=bias64 + attention_mask.double())
    truth = truth.transpose(1, 2)
    (grad_truth,) = torch.autograd.grad(truth, bias64, grad_out.double())
    assert_close(f"output with position_bias, mask {mask}", out, truth, None)
    assert_close(f"position_bias.grad, mask {mask}", grad_bias, grad_truth, None, factor=GRADIENT_FACTOR)
    assert grad_bias.abs().max() > 0


def test_position_bias_with_softcap_is_refused():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="position_bias together with softcap=5.0"):
        fs_attention_forward(_Layer(), q, k, v, None, softcap=5.0, position_bias=torch.zeros(1, 4, 6, 9))


def test_s_aux_are_the_kernel_sinks_with_their_gradient():
    """gpt-oss's ``s_aux (Hq,)``: a per-head virtual key of value 0 in the softmax, under a sliding window."""
    q, k, v = _qkv()
    s_aux = torch.randn(4, generator=torch.Generator().manual_seed(8)).requires_grad_()
    out, _ = fs_attention_forward(_Layer(), q, k, v, None, scaling=0.5, sliding_window=3, s_aux=s_aux)
    (grad,) = torch.autograd.grad(out.sum(), s_aux)
    q64, k64, v64, s64 = _double(q, k, v, s_aux)
    s64.requires_grad_()
    truth = fs.reference.attention(q64, k64, v64, causal=True, softmax_scale=0.5, window_size=(2, 0), sinks=s64)
    (grad_truth,) = torch.autograd.grad(truth.sum(), s64)
    assert_close("output with s_aux", out, truth.transpose(1, 2), None)
    assert_close("s_aux.grad", grad, grad_truth, None, factor=GRADIENT_FACTOR)


def test_s_aux_of_the_wrong_shape_is_refused():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"s_aux \(attention sinks\) must be a tensor of shape \(Hq,\) = \(4,\)"):
        fs_attention_forward(_Layer(), q, k, v, None, s_aux=torch.zeros(2))


def test_per_query_sinks_match_inkling2_eager():
    """Inkling 2 passes ``sinks (B, Hq, Sq, 1)``, one sink logit per query, next to ``position_bias`` and its
    padding mask; its eager function concatenates them to the scores. Gradients reach q, the bias and the
    sinks."""
    inkling2 = pytest.importorskip("transformers.models.inkling2.modeling_inkling2")
    q, k, v = _qkv()
    generator = torch.Generator().manual_seed(9)
    sinks = torch.randn(2, 4, 6, 1, generator=generator)
    bias = torch.randn(1, 4, 6, 9, generator=generator)
    keep = _padding_mask()
    additive = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, torch.finfo(torch.float64).min)

    def run(function, dtype, mask):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, sinks, bias)]
        out, _ = function(_Layer(), inputs[0], k.to(dtype), v.to(dtype), mask, scaling=0.4, dropout=0.0,
                          position_bias=inputs[2], sinks=inputs[1])
        grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
        return out, grads

    out, grads = run(fs_attention_forward, torch.float32, keep)
    truth, grads_truth = run(inkling2.eager_attention_forward, torch.float64, additive)
    assert_close("output with per-query sinks", out, truth, None)
    for name, grad, grad_truth in zip(("q", "sinks", "position_bias"), grads, grads_truth):
        assert_close(f"{name}.grad with per-query sinks", grad, grad_truth, None, factor=GRADIENT_FACTOR)


def test_per_query_sinks_of_the_wrong_shape_are_refused():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"sinks \(per-query sink logits\) must broadcast to \(B, Hq, Sq, 1\)"):
        fs_attention_forward(_Layer(), q, k, v, None, sinks=torch.zeros(4))


@pytest.mark.parametrize("is_causal", [True, False])
def test_cu_seq_lens_keep_packed_sequences_apart(is_causal):
    """Three sequences of 4, 1 and 5 tokens packed into one row of 10: each equals its own attention run
    alone, causal and with a window of 3, bidirectional without one."""
    q, k, v = _qkv(batch=1, seqlen_q=10, seqlen_k=10)
    cu = torch.tensor([0, 4, 5, 10], dtype=torch.int32)
    window = 3 if is_causal else None
    out, _ = fs_attention_forward(
        _Layer(is_causal), q, k, v, None, sliding_window=window, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
        max_length_q=5, max_length_k=5,
    )
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        part = [t[:, :, start:end].double() for t in (q, k, v)]
        truth = fs.reference.attention(*part, causal=is_causal, window_size=(2, 0) if is_causal else (-1, -1))
        assert_close(f"sequence {start}:{end}", out[:, start:end], truth.transpose(1, 2), None)


def test_cu_seq_lens_combine_with_a_mask():
    """A mask transformers built from the same packing (block-diagonal causal) agrees with the packed one."""
    q, k, v = _qkv(batch=1, seqlen_q=7, seqlen_k=7)
    cu = torch.tensor([0, 3, 7])
    segment = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    keep = (segment[:, None] == segment[None, :]) & torch.ones(7, 7, dtype=torch.bool).tril()
    with_mask, _ = fs_attention_forward(_Layer(), q, k, v, keep[None, None], cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    without, _ = fs_attention_forward(_Layer(), q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    truth = fs.reference.attention(*_double(q, k, v), attn_bias=keep)
    assert_close("packed with the mask", with_mask, truth.transpose(1, 2), None)
    assert_close("packed without it", without, truth.transpose(1, 2), None)


@pytest.mark.parametrize(
    "case, message",
    [
        (dict(cu_seq_lens_q=torch.tensor([0, 3, 7])), "cu_seq_lens_k must be an integer tensor"),
        (dict(cu_seq_lens_q=torch.tensor([0, 3, 7]), cu_seq_lens_k=torch.tensor([0, 7])), "the same sequences"),
        (dict(cu_seq_lens_q=torch.tensor([0, 3, 6]), cu_seq_lens_k=torch.tensor([0, 3, 6])), "rise from 0 to the"),
        (dict(cu_seq_lens_q=torch.tensor([0.0, 7.0]), cu_seq_lens_k=torch.tensor([0, 7])), "cu_seq_lens_q must be"),
    ],
    ids=["one-missing", "counts-differ", "wrong-total", "float"],
)
def test_cu_seq_lens_that_do_not_describe_the_row_are_refused(case, message):
    q, k, v = _qkv(batch=1, seqlen_q=7, seqlen_k=7)
    with pytest.raises(ValueError, match=message):
        fs_attention_forward(_Layer(), q, k, v, None, **case)


def test_cu_seq_lens_need_one_row():
    q, k, v = _qkv(batch=2, seqlen_q=7, seqlen_k=7)
    cu = torch.tensor([0, 3, 7])
    with pytest.raises(ValueError, match="packed into one row \\(batch 1\\); got batch 2"):
        fs_attention_forward(_Layer(), q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu)


def test_restarting_position_ids_without_a_mask_are_packed_sequences():
    """Packed rows that reach a layer without a mask (FlashAttention's convention): positions that restart
    inside a row start a new sequence, each attending only within itself, through varlen. With a mask, or
    with increasing positions (a chunk on a cache), they are unread; restarting positions of a chunk on a
    cache are refused (the sequences of the cached keys are unknown)."""
    q, k, v = _qkv(batch=1, seqlen_q=7, seqlen_k=7)
    packed = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    segment = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    keep = ((segment[:, None] == segment[None, :]) & torch.ones(7, 7, dtype=torch.bool).tril())[None, None]
    truth = fs.reference.attention(*_double(q, k, v), attn_bias=keep)
    out, _ = fs_attention_forward(_Layer(), q, k, v, None, position_ids=packed)
    assert_close("packed rows from their positions", out, truth.transpose(1, 2), None)
    out, _ = fs_attention_forward(_Layer(), q, k, v, keep, position_ids=packed)
    assert_close("packed rows with their mask", out, truth.transpose(1, 2), None)
    q, k, v = _qkv(batch=1, seqlen_q=4, seqlen_k=7)
    fs_attention_forward(_Layer(), q, k, v, None, position_ids=torch.arange(3, 7)[None])
    with pytest.raises(ValueError, match="position_ids .* restart inside a row"):
        fs_attention_forward(_Layer(), q, k, v, None, position_ids=torch.tensor([[5, 6, 0, 1]]))


def test_position_ids_are_read_once_per_tensor(monkeypatch):
    """Every layer of a forward gets the same position_ids: one host read for all of them."""
    reads = []
    original = torch.Tensor.any

    def counting_any(self, *args, **kwargs):
        if self.dtype == torch.bool and self.shape == (1, 6):  # position_ids[:, 1:] < position_ids[:, :-1]
            reads.append(self.shape)
        return original(self, *args, **kwargs)

    q, k, v = _qkv(batch=1, seqlen_q=7, seqlen_k=7)
    positions = torch.arange(7)[None]
    monkeypatch.setattr(torch.Tensor, "any", counting_any)
    for _ in range(3):
        fs_attention_forward(_Layer(), q, k, v, None, position_ids=positions)
    fs_attention_forward(_Layer(), q, k, v, None, position_ids=positions.clone())
    assert len(reads) == 2


# --------------------------------------------------------------------------------------------------------
# Dropout runs in the kernel


def test_dropout_in_training_runs_in_the_kernel():
    """In training mode ``dropout`` is the kernel's ``dropout_p``: the same call as ``fs.flash_attention``
    under the same seed, reproducible with ``torch.manual_seed``, different from evaluation, and no
    fallback (on the test device: the GPU's kernels, or the interpreter's); softcap with it is fine. In
    evaluation it is ignored."""
    q, k, v = (t.to(DEVICE) for t in _qkv())
    layer = _Layer().train()
    fs.reset_stats()
    torch.manual_seed(8)
    out, _ = fs_attention_forward(layer, q, k, v, None, dropout=0.5, softcap=5.0)
    torch.manual_seed(8)
    again, _ = fs_attention_forward(layer, q, k, v, None, dropout=0.5, softcap=5.0)
    torch.manual_seed(8)
    direct = fs.flash_attention(q, k, v, causal=True, softcap=5.0, dropout_p=0.5)
    assert torch.equal(out, again) and torch.equal(out, direct.transpose(1, 2))
    stats = fs.stats()
    assert not stats["fallbacks"] and sum(stats["attention_forward"].values()) == 3

    layer.eval()
    evaluated, _ = fs_attention_forward(layer, q, k, v, None, dropout=0.5, softcap=5.0)
    truth = fs.reference.attention(*_double(q, k, v), causal=True, softcap=5.0)
    assert_close("eval output ignores dropout", evaluated, truth.transpose(1, 2), None)
    assert not fs.stats()["fallbacks"]
    assert (out - evaluated).abs().max() > 0.1
