"""Hugging Face ``generate`` with a static cache (``cache_implementation="static"``) through
``fs.flash_attention_with_kvcache`` (docs/semantics.md, 'Drop-in for transformer code').

Each decoding step's mask function returns transformers' own one-row mask ``(B, 1, 1, Smax)`` with a record
of the cache's valid lengths; the attention layers then read their static cache in place over those lengths:
a full-attention layer its first ``cache_position + 1`` slots, a sliding-window layer its rolled window of at
most ``sliding_window`` slots. A prefill into empty slots and a left-padded batch keep transformers' mask.

Tiny randomly initialised models (no downloads) in float32: greedy tokens must be eager's (with the same
static cache), every step's logits within the accuracy policy of the same weights in float64 with eager
attention and no cache over the generated tokens. Where a window is the point, dropping it changes that truth.
The ``routes`` fixture records the kernel calls and the dense masks built;
``test_the_route_check_catches_a_dense_decode`` shows the check fails when the decoding steps go dense.
"""

from __future__ import annotations

import os

import pytest

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import StaticCache  # noqa: E402
from transformers.masking_utils import (  # noqa: E402
    create_masks_for_generate,
    sdpa_mask,
    sliding_window_causal_mask_function,
)

import flash_softmax as fs  # noqa: E402
from flash_softmax._backend import backend_for  # noqa: E402
import flash_softmax.integrations.transformers as integration  # noqa: E402
from flash_softmax.integrations.transformers import fs_attention_forward, fs_attention_mask, register  # noqa: E402
from flash_softmax.testing import assert_close  # noqa: E402

from test_transformers_models import far_apart, gpt_oss, tokens, with_attention  # noqa: E402, F401
from test_transformers_varlen import _qwen2, llama, padded_batch  # noqa: E402, F401

PROMPT = 7
NEW_TOKENS = 6


class Routes:
    """The integration's kernel calls in order, ``("kvcache", q shape, cache_seqlens, window_size)``,
    ``("flash_attention", attn_bias shape or None)`` and ``("varlen",)``, and ``("dense mask", q_length)`` for
    every transformers' dense mask it builds."""

    def __init__(self, monkeypatch):
        self.calls = []
        kvcache, flash_attention = integration.flash_attention_with_kvcache, integration.flash_attention
        varlen, dense_mask = integration.flash_attention_varlen, integration.sdpa_mask

        def recording_kvcache(q, k_cache, v_cache, *args, **options):
            lengths = options["cache_seqlens"].tolist()
            self.calls.append(("kvcache", tuple(q.shape), lengths, tuple(options["window_size"])))
            return kvcache(q, k_cache, v_cache, *args, **options)

        def recording_flash_attention(q, k, v, **options):
            bias = options.get("attn_bias")
            self.calls.append(("flash_attention", None if bias is None else tuple(bias.shape)))
            return flash_attention(q, k, v, **options)

        def recording_varlen(*args, **options):
            self.calls.append(("varlen",))
            return varlen(*args, **options)

        def recording_dense_mask(*args, **kwargs):
            self.calls.append(("dense mask", kwargs["q_length"]))
            return dense_mask(*args, **kwargs)

        monkeypatch.setattr(integration, "flash_attention_with_kvcache", recording_kvcache)
        monkeypatch.setattr(integration, "flash_attention", recording_flash_attention)
        monkeypatch.setattr(integration, "flash_attention_varlen", recording_varlen)
        monkeypatch.setattr(integration, "sdpa_mask", recording_dense_mask)

    def kernels(self) -> list:
        return [call for call in self.calls if call[0] != "dense mask"]

    def assert_decoding_through_kvcache(self, batch: int, heads: int, lengths: list[int]) -> None:
        """No dense mask for one query row was built (a prefill's several rows into empty slots keep theirs);
        the kernel calls after the prefill's (one per layer) are all ``flash_attention_with_kvcache`` of one
        query row, over ``lengths[i]`` keys for every row of the batch in the ``i``-th of them, the window
        hiding nothing (a sliding layer's cache holds at most its window); and ``fs.stats()`` counted them,
        on the path these (cpu) tensors take: the kernels in Triton's interpreter, or on a CUDA machine the
        reference, as for the other transformers tests."""
        dense = [call[1] for call in self.calls if call[0] == "dense mask"]
        assert all(q_length > 1 for q_length in dense), f"a decoding step built transformers' dense mask: {dense}"
        kernels = self.kernels()
        prefill, decode = kernels[: len(kernels) - len(lengths)], kernels[len(kernels) - len(lengths) :]
        assert prefill and all(call[0] != "kvcache" for call in prefill), prefill
        assert [call[0] for call in decode] == ["kvcache"] * len(lengths), decode
        assert all(call[1][:3] == (batch, heads, 1) for call in decode), decode
        assert [call[2] for call in decode] == [[length] * batch for length in lengths]
        assert all(call[3] == (-1, 0) for call in decode), decode
        assert fs.stats().get("attention_kvcache") == {backend_for(torch.device("cpu")): len(lengths)}


@pytest.fixture
def routes(monkeypatch):
    fs.reset_stats()
    return Routes(monkeypatch)


def expected_lengths(layer_types: list[str], window: int | None, prompt: int, new_tokens: int) -> list[int]:
    """The keys each layer's kvcache call covers, step by step: decoding step ``s`` (1 to ``new_tokens - 1``;
    the prefill gives the first token) has its query at position ``prompt + s - 1``."""
    lengths = []
    for step in range(1, new_tokens):
        for kind in layer_types:
            full = prompt + step
            lengths.append(min(full, window) if kind == "sliding_attention" else full)
    return lengths


def static_settings(new_tokens: int = NEW_TOKENS) -> dict:
    return dict(
        max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None, cache_implementation="static",
    )


def without_window(model):
    """A float64 eager copy of ``model`` whose windows cover every position: the truth if windows were dropped."""
    windowless = with_attention(model, "eager", torch.float64)
    windowless.config.sliding_window = 64
    for layer in windowless.model.layers:
        if getattr(layer.self_attn, "sliding_window", None):
            layer.self_attn.sliding_window = 64
    return windowless


@pytest.mark.parametrize(
    "make, prompt",
    [("llama", PROMPT), ("qwen2", PROMPT), ("qwen2", 2), ("gpt_oss", PROMPT)],
    ids=["llama", "qwen2-window", "qwen2-window-fills-while-decoding", "gpt-oss-sinks-window"],
)
def test_static_generate_matches_eager(request, routes, make, prompt):
    """Greedy decoding on a static cache: tokens identical to eager's on the same cache, every step's logits
    within the accuracy policy of float64 eager attention without a cache over the generated tokens, and
    every decoding step of every layer through ``flash_attention_with_kvcache`` over the cache's valid slots
    (Qwen 2 and GPT-OSS: a window of 4 next to a full layer; a prompt of 7 fills the window at the prefill,
    one of 2 while decoding; GPT-OSS's sinks)."""
    model = _qwen2() if make == "qwen2" else request.getfixturevalue(make)
    config = model.config
    input_ids = tokens(2, prompt, 80)
    expected = with_attention(model, "eager", torch.float32).generate(input_ids, **static_settings())
    output = with_attention(model, register(), torch.float32).generate(
        input_ids, return_dict_in_generate=True, output_logits=True, **static_settings()
    )
    assert output.sequences.shape == (2, prompt + NEW_TOKENS)
    assert torch.equal(output.sequences, expected)

    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    lengths = expected_lengths(layer_types, window, prompt, NEW_TOKENS)
    routes.assert_decoding_through_kvcache(2, config.num_attention_heads, lengths)

    logits = torch.stack(output.logits, dim=1)  # (B, new tokens, V): step s predicts token prompt + s
    positions = slice(prompt - 1, prompt + NEW_TOKENS - 1)
    truth = with_attention(model, "eager", torch.float64)(input_ids=output.sequences).logits[:, positions]
    assert_close(f"{type(model).__name__} static-cache logits", logits, truth, None)
    if window is not None:
        assert prompt + NEW_TOKENS > window
        assert far_apart(without_window(model)(input_ids=output.sequences).logits[:, positions], truth)


def test_the_route_check_catches_a_dense_decode(llama, monkeypatch):
    """With the decoding record switched off, each step builds transformers' (B, 1, 1, Smax) mask and
    flash_attention reads it: the check the other tests rely on fails."""
    model = with_attention(llama, register(), torch.float32)
    input_ids = tokens(2, PROMPT, 81)
    monkeypatch.setattr(integration, "_decode_mask", lambda *args, **kwargs: integration._DENSE)
    fs.reset_stats()
    dense = Routes(monkeypatch)
    model.generate(input_ids, **static_settings(3))
    assert ("dense mask", 1) in dense.calls
    assert not any(call[0] == "kvcache" for call in dense.calls)
    with pytest.raises(AssertionError, match="dense mask"):
        dense.assert_decoding_through_kvcache(2, 4, expected_lengths(["full_attention"] * 2, None, PROMPT, 3))


def test_left_padded_static_generate_keeps_the_dense_mask(llama, routes):
    """A left-padded batch on a static cache: the cache's first slots of a padded row are padding, which
    ``flash_attention_with_kvcache`` cannot leave out, so every step keeps transformers' mask (one query row
    of it while decoding). The tokens are eager's."""
    input_ids, attention_mask = padded_batch("left")
    settings = static_settings(3)
    expected = with_attention(llama, "eager", torch.float32).generate(
        input_ids, attention_mask=attention_mask, **settings
    )
    generated = with_attention(llama, register(), torch.float32).generate(
        input_ids, attention_mask=attention_mask, **settings
    )
    assert torch.equal(generated, expected)
    assert not any(call[0] == "kvcache" for call in routes.calls)
    decode = routes.kernels()[2:]
    assert len(decode) == 2 * 2 and all(call == ("flash_attention", (3, 1, 1, 13)) for call in decode), decode


# --------------------------------------------------------------------------------------------------------
# The mask function and one layer


@pytest.mark.parametrize(
    "case, lengths, window",
    [
        # A full-attention layer of a static cache: q_offset is the cache's counter (a tensor).
        (dict(kv_length=16, q_offset=torch.tensor(5)), 6, (-1, 0)),
        # A sliding-window layer (window 4) before its cache is full: integer offsets, empty slots after.
        (dict(kv_length=4, q_offset=1, local_size=4, window=4), 2, (-1, 0)),
        # ... and once full: the cache rolled, its 4 slots the positions 6 to 9.
        (dict(kv_length=4, q_offset=9, kv_offset=6, local_size=4, window=4), 4, (-1, 0)),
        # A window over a full-length cache hides keys: the kernel applies it.
        (dict(kv_length=16, q_offset=torch.tensor(9), local_size=4, window=4), 10, (3, 0)),
    ],
    ids=["full", "sliding-filling", "sliding-rolled", "window-over-full-cache"],
)
def test_decode_mask_is_transformers_mask_with_the_lengths(case, lengths, window, monkeypatch):
    """One query row over a cache with no skip allowed (transformers' decoding on a compileable cache): the
    mask is transformers' own, made without its dense builder, and records the valid lengths and the band."""
    case = dict(case)
    size = case.pop("window", None)
    if size is not None:
        case["mask_function"] = sliding_window_causal_mask_function(size)
    padding = torch.ones(2, int(case["q_offset"]) + 1, dtype=torch.bool)

    def forbidden(*args, **kwargs):
        raise AssertionError("transformers' dense mask was built")

    monkeypatch.setattr(integration, "sdpa_mask", forbidden)
    mask = fs_attention_mask(batch_size=2, q_length=1, attention_mask=padding, allow_is_causal_skip=False, **case)
    expected = sdpa_mask(batch_size=2, q_length=1, attention_mask=padding, allow_is_causal_skip=False, **case)
    assert mask.dtype == torch.bool and torch.equal(mask, expected)
    layout = integration._LAYOUTS[mask]
    assert layout.cache_seqlens.dtype == torch.int32 and layout.cache_seqlens.tolist() == [lengths] * 2
    assert layout.causal and layout.window == window


def test_padding_a_decoding_query_sees_keeps_the_dense_mask():
    """Left padding inside the keys the query sees cannot be left out by the kvcache kernel: transformers'
    mask, unregistered; padding only past the query's keys (the cache's empty slots) is no obstacle."""
    padding = torch.ones(2, 6, dtype=torch.bool)
    padding[1, :2] = False
    common = dict(batch_size=2, q_length=1, kv_length=16, q_offset=torch.tensor(5), allow_is_causal_skip=False)
    mask = fs_attention_mask(attention_mask=padding, **common)
    assert mask not in integration._LAYOUTS
    assert torch.equal(mask, sdpa_mask(attention_mask=padding, **common))
    assert fs_attention_mask(attention_mask=torch.ones(2, 6, dtype=torch.bool), **common) in integration._LAYOUTS


class _Layer(torch.nn.Module):
    is_causal = True


def test_a_decoding_step_reads_the_cache_in_place(routes):
    """One layer: the record's lengths are taken when the mask is made (the cache's counter, advanced in
    place by the layers' updates afterwards, does not move them); slots past them are never read (NaN there
    changes nothing). With inputs that require grad in grad mode the kvcache kernel (inference only) is not
    used: flash_attention reads the one-row mask, with the same result."""
    generator = torch.Generator().manual_seed(82)
    q = torch.randn(2, 4, 1, 8, generator=generator)
    k = torch.randn(2, 2, 16, 8, generator=generator)
    v = torch.randn(2, 2, 16, 8, generator=generator)
    counter = torch.tensor(6)
    mask = fs_attention_mask(batch_size=2, q_length=1, kv_length=16, q_offset=counter, allow_is_causal_skip=False)
    counter.add_(1)  # what StaticLayer.update does before the attention runs
    k[:, :, 7:], v[:, :, 7:] = float("nan"), float("nan")
    with torch.no_grad():
        out, _ = fs_attention_forward(_Layer(), q, k, v, mask, scaling=0.3)
    truth = fs.reference.attention(q.double(), k[:, :, :7].double(), v[:, :, :7].double(), softmax_scale=0.3)
    assert_close("decoding step", out, truth.transpose(1, 2), None)
    assert routes.kernels() == [("kvcache", (2, 4, 1, 8), [7, 7], (-1, 0))]

    k[:, :, 7:], v[:, :, 7:] = 0.0, 0.0  # the dense read multiplies the masked slots by 0
    out, _ = fs_attention_forward(_Layer(), q.requires_grad_(), k, v, mask, scaling=0.3)
    assert routes.kernels()[1:] == [("flash_attention", (2, 1, 1, 16))]
    assert_close("decoding step with grad", out.detach(), truth.transpose(1, 2), None)


def test_compiled_decoding_step_reads_the_mask():
    """``generate`` makes a static cache's masks eagerly and hands them to the compiled decoding forward. Traced
    (``fullgraph=True``), the layers read the one-row mask, exact, instead of the record (whose lengths would
    be baked into the graph); the logits are those of the eager step through the kvcache kernel."""
    model = with_attention(_qwen2(), register(), torch.float32)
    input_ids = tokens(2, 6, 83)
    position_ids = torch.full((2, 1), 6)

    def decoding_step(forward):
        cache = StaticCache(config=model.config, max_cache_len=12)
        with torch.no_grad():
            first = model(input_ids=input_ids, past_key_values=cache).logits[:, -1:].argmax(-1)
            masks = create_masks_for_generate(
                config=model.config, inputs_embeds=torch.empty(2, 1, 0), attention_mask=None, past_key_values=cache,
                position_ids=position_ids,
            )
            assert all(mask in integration._LAYOUTS for mask in masks.values())
            fs.reset_stats()
            logits = forward(
                input_ids=first, past_key_values=cache, attention_mask=masks, position_ids=position_ids,
            ).logits
        return logits, fs.stats()

    eager, eager_stats = decoding_step(model.forward)
    compiled, compiled_stats = decoding_step(torch.compile(model.forward, backend="eager", fullgraph=True))
    assert sum(eager_stats["attention_kvcache"].values()) == 2 and "attention_forward" not in eager_stats
    assert sum(compiled_stats["attention_forward"].values()) == 2 and "attention_kvcache" not in compiled_stats
    assert_close("compiled decoding step", compiled, eager.double(), None)
