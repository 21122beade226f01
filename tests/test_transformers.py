"""Hugging Face transformers integration: ``attn_implementation="fs_attention"`` (docs/semantics.md,
'Drop-in for transformer code').

Tiny randomly initialised models (no downloads) in float32 run the kernels; the truth is the same weights
in float64, judged by the accuracy policy (float32 within 1e-5 relative of a float64 truth).

Where batches are left-padded the float64 truth runs transformers' ``"sdpa"`` implementation, not
``"eager"``: eager adds ``finfo(float64).min`` to masked scores, which overflows to -inf once a score is
subtracted, so a fully padded query row becomes NaN, and the next layer spreads it to every row through
``0 * NaN`` in the value matmul. Torch's sdpa on CPU gives such a row 0, as our kernel does. Eager in
float32 is then held to the same bound against the same truth, so the comparison says the two
implementations agree.
"""

from __future__ import annotations

import copy
import os

import pytest

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402
from transformers.masking_utils import (  # noqa: E402
    sdpa_mask,
    sliding_window_causal_mask_function,
)

import flash_softmax as fs  # noqa: E402
import flash_softmax.integrations.transformers as integration  # noqa: E402
from flash_softmax.integrations.transformers import (  # noqa: E402
    ATTENTION_NAME,
    fs_attention_forward,
    fs_attention_mask,
    register,
)
from flash_softmax.testing import GRADIENT_FACTOR, assert_close  # noqa: E402

VOCAB = 128


def tiny_model(model_class, config_class, seed: int, **settings):
    """A ``model_class`` in eval mode, initialised from ``torch.manual_seed(seed)``: ``VOCAB`` tokens, 2
    layers, grouped-query attention (4 query heads on 2 KV heads), 64 positions, and ``settings``."""
    config = config_class(
        vocab_size=VOCAB,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **settings,
    )
    torch.manual_seed(seed)
    return model_class(config).eval()


@pytest.fixture(scope="module")
def llama():
    """A 2-layer Llama with grouped-query attention (4 query heads, 2 KV heads, head dim 16)."""
    return tiny_model(LlamaForCausalLM, LlamaConfig, 0, hidden_size=64, intermediate_size=128, pad_token_id=0)


def with_attention(model, implementation: str, dtype: torch.dtype):
    """A copy of ``model`` (same weights) in ``dtype`` running ``implementation``."""
    copied = copy.deepcopy(model).to(dtype)
    copied.set_attn_implementation(implementation)
    return copied


def left_padded_batch():
    """Three sequences of 11 tokens, the second and third left-padded by 4 and 1 (mask 0 = padding)."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, VOCAB, (3, 11), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0
    attention_mask[2, :1] = 0
    input_ids[attention_mask == 0] = 0
    return input_ids, attention_mask


def test_register_returns_a_name_transformers_does_not_treat_as_flash_attention():
    name = register()
    assert name == ATTENTION_NAME == "fs_attention"
    assert "flash" not in name
    assert register() == name
    assert transformers.AttentionInterface()[name] is fs_attention_forward
    assert transformers.masking_utils.AttentionMaskInterface()[name] is fs_attention_mask


def test_model_reports_the_implementation(llama):
    model = with_attention(llama, register(), torch.float32)
    assert model.config._attn_implementation == "fs_attention"
    assert all(layer.self_attn.config._attn_implementation == "fs_attention" for layer in model.model.layers)


def test_left_padded_gradients_match(llama):
    """Loss over the real tokens only, then every parameter's gradient. Labels are -100 on padding and on
    each row's first real token, which only a padded position would predict: a query row that sees no key
    is 0 in sdpa and in our kernel but a uniform average in eager, and must not reach the loss."""
    input_ids, attention_mask = left_padded_batch()
    predicted_by_padding = torch.zeros_like(attention_mask, dtype=torch.bool)
    predicted_by_padding[:, 1:] = attention_mask[:, :-1] == 0
    labels = input_ids.masked_fill((attention_mask == 0) | predicted_by_padding, -100)

    def gradients(implementation, dtype):
        model = with_attention(llama, implementation, dtype)
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        return {name: parameter.grad for name, parameter in model.named_parameters()}

    truth = gradients("sdpa", torch.float64)
    for implementation in (register(), "eager"):
        actual = gradients(implementation, torch.float32)
        assert actual.keys() == truth.keys()
        for name, grad in actual.items():
            assert grad is not None and grad.abs().max() > 0, name
            assert_close(f"{implementation} {name}.grad", grad, truth[name], None, factor=GRADIENT_FACTOR)


def test_chunked_prefill_on_a_cache_uses_bottom_right_causal(llama, monkeypatch):
    """6 tokens, then 5 more on top of their cache: the second forward's queries sit at positions 6..10 of
    11 keys. The mask function returns None and the kernel runs ``causal=True`` with Sq=5, Sk=11."""
    name = register()
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(1, VOCAB, (2, 11), generator=generator)
    truth = with_attention(llama, "eager", torch.float64)(input_ids=input_ids).logits

    calls = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        calls.append((query.shape[2], key.shape[2], attention_mask))
        return fs_attention_forward(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(transformers.AttentionInterface._global_mapping, name, recording)
    model = with_attention(llama, name, torch.float32)
    cache = DynamicCache(config=model.config)
    first = model(input_ids=input_ids[:, :6], past_key_values=cache, use_cache=True).logits
    second = model(input_ids=input_ids[:, 6:], past_key_values=cache, use_cache=True).logits

    assert [(sq, sk) for sq, sk, _ in calls] == [(6, 6)] * 2 + [(5, 11)] * 2
    assert all(mask is None for _, _, mask in calls)
    assert_close("prefill logits", first, truth[:, :6], None)
    assert_close("chunk logits", second, truth[:, 6:], None)


def test_greedy_generate_unpadded_matches_eager(llama):
    """Without padding every step takes the kernel's causal path (mask None): Sq=1 sees every cached key."""
    input_ids = torch.randint(1, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = with_attention(llama, "eager", torch.float32).generate(input_ids, **settings)
    generated = with_attention(llama, register(), torch.float32).generate(input_ids, **settings)
    assert torch.equal(generated, expected)


def test_gemma2_softcap_and_sliding_window_match():
    """Gemma 2 passes ``softcap`` (attn_logit_softcapping) and ``sliding_window`` to the attention; a window
    of 4 over 10 tokens is materialised in the mask. The softcap is small enough to change the result."""
    gemma = tiny_model(
        Gemma2ForCausalLM,
        Gemma2Config,
        4,
        hidden_size=32,
        intermediate_size=64,
        head_dim=8,
        query_pre_attn_scalar=1,
        attn_logit_softcapping=0.5,
        final_logit_softcapping=None,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        initializer_range=0.2,
    )
    input_ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    truth = with_attention(gemma, "eager", torch.float64)(input_ids=input_ids).logits
    logits = with_attention(gemma, register(), torch.float32)(input_ids=input_ids).logits
    assert_close("gemma2 logits", logits, truth, None)

    uncapped = copy.deepcopy(gemma)
    uncapped.config.attn_logit_softcapping = None
    for layer in uncapped.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    uncapped_truth = with_attention(uncapped, "eager", torch.float64)(input_ids=input_ids).logits
    assert (uncapped_truth - truth).abs().max() > 1e3 * 1e-5 * truth.abs().max()


class _Layer(torch.nn.Module):
    """Stands for a transformers attention layer: what the attention function reads from ``module``."""

    def __init__(self, num_key_value_groups: int, is_causal: bool = True):
        super().__init__()
        self.num_key_value_groups = num_key_value_groups
        self.is_causal = is_causal


def _qkv(batch=2, heads_q=4, heads_kv=2, seqlen_q=6, seqlen_k=9, head_dim=8, dtype=torch.float32):
    generator = torch.Generator().manual_seed(6)
    q = torch.randn(batch, heads_q, seqlen_q, head_dim, generator=generator, dtype=dtype)
    k = torch.randn(batch, heads_kv, seqlen_k, head_dim, generator=generator, dtype=dtype)
    v = torch.randn(batch, heads_kv, seqlen_k, head_dim, generator=generator, dtype=dtype)
    return q, k, v


def test_sliding_window_without_a_mask_is_the_kernel_window():
    """transformers' ``sliding_window=w`` keeps ``q - w < k <= q``: our window ``(w - 1, 0)``, aligned to the
    bottom-right corner. Checked against the float64 reference with HF's own sliding-window mask."""
    q, k, v = _qkv()
    window = 3
    out, weights = fs_attention_forward(_Layer(2), q, k, v, None, sliding_window=window)
    assert weights is None and out.shape == (2, 6, 4, 8) and out.is_contiguous()
    hf_mask = sdpa_mask(
        batch_size=2, q_length=6, kv_length=9, q_offset=3, mask_function=sliding_window_causal_mask_function(window),
        allow_is_causal_skip=False,
    )
    truth = fs.reference.attention(q.double(), k.double(), v.double(), attn_bias=hf_mask)
    assert_close("windowed output", out, truth.transpose(1, 2), None)


def test_bidirectional_layer_without_a_mask_sees_every_key():
    q, k, v = _qkv()
    out, _ = fs_attention_forward(_Layer(2, is_causal=False), q, k, v, None)
    truth = fs.reference.attention(q.double(), k.double(), v.double())
    assert_close("bidirectional output", out, truth.transpose(1, 2), None)


def test_float_mask_is_added_to_the_scores():
    """A 4D additive mask prepared by the user reaches the attention unchanged; it is cut to the keys."""
    q, k, v = _qkv()
    bias = torch.randn(2, 1, 6, 12, generator=torch.Generator().manual_seed(7))
    out, _ = fs_attention_forward(_Layer(2), q, k, v, bias, scaling=0.3)
    truth = fs.reference.attention(
        q.double(), k.double(), v.double(), softmax_scale=0.3, attn_bias=bias[..., :9].double()
    )
    assert_close("biased output", out, truth.transpose(1, 2), None)


@pytest.mark.parametrize(
    "case",
    [
        dict(q_length=7, kv_length=7),  # prefill
        dict(q_length=1, kv_length=8, q_offset=7),  # decoding with a dynamic cache
        dict(q_length=5, kv_length=11, q_offset=6),  # chunked prefill on a cache
        dict(q_length=5, kv_length=5, local_size=8, mask_function=sliding_window_causal_mask_function(8)),
    ],
    ids=["prefill", "decode", "chunk", "window-wider-than-keys"],
)
def test_mask_is_none_where_the_kernel_causal_pattern_is_exact(case):
    padding = torch.ones(2, case["kv_length"], dtype=torch.bool)
    assert fs_attention_mask(batch_size=2, attention_mask=padding, **case) is None
    hf = sdpa_mask(batch_size=2, allow_is_causal_skip=False, **case)
    bottom_right = fs.reference.band_mask(case["q_length"], case["kv_length"], True, (-1, 0), "cpu")
    assert torch.equal(hf, bottom_right.expand_as(hf))


@pytest.mark.parametrize(
    "case",
    [
        dict(q_length=4, kv_length=16),  # static cache: empty slots after the queries
        dict(q_length=1, kv_length=16, q_offset=torch.tensor(5)),  # static cache while decoding
        dict(q_length=6, kv_length=6, allow_is_causal_skip=False),  # the caller builds on the mask
        dict(q_length=6, kv_length=6, padded=True, allow_is_causal_skip=False),
        dict(q_length=8, kv_length=8, mask_function=transformers.masking_utils.chunked_causal_mask_function(
            3, torch.zeros(2, dtype=torch.long)), local_size=3),  # chunks: not a band
        dict(q_length=6, kv_length=6, mask_function=transformers.masking_utils.and_masks(
            transformers.masking_utils.causal_mask_function, lambda b, h, q, kv: kv != 2),
             allow_is_causal_skip=False),  # an overlay (create_causal_mask then allows no skip)
    ],
    ids=["static-prefill", "static-decode", "no-skip", "no-skip-padded", "chunked", "overlay"],
)
def test_mask_is_transformers_bool_mask_otherwise(case):
    """What is not sequences and a band keeps transformers' own (B, 1, Sq, Sk) mask."""
    case = dict(case)
    padding = torch.ones(2, case["kv_length"], dtype=torch.bool)
    if case.pop("padded", False):
        padding[1, :3] = False
    mask = fs_attention_mask(batch_size=2, attention_mask=padding, **case)
    case.pop("allow_is_causal_skip", None)
    expected = sdpa_mask(batch_size=2, attention_mask=padding, allow_is_causal_skip=False, **case)
    assert mask is not None and mask.dtype == torch.bool
    assert mask.shape == (2, 1, case["q_length"], case["kv_length"])
    assert torch.equal(mask, expected)


@pytest.mark.parametrize(
    "case",
    [
        dict(q_length=7, kv_length=7, padded=True, band=(-1, 0)),  # left padding, prefill
        dict(q_length=1, kv_length=8, q_offset=7, padded=True, band=(-1, 0)),  # decoding on a cache
        dict(q_length=9, kv_length=9, local_size=4, mask_function=sliding_window_causal_mask_function(4),
             band=(3, 0)),
        dict(q_length=5, kv_length=9, q_offset=4, local_size=4, padded=True, band=(3, 0),
             mask_function=sliding_window_causal_mask_function(4)),  # window and padding, a chunk on a cache
    ],
    ids=["padded-prefill", "padded-decode", "window", "window-padded-chunk"],
)
def test_padding_and_windows_give_a_compact_mask(case, monkeypatch):
    """Padding and windows: a (B, Sk) mask of the real keys, no (B, 1, Sq, Sk) one, and transformers' mask
    never built (sdpa_mask is not called). The mask stands for the band the attention will apply."""
    case = dict(case)
    band = case.pop("band")
    padding = torch.ones(2, case["kv_length"], dtype=torch.bool)
    if case.pop("padded", False):
        padding[1, :3] = False

    def forbidden(*args, **kwargs):
        raise AssertionError("transformers' dense mask was built")

    monkeypatch.setattr(integration, "sdpa_mask", forbidden)
    mask = fs_attention_mask(batch_size=2, attention_mask=padding, **case)
    assert mask is not None and mask.dtype == torch.bool
    assert mask.shape == (2, case["kv_length"])
    assert torch.equal(mask, padding)
    layout = integration._LAYOUTS[mask]
    assert layout.causal and layout.window == band


def test_bidirectional_mask_without_padding_is_none():
    padding = torch.ones(2, 6, dtype=torch.bool)
    common = dict(batch_size=2, q_length=6, kv_length=6, attention_mask=padding, allow_is_causal_skip=False)
    assert fs_attention_mask(mask_function=lambda *_: True, allow_is_bidirectional_skip=True, **common) is None
    padding[0, 0] = False
    # A pattern the integration does not know: transformers' mask.
    mask = fs_attention_mask(
        mask_function=lambda b, h, q, kv: q >= 0, allow_is_bidirectional_skip=True, **common,
    )
    assert mask.shape == (2, 1, 6, 6) and not mask[0, 0, :, 0].any() and mask[1].all()
    # transformers' bidirectional pattern with padding: the compact (B, Sk) mask of the real keys.
    mask = fs_attention_mask(
        mask_function=transformers.masking_utils.bidirectional_mask_function, allow_is_bidirectional_skip=True,
        **common,
    )
    assert mask.shape == (2, 6) and torch.equal(mask, padding)
