"""Hugging Face transformers integration without dense masks (docs/semantics.md, 'Drop-in for transformer
code'): packed sequences, padding and sliding windows run as sequences plus a band, through
``fs.flash_attention_varlen`` (or ``fs.flash_attention`` with its own band and, where keys and values are a
cache, a ``(B, 1, 1, Sk)`` key mask), never through a ``(B, 1, Sq, Sk)`` mask.

Tiny randomly initialised models (no downloads) in float32 run the kernels; the truth is the same weights
in float64, judged by the accuracy policy (float32 within 1e-5 relative of a float64 truth). Packed
sequences are checked against each sequence run alone with eager attention. Padded batches are compared at
the real tokens only (a padded query's row is arbitrary: eager attends it to whatever real keys precede it,
varlen gives 0). Where a batch is padded the float64 truth runs ``"sdpa"``: eager's float64 mask turns a
query row that sees no key (left padding, or right padding past a sliding window) into NaN, which the next
layer spreads (see tests/test_transformers.py).

Every test records what the integration runs (the ``routes`` fixture) and fails if transformers' dense mask
is built or a per-query mask reaches the kernel; ``test_the_route_check_catches_a_dense_mask`` shows the check
fails when the dense path is taken.
"""

from __future__ import annotations

import os

import pytest

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    DataCollatorWithFlattening,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import flash_softmax as fs  # noqa: E402
import flash_softmax.integrations.transformers as integration  # noqa: E402
from flash_softmax.integrations.transformers import register  # noqa: E402
from flash_softmax.testing import GRADIENT_FACTOR, assert_close  # noqa: E402

from test_transformers_models import VOCAB, build, tokens, with_attention  # noqa: E402


@pytest.fixture(scope="module")
def llama():
    """2 layers, grouped-query attention (4 query heads on 2 KV heads, head dim 16)."""
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, pad_token_id=0,
    )
    return build(LlamaForCausalLM, config, 70)


def _mistral():
    config = MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=4, initializer_range=0.2,
        pad_token_id=0,
    )
    return build(MistralForCausalLM, config, 71)


def _qwen2():
    """A sliding-window layer (window 4) next to a full-attention one."""
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_sliding_window=True, sliding_window=4,
        max_window_layers=1, initializer_range=0.2, pad_token_id=0,
    )
    return build(Qwen2ForCausalLM, config, 72)


# --------------------------------------------------------------------------------------------------------
# What runs


class Routes:
    """The kernel calls the integration makes: ``("varlen", cu_seqlens_q)`` and ``("flash_attention",
    attn_bias shape or None)``; building transformers' dense mask through the integration raises."""

    def __init__(self, monkeypatch, forbid_dense_masks: bool = True):
        self.calls = []
        flash_attention, flash_attention_varlen = integration.flash_attention, integration.flash_attention_varlen
        sdpa_mask = integration.sdpa_mask

        def recording_flash_attention(q, k, v, **options):
            bias = options.get("attn_bias")
            self.calls.append(("flash_attention", None if bias is None else tuple(bias.shape)))
            return flash_attention(q, k, v, **options)

        def recording_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *bounds, **options):
            self.calls.append(("varlen", cu_seqlens_q.tolist()))
            return flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *bounds, **options)

        def dense_mask(*args, **kwargs):
            if forbid_dense_masks:
                raise AssertionError("fs_attention built transformers' dense (B, 1, Sq, Sk) mask")
            return sdpa_mask(*args, **kwargs)

        monkeypatch.setattr(integration, "flash_attention", recording_flash_attention)
        monkeypatch.setattr(integration, "flash_attention_varlen", recording_varlen)
        monkeypatch.setattr(integration, "sdpa_mask", dense_mask)

    def varlen(self) -> list:
        return [detail for name, detail in self.calls if name == "varlen"]

    def assert_no_dense_mask(self, varlen: bool = True) -> None:
        """Every kernel call read no mask, or one with a single query row (a key mask, stride 0 over the
        queries); with ``varlen``, every call was a varlen one."""
        assert self.calls, "no attention ran through fs_attention"
        for name, bias in self.calls:
            if name == "flash_attention":
                assert bias is None or bias[-2] == 1, f"{name} read a per-query mask of shape {bias}"
        if varlen:
            assert all(name == "varlen" for name, _ in self.calls), self.calls


@pytest.fixture
def routes(monkeypatch):
    return Routes(monkeypatch)


def test_the_route_check_catches_a_dense_mask(llama, monkeypatch):
    """With the pattern recognition switched off, a padded batch takes transformers' (B, 1, Sq, Sk) mask: the
    checks the other tests rely on see it (building it raises; reading it fails ``assert_no_dense_mask``)."""
    input_ids, attention_mask = padded_batch("left")
    model = with_attention(llama, register(), torch.float32)
    monkeypatch.setattr(integration, "_recognise", lambda mask_function: None)
    with monkeypatch.context() as patch:
        Routes(patch)
        with pytest.raises(AssertionError, match="dense"):
            model(input_ids=input_ids, attention_mask=attention_mask)
    lenient = Routes(monkeypatch, forbid_dense_masks=False)
    model(input_ids=input_ids, attention_mask=attention_mask)
    assert lenient.calls == [("flash_attention", (3, 1, 11, 11))] * 2
    with pytest.raises(AssertionError, match="per-query mask"):
        lenient.assert_no_dense_mask(varlen=False)


# --------------------------------------------------------------------------------------------------------
# Packed sequences


LENGTHS = (7, 12, 5)


def packed_features(seed: int = 73):
    """Three sequences of ``LENGTHS`` tokens, as a dataset would give them."""
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, VOCAB, (n,), generator=generator).tolist()} for n in LENGTHS]


def separate_logits(model, features) -> torch.Tensor:
    """Each sequence run alone (batch 1, no padding), the logits concatenated along the sequence: ``(1, T, V)``."""
    return torch.cat([model(input_ids=torch.tensor([f["input_ids"]])).logits for f in features], dim=1)


@pytest.mark.parametrize("use_cache", [False, True], ids=["packed-mask", "positions-only"])
def test_packed_position_ids_match_separate_sequences(llama, routes, use_cache):
    """Batch 1, ``position_ids`` restarting at 0 at each sequence, no attention mask. Without a cache
    transformers finds the packing in the positions (the compact mask stands for it); with one it does not,
    and the layers see restarting positions without a mask. Either way: one varlen call per layer over the
    three sequences, and each sequence's logits are those of the sequence run alone with eager attention."""
    features = packed_features()
    batch = DataCollatorWithFlattening(return_position_ids=True)(features)
    truth = separate_logits(with_attention(llama, "eager", torch.float64), features)
    model = with_attention(llama, register(), torch.float32)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=use_cache).logits
    assert_close("packed logits", logits, truth, None)
    routes.assert_no_dense_mask()
    assert routes.varlen() == [[0, 7, 19, 24]] * 2


def test_packed_cu_seq_lens_training_step_matches_separate_sequences(llama, routes):
    """What ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` gives: ``cu_seq_lens_q/k`` and
    ``max_length_q/k`` next to restarting ``position_ids`` and labels. Logits, the loss and every
    parameter's gradient match eager attention on the sequences run separately (the loss over the
    concatenated logits with the same labels)."""
    features = packed_features(74)
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=True)(features)
    assert batch["max_length_q"] == max(LENGTHS)

    reference = with_attention(llama, "eager", torch.float64)
    truth_logits = separate_logits(reference, features)
    truth_loss = F.cross_entropy(truth_logits[0, :-1], batch["labels"][0, 1:], ignore_index=-100)
    truth_loss.backward()

    model = with_attention(llama, register(), torch.float32)
    output = model(**batch)
    output.loss.backward()
    routes.assert_no_dense_mask()
    assert routes.varlen() == [[0, 7, 19, 24]] * 2
    assert_close("packed logits", output.logits, truth_logits, None)
    assert_close("packed loss", output.loss, truth_loss, None)
    for (name, parameter), truth in zip(model.named_parameters(), reference.parameters()):
        assert parameter.grad is not None and parameter.grad.abs().max() > 0, name
        assert_close(f"{name}.grad", parameter.grad, truth.grad, None, factor=GRADIENT_FACTOR)


# --------------------------------------------------------------------------------------------------------
# Padding


def padded_batch(side: str, length: int = 11):
    """Three rows of ``length`` tokens: the second padded by 4 and the third by 1 on ``side`` (mask 0)."""
    input_ids = tokens(3, length, 75)
    attention_mask = torch.ones_like(input_ids)
    if side == "left":
        attention_mask[1, :4] = 0
        attention_mask[2, :1] = 0
    else:
        attention_mask[1, -4:] = 0
        attention_mask[2, -1:] = 0
    input_ids[attention_mask == 0] = 0
    return input_ids, attention_mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_logits_match(llama, routes, side):
    """The padding becomes ``cu_seqlens`` (each row's real tokens one sequence, the padding sequences without
    keys or queries), the mask is never materialised; logits at the real tokens match."""
    input_ids, attention_mask = padded_batch(side)
    truth = with_attention(llama, "sdpa", torch.float64)(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = with_attention(llama, register(), torch.float32)(input_ids=input_ids, attention_mask=attention_mask).logits
    kept = attention_mask.bool()
    assert_close(f"{side}-padded logits", logits[kept], truth[kept], None)
    routes.assert_no_dense_mask()
    # Per row three sequences: the padding queries before the row's real ones (no keys), the padding keys
    # (no queries), the real tokens; then the last row's right padding. The real queries of row r:
    cu_q = routes.varlen()[0]
    real = [[cu_q[1 + 3 * row] - 11 * row, cu_q[3 + 3 * row] - 11 * row] for row in range(3)]
    assert real == ([[0, 11], [4, 11], [1, 11]] if side == "left" else [[0, 11], [0, 7], [0, 10]])


@pytest.mark.parametrize(
    "make, max_new_tokens",
    [(None, 6), (_mistral, 6)],
    ids=["llama", "mistral-window"],
)
def test_left_padded_greedy_generate_matches_eager(llama, routes, make, max_new_tokens):
    """Greedy decoding with a cache on a left-padded batch: the prefill runs through varlen; each decoding
    step's single query reads its row's cached keys in place with a (B, 1, 1, Sk) key mask (flattening the
    cache for varlen would copy it). Mistral's window of 4 is shorter than the sequences, its cache keeps
    only the window. The tokens are eager's."""
    model = llama if make is None else make()
    input_ids, attention_mask = padded_batch("left")
    settings = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = with_attention(model, "eager", torch.float32).generate(
        input_ids, attention_mask=attention_mask, **settings
    )
    generated = with_attention(model, register(), torch.float32).generate(
        input_ids, attention_mask=attention_mask, **settings
    )
    assert generated.shape == (3, 11 + max_new_tokens)
    assert torch.equal(generated, expected)
    routes.assert_no_dense_mask(varlen=False)
    prefill, steps = routes.calls[:2], routes.calls[2:]
    assert [name for name, _ in prefill] == ["varlen"] * 2
    assert steps and all(
        name == "flash_attention" and (bias is None or bias[:3] == (3, 1, 1)) for name, bias in steps
    )


def test_bidirectional_padding_runs_every_query_against_the_real_keys(routes):
    """BERT, right-padded: full attention, so each row's queries (padded ones too, as in eager) attend its
    real keys through varlen, and every position matches eager."""
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, initializer_range=0.2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = build(BertModel, config, 76)
    input_ids, attention_mask = padded_batch("right")
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
    truth = with_attention(model, "eager", torch.float64)(**inputs).last_hidden_state
    out = with_attention(model, register(), torch.float32)(**inputs).last_hidden_state
    assert_close("bert hidden states", out, truth, None)
    routes.assert_no_dense_mask()


# --------------------------------------------------------------------------------------------------------
# Sliding windows


@pytest.mark.parametrize("make, padding", [(_mistral, None), (_mistral, "left"), (_mistral, "right"), (_qwen2, None),
                                           (_qwen2, "left")],
                         ids=["mistral-none", "mistral-left", "mistral-right", "qwen2-none", "qwen2-left"])
def test_sliding_window_shorter_than_the_sequence_matches(routes, make, padding):
    """A window of 4 over 11 tokens: the kernels' window, bottom-right aligned, in flash_attention without
    padding and per sequence in varlen with it; Qwen 2's full-attention layer next to the windowed one."""
    model = make()
    if padding is None:
        input_ids, attention_mask = tokens(2, 11, 77), None
    else:
        input_ids, attention_mask = padded_batch(padding)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
    reference = "eager" if padding is None else "sdpa"  # a window can leave a padded query no key, too
    truth = with_attention(model, reference, torch.float64)(**inputs).logits
    logits = with_attention(model, register(), torch.float32)(**inputs).logits
    kept = torch.ones_like(input_ids, dtype=torch.bool) if padding is None else attention_mask.bool()
    assert_close(f"{type(model).__name__} logits", logits[kept], truth[kept], None)
    routes.assert_no_dense_mask(varlen=padding is not None)

    windowless = with_attention(model, reference, torch.float64)
    windowless.config.sliding_window = 64
    for layer in windowless.model.layers:
        if getattr(layer.self_attn, "sliding_window", None):
            layer.self_attn.sliding_window = 64
    # The window changes the truth: ignoring it could not pass.
    changed = windowless(**inputs).logits[kept]
    assert (changed - truth[kept]).abs().max() > 1e-2 * truth[kept].abs().max()


# --------------------------------------------------------------------------------------------------------
# One layer


class _Layer(torch.nn.Module):
    """Stands for a transformers attention layer: what the attention function reads from ``module``."""

    is_causal = True


def _qkv(batch=2, seqlen_q=7, seqlen_k=7, seed=78):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 4, seqlen_q, 8, generator=generator)
    k = torch.randn(batch, 2, seqlen_k, 8, generator=generator)
    v = torch.randn(batch, 2, seqlen_k, 8, generator=generator)
    return q, k, v


def _dense_truth(q, k, v, padding, **options):
    keep = transformers.masking_utils.sdpa_mask(
        batch_size=q.shape[0], q_length=q.shape[2], kv_length=k.shape[2], q_offset=k.shape[2] - q.shape[2],
        attention_mask=padding, allow_is_causal_skip=False, **options,
    )
    return fs.reference.attention(q.double(), k.double(), v.double(), attn_bias=keep).transpose(1, 2)


def test_rows_with_holes_read_a_key_mask(routes):
    """A row whose real keys are not one run cannot be a contiguous sequence: the kernel reads its padding as a
    (B, 1, 1, Sk) key mask with its own causal band, which is exact for any padding."""
    q, k, v = _qkv()
    padding = torch.ones(2, 7, dtype=torch.bool)
    padding[1, 2] = padding[1, 5] = False
    mask = integration.fs_attention_mask(batch_size=2, q_length=7, kv_length=7, attention_mask=padding)
    assert mask.shape == (2, 7)
    out, _ = integration.fs_attention_forward(_Layer(), q, k, v, mask)
    assert routes.calls == [("flash_attention", (2, 1, 1, 7))]
    assert_close("output with holes", out[padding], _dense_truth(q, k, v, padding)[padding], None)


def test_a_copied_padding_mask_is_read_as_flash_attention_reads_it(routes):
    """A (B, Sk) bool mask the mask function did not return (a model copied it): a key padding mask, with the
    band of ``is_causal`` and ``sliding_window``, as FlashAttention reads it."""
    q, k, v = _qkv()
    padding = torch.ones(2, 7, dtype=torch.bool)
    padding[1, :3] = False
    out, _ = integration.fs_attention_forward(_Layer(), q, k, v, padding.clone(), sliding_window=3)
    assert routes.calls == [("flash_attention", (2, 1, 1, 7))]
    window = transformers.masking_utils.sliding_window_causal_mask_function(3)
    truth = _dense_truth(q, k, v, padding, mask_function=window)
    assert_close("copied padding mask", out[padding], truth[padding], None)


def test_max_length_bounds_are_passed_and_checked(monkeypatch):
    """``max_length_q`` / ``max_length_k`` are the kernel's bounds; one shorter than the longest sequence of its
    ``cu_seq_lens`` is refused rather than trusted."""
    q, k, v = _qkv(batch=1, seqlen_q=9, seqlen_k=9)
    cu = torch.tensor([0, 2, 9], dtype=torch.int32)
    bounds = []
    varlen = integration.flash_attention_varlen

    def recording(q, k, v, cu_q, cu_k, max_q, max_k, **options):
        bounds.append((max_q, max_k))
        return varlen(q, k, v, cu_q, cu_k, max_q, max_k, **options)

    monkeypatch.setattr(integration, "flash_attention_varlen", recording)
    integration.fs_attention_forward(_Layer(), q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    integration.fs_attention_forward(
        _Layer(), q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu.clone(), max_length_q=8,
        max_length_k=torch.tensor(7),
    )
    assert bounds == [(7, 7), (8, 7)]
    with pytest.raises(ValueError, match="max_length_k=6 is less than the longest sequence of cu_seq_lens_k, 7"):
        integration.fs_attention_forward(
            _Layer(), q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=6
        )
