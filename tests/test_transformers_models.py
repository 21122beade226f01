"""Tiny randomly initialised transformers models (no downloads) run with ``attn_implementation="fs_attention"``
against the same weights in float64 with ``"eager"`` (docs/semantics.md, 'Drop-in for transformer code').

Each model is built from a config with two layers, hidden sizes of 32 to 64 and 2 to 4 heads, and runs a
batch of two sequences of 8 to 17 tokens; weights are drawn with a larger ``initializer_range`` than the
configs' default so that the attention patterns, and the keywords that shape them, move the logits. Results
are judged by the accuracy policy: float32 within 1e-5 relative of the float64 truth. Where a keyword is the
point of a test (sinks, relative position bias, softcap), the test also shows that dropping it would change
the truth far beyond that bound, so the comparison could not pass by ignoring it.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from conftest import DEVICE  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTModel,
)

import flash_softmax as fs  # noqa: E402
from flash_softmax.integrations.transformers import register  # noqa: E402
from flash_softmax.testing import FLOAT32_RTOL, assert_close  # noqa: E402

VOCAB = 96


def with_attention(model, implementation: str, dtype: torch.dtype):
    """A copy of ``model`` (same weights) in ``dtype`` running ``implementation``."""
    copied = copy.deepcopy(model).to(dtype)
    copied.set_attn_implementation(implementation)
    return copied


def build(model_class, config, seed: int):
    """``model_class(config)`` in eval mode, its weights drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return model_class(config).eval()


def tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def far_apart(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two truths differ by more than a thousand times the accuracy bound of ``b``."""
    return (a - b).abs().max() > 1e3 * FLOAT32_RTOL * max(b.abs().max().item(), 1.0)


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: parameter.grad for name, parameter in model.named_parameters() if parameter.requires_grad}


def assert_gradients_close(label: str, actual: dict, truth: dict) -> None:
    assert actual.keys() == truth.keys()
    for name, grad in actual.items():
        assert grad is not None, f"{label} {name} got no gradient"
        assert_close(f"{label} {name}.grad", grad, truth[name], None)


# --------------------------------------------------------------------------------------------------------
# GPT-OSS: attention sinks (s_aux)


@pytest.fixture(scope="module")
def gpt_oss():
    """Grouped-query attention (4 query heads on 2 KV heads), a sliding window of 4 in the first layer, a
    mixture of 4 experts (run by transformers' eager experts, which take float64), sinks of order 1."""
    config = GptOssConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64, initializer_range=0.2,
        experts_implementation="eager", pad_token_id=0,
    )
    model = build(GptOssForCausalLM, config, 10)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.randn(4, generator=torch.Generator().manual_seed(11)))
    return model


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_gpt_oss_logits_match_with_sinks(gpt_oss, padded):
    """Unpadded, the causal layer reads no mask; left-padded by 5 tokens, both layers read transformers'
    mask with the sinks. A padding query sees no key, so the sink takes all its probability: 0 in eager as
    in the kernel, so every position is compared."""
    input_ids = tokens(2, 12, 12)
    attention_mask = torch.ones_like(input_ids)
    if padded:
        attention_mask[1, :5] = 0
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
    truth = with_attention(gpt_oss, "eager", torch.float64)(**inputs).logits
    logits = with_attention(gpt_oss, register(), torch.float32)(**inputs).logits
    assert_close("gpt-oss logits", logits, truth, None)

    sinkless = with_attention(gpt_oss, "eager", torch.float64)
    with torch.no_grad():
        for layer in sinkless.model.layers:
            layer.self_attn.sinks.fill_(-1e4)  # exp(-1e4) = 0: no sink
    assert far_apart(sinkless(**inputs).logits, truth)


def test_gpt_oss_training_step_matches(gpt_oss):
    """Loss gradients of every parameter, the sinks among them, then one SGD step and the logits after it."""
    input_ids = tokens(2, 12, 13)

    def train(implementation, dtype):
        model = with_attention(gpt_oss, implementation, dtype).train()
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        grads = {name: None if grad is None else grad.clone() for name, grad in gradients(model).items()}
        torch.optim.SGD(model.parameters(), lr=0.5).step()
        with torch.no_grad():
            logits = model.eval()(input_ids=input_ids).logits
        return grads, logits

    truth_grads, truth_logits = train("eager", torch.float64)
    grads, logits = train(register(), torch.float32)
    sinks = [name for name in grads if name.endswith("self_attn.sinks")]
    assert len(sinks) == 2 and all(grads[name] is not None and grads[name].abs().max() > 1e-3 for name in sinks)
    assert_gradients_close("gpt-oss", grads, truth_grads)
    assert_close("gpt-oss logits after a step", logits, truth_logits, None)


# --------------------------------------------------------------------------------------------------------
# T5: relative position bias (position_bias), encoder-decoder


@pytest.fixture(scope="module")
def t5():
    """Encoder and decoder of 2 layers, 4 heads of 8, relative position buckets learned in the first layer
    of each and shared by the others (T5's ``position_bias``), no dropout."""
    config = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0,
    )
    return build(T5ForConditionalGeneration, config, 20)


def t5_batch():
    """Encoder inputs of 10 tokens, the second row right-padded by 3; decoder inputs and labels of 8."""
    input_ids = tokens(2, 10, 21)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    input_ids[attention_mask == 0] = 0
    labels = tokens(2, 8, 22)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def test_t5_logits_match_with_relative_position_bias(t5):
    batch = t5_batch()
    truth = with_attention(t5, "eager", torch.float64)(**batch).logits
    logits = with_attention(t5, register(), torch.float32)(**batch).logits
    assert_close("t5 logits", logits, truth, None)

    unbiased = with_attention(t5, "eager", torch.float64)
    with torch.no_grad():
        unbiased.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.zero_()
        unbiased.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.zero_()
    assert far_apart(unbiased(**batch).logits, truth)


def test_t5_training_step_matches(t5):
    """Gradients of every parameter in training mode; the relative attention bias of the encoder and the
    decoder among them, which reach it only through ``position_bias``."""
    batch = t5_batch()

    def train(implementation, dtype):
        model = with_attention(t5, implementation, dtype).train()
        model(**batch).loss.backward()
        return gradients(model)

    truth = train("eager", torch.float64)
    grads = train(register(), torch.float32)
    bias = [name for name in grads if name.endswith("relative_attention_bias.weight")]
    assert len(bias) == 2 and all(grads[name] is not None and grads[name].abs().max() > 1e-3 for name in bias)
    assert_gradients_close("t5", grads, truth)


def test_t5_greedy_generate_matches_eager(t5):
    """Decoding with a cache: each step's query sees the cached keys with the bias of its own position."""
    batch = t5_batch()
    settings = dict(max_new_tokens=5, do_sample=False, eos_token_id=None)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    expected = with_attention(t5, "eager", torch.float32).generate(**inputs, **settings)
    generated = with_attention(t5, register(), torch.float32).generate(**inputs, **settings)
    assert torch.equal(generated, expected)


# --------------------------------------------------------------------------------------------------------
# Decoders with sliding windows, encoders


def _gemma3(bidirectional: bool):
    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=8, initializer_range=0.2,
        use_bidirectional_attention=bidirectional,
    )
    return build(Gemma3ForCausalLM, config, 30)


def _qwen2():
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_sliding_window=True, sliding_window=4,
        max_window_layers=1, initializer_range=0.2,
    )
    return build(Qwen2ForCausalLM, config, 31)


def _mistral():
    config = MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=4, initializer_range=0.2,
    )
    return build(MistralForCausalLM, config, 32)


def _llama():
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.2,
    )
    return build(LlamaForCausalLM, config, 33)


@pytest.mark.parametrize(
    "make",
    [lambda: _gemma3(False), lambda: _gemma3(True), _qwen2, _mistral, _llama],
    ids=["gemma3", "gemma3-bidirectional", "qwen2-window", "mistral-window", "llama-mqa"],
)
def test_decoder_logits_match(make):
    """Sliding windows of 4 over 11 tokens (causal, or both sides for Gemma 3's bidirectional variant), a
    window layer next to a full one; Llama with one KV head for two query heads."""
    model = make()
    input_ids = tokens(2, 11, 34)
    truth = with_attention(model, "eager", torch.float64)(input_ids=input_ids).logits
    logits = with_attention(model, register(), torch.float32)(input_ids=input_ids).logits
    assert_close(f"{type(model).__name__} logits", logits, truth, None)


def test_bert_padded_hidden_states_match():
    """A bidirectional encoder; the second row right-padded by 4 (its real tokens must not see padding)."""
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, initializer_range=0.2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = build(BertModel, config, 40)
    input_ids = tokens(2, 12, 41)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0
    truth = with_attention(model, "eager", torch.float64)(input_ids=input_ids, attention_mask=attention_mask)
    out = with_attention(model, register(), torch.float32)(input_ids=input_ids, attention_mask=attention_mask)
    kept = attention_mask.bool()
    assert_close("bert hidden states", out.last_hidden_state[kept], truth.last_hidden_state[kept], None)


def test_vit_hidden_states_match():
    """16 patches of a 16 x 16 image and the class token: 17 tokens attending to each other, no mask."""
    config = ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, initializer_range=0.2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = build(ViTModel, config, 50)
    pixel_values = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(51))
    truth = with_attention(model, "eager", torch.float64)(pixel_values=pixel_values).last_hidden_state
    out = with_attention(model, register(), torch.float32)(pixel_values=pixel_values).last_hidden_state
    assert_close("vit hidden states", out, truth, None)


# --------------------------------------------------------------------------------------------------------
# Dropout


def test_attention_dropout_in_training_runs_in_the_kernel():
    """A Llama with ``attention_dropout=0.3`` in training mode, on the test device: every layer runs the
    kernel (counted by ``fs.stats()``, no fallback warning); under the same ``torch.manual_seed`` the logits and gradients
    repeat exactly, and they differ from evaluation mode's."""
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, attention_dropout=0.3,
    )
    model = with_attention(build(LlamaForCausalLM, config, 60), register(), torch.float32).to(DEVICE)
    input_ids = tokens(2, 10, 61).to(DEVICE)

    def run(seed):
        model.zero_grad()
        torch.manual_seed(seed)
        output = model(input_ids=input_ids, labels=input_ids)
        output.loss.backward()
        return output.logits.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    model.train()
    fs.reset_stats()
    with warnings.catch_warnings():
        warnings.simplefilter("error", fs.FallbackWarning)
        logits, grad = run(62)
        again, grad_again = run(62)
        other, _ = run(63)
    stats = fs.stats()
    assert sum(stats["attention_forward"].values()) == 6 and sum(stats["attention_backward"].values()) == 6
    assert not stats["fallbacks"]
    assert torch.equal(logits, again) and torch.equal(grad, grad_again)
    assert far_apart(logits, other)

    with torch.no_grad():
        evaluated = model.eval()(input_ids=input_ids).logits
    assert far_apart(logits, evaluated)
