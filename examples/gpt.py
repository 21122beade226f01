"""A small GPT (nanoGPT-style) whose attention is ``fs.flash_attention(causal=True)``.

It trains a character-level model on sentences of a small grammar generated here ("the cats often see a
tree. "), so nothing is downloaded. ``--attention naive`` swaps in a materialised matmul-softmax-matmul
(the package's reference in the input dtype); with the same seed both start from the same weights and see
the same batches, so their loss curves coincide and only speed and memory differ. ``--compare`` runs both
and, with ``--out DIR``, writes ``summary.json`` and ``loss.png``.

    python examples/gpt.py --compare --out runs/gpt        # GPU: 6 layers, 384 wide, block 256, bf16 autocast
    python examples/gpt.py --attention naive               # one run

Without CUDA the same script runs a tiny model for a few steps with the kernels in Triton's interpreter:
that checks the loss curves, not speed (interpreter timings say nothing about the GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# The interpreter must be chosen before triton is imported (by flash_softmax).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import flash_softmax as fs  # noqa: E402

ATTENTIONS = ("flash", "naive")


@dataclass
class Settings:
    """One model and training size."""

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch_size: int
    steps: int
    learning_rate: float
    warmup_steps: int
    log_every: int
    eval_batches: int
    sample_chars: int


SIZES = {
    # Fits easily in any datacenter GPU's memory; a few hundred steps reach the easy part of the task.
    "full": Settings(
        n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, steps=300, learning_rate=1e-3,
        warmup_steps=30, log_every=25, eval_batches=20, sample_chars=120,
    ),
    # Each interpreted attention call takes a fraction of a second on a CPU: few layers, few steps.
    "tiny": Settings(
        n_layer=2, n_head=2, n_embd=64, block_size=32, batch_size=4, steps=20, learning_rate=3e-3,
        warmup_steps=0, log_every=2, eval_batches=2, sample_chars=0,
    ),
}


NOUNS = (("cat", "cats"), ("dog", "dogs"), ("bird", "birds"), ("fox", "foxes"), ("child", "children"))
VERBS = (("sees", "see"), ("chases", "chase"), ("likes", "like"), ("finds", "find"), ("watches", "watch"))
OBJECTS = ("ball", "tree", "river", "house", "garden", "moon")
ADVERBS = ("", "", "quietly ", "often ", "never ")


def grammar_text(num_chars: int, seed: int) -> str:
    """Sentences of a small grammar whose verb agrees with its subject: ``"the foxes often chase a moon. "``.

    Spelling is learned from the previous characters alone; agreement ("cat ... sees", "cats ... see") needs
    the subject a few words back, which only attention provides."""
    rng = random.Random(seed)
    pieces, length = [], 0
    while length < num_chars:
        plural = rng.random() < 0.5
        noun = rng.choice(NOUNS)[plural]
        verb = rng.choice(VERBS)[plural]
        piece = f"the {noun} {rng.choice(ADVERBS)}{verb} {rng.choice(('a', 'the'))} {rng.choice(OBJECTS)}. "
        pieces.append(piece)
        length += len(piece)
    return "".join(pieces)[:num_chars]


class CharTokenizer:
    """One token per character of a fixed alphabet."""

    def __init__(self, alphabet: str):
        self.alphabet = alphabet
        self.index = {char: i for i, char in enumerate(alphabet)}

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index[char] for char in text], dtype=torch.long)

    def decode(self, tokens: torch.Tensor) -> str:
        return "".join(self.alphabet[i] for i in tokens.tolist())


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Materialised causal attention in the input dtype: a ``(B, H, T, T)`` score matrix, its softmax, and a
    matmul with v. ``q, k, v (B, H, T, D)`` -> ``(B, H, T, D)``."""
    return fs.reference.attention(q, k, v, causal=True, upcast=False)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Tiled causal attention: nothing of size T x T in memory. ``q, k, v (B, H, T, D)`` -> ``(B, H, T, D)``."""
    return fs.flash_attention(q, k, v, causal=True)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, attention):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.attention = attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, T, C)`` -> ``(B, T, C)``."""
        batch, length, channels = x.shape
        # (B, T, 3, H, D) viewed as three (B, H, T, D): strided views, which the kernel reads in place.
        qkv = self.qkv(x).view(batch, length, 3, self.n_head, channels // self.n_head)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        y = self.attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(batch, length, channels))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, attention):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, attention)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Pre-norm decoder-only transformer with learned positions and a tied output head."""

    def __init__(self, vocab_size: int, settings: Settings, attention):
        super().__init__()
        self.block_size = settings.block_size
        self.token_embedding = nn.Embedding(vocab_size, settings.n_embd)
        self.position_embedding = nn.Embedding(settings.block_size, settings.n_embd)
        self.blocks = nn.ModuleList(Block(settings.n_embd, settings.n_head, attention) for _ in range(settings.n_layer))
        self.ln_f = nn.LayerNorm(settings.n_embd)
        self.head = nn.Linear(settings.n_embd, vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None):
        """``tokens (B, T)`` with ``T <= block_size`` -> logits ``(B, T, vocab)`` and the mean cross-entropy
        against ``targets (B, T)`` (None without targets)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy continuation of ``tokens (B, T)`` by ``new_tokens``, recomputing the last block each step."""
        for _ in range(new_tokens):
            logits, _ = self(tokens[:, -self.block_size :])
            tokens = torch.cat([tokens, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
        return tokens


class Batches:
    """Random windows of the token stream; a fixed seed gives every run the same sequence of batches."""

    def __init__(self, data: torch.Tensor, block_size: int, batch_size: int, seed: int, device: torch.device):
        self.data, self.block_size, self.batch_size, self.device = data, block_size, batch_size, device
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)``, each ``(batch_size, block_size)``; targets are the inputs shifted by one."""
        starts = torch.randint(len(self.data) - self.block_size - 1, (self.batch_size,), generator=self.generator)
        windows = torch.stack([self.data[s : s + self.block_size + 1] for s in starts.tolist()])
        windows = windows.to(self.device)
        return windows[:, :-1], windows[:, 1:]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(attention_name: str, settings: Settings, device: torch.device, seed: int, precision: str, log=print) -> dict:
    """Train one model from scratch; returns its loss curve, speed, peak memory and validation loss.

    Tokens/s counts the training tokens of the timed steps (all but the first, which pays for compilation and
    autotuning) over their wall time, synchronised with the GPU."""
    attention = {"flash": flash_attention, "naive": naive_attention}[attention_name]
    text = grammar_text(num_chars=max(20_000, 40 * settings.block_size * settings.batch_size), seed=seed)
    tokenizer = CharTokenizer("".join(sorted(set(text))))
    data = tokenizer.encode(text)
    split = int(0.9 * len(data))

    torch.manual_seed(seed)
    model = GPT(tokenizer.vocab_size, settings, attention).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, betas=(0.9, 0.95), weight_decay=0.1)
    train_batches = Batches(data[:split], settings.block_size, settings.batch_size, seed + 1, device)
    # bf16: autocast, with float32 master weights and optimizer state; fp32: everything in float32.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def learning_rate(step: int) -> float:
        if step < settings.warmup_steps:
            return settings.learning_rate * (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        return settings.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, timed_seconds = [], 0.0
    model.train()
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step)
        inputs, targets = train_batches.next()
        _synchronize(device)
        started = time.perf_counter()
        with autocast:
            _, loss = model(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        _synchronize(device)
        if step > 0:
            timed_seconds += time.perf_counter() - started
        losses.append(loss.item())
        if step % settings.log_every == 0 or step == settings.steps - 1:
            log(f"[{attention_name}] step {step:4d}  loss {losses[-1]:.4f}")

    timed_tokens = (settings.steps - 1) * settings.batch_size * settings.block_size
    result = {
        "attention": attention_name,
        "losses": losses,
        "tokens_per_s": timed_tokens / timed_seconds if timed_seconds > 0 else None,
        "ms_per_step": 1e3 * timed_seconds / (settings.steps - 1) if settings.steps > 1 else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }

    model.eval()
    val_batches = Batches(data[split:], settings.block_size, settings.batch_size, seed + 2, device)
    with torch.no_grad(), autocast:
        result["val_loss"] = sum(model(*val_batches.next())[1].item() for _ in range(settings.eval_batches)) / max(
            1, settings.eval_batches
        )
    if settings.sample_chars:
        prompt = text[split : split + 24]
        with autocast:
            tokens = model.generate(tokenizer.encode(prompt).to(device)[None], settings.sample_chars)
        result["sample"] = {"prompt": prompt, "continuation": tokenizer.decode(tokens[0, len(prompt) :])}
        log(f"[{attention_name}] sample: {prompt!r} -> {result['sample']['continuation']!r}")
    return result


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return "CPU" + (" (Triton interpreter)" if interpreted else "")


def plot_losses(runs: dict[str, dict], device_name: str, timings_meaningful: bool, path: Path) -> None:
    """Both loss curves on one plot; the legend gives speed and peak memory only where they mean something."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for name, run in runs.items():
        speed = f", {run['tokens_per_s']:,.0f} tok/s" if timings_meaningful and run["tokens_per_s"] else ""
        memory = f", peak {run['peak_memory_bytes'] / 2**20:,.0f} MiB" if run["peak_memory_bytes"] else ""
        style = "-" if name == "flash" else "--"
        axes.plot(range(len(run["losses"])), run["losses"], style, label=f"{name}{speed}{memory}")
    axes.set_xlabel("step")
    axes.set_ylabel("training loss (cross-entropy, nats)")
    caveat = "" if timings_meaningful else ", timings not shown: they mean nothing for a GPU"
    axes.set_title(f"character GPT: flash vs naive attention ({device_name}{caveat})", fontsize=9)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention", choices=ATTENTIONS, default="flash", help="attention for a single run")
    parser.add_argument("--compare", action="store_true", help="run flash and then naive, same seed")
    parser.add_argument("--size", choices=sorted(SIZES), help="model size (default: full on CUDA, tiny otherwise)")
    parser.add_argument("--steps", type=int, help="training steps (default: the size's)")
    parser.add_argument("--batch-size", type=int, help="sequences per step (default: the size's)")
    parser.add_argument("--sample-chars", type=int, help="characters to generate after training (0: none)")
    parser.add_argument(
        "--precision", choices=("bf16", "fp32"), help="bf16 autocast or float32 (default: bf16 on CUDA, else fp32)"
    )
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--out", type=Path, help="folder for summary.json and loss.png")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the training(s) the arguments ask for; returns the summary that ``--out`` writes as JSON."""
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = SIZES[args.size or ("full" if device.type == "cuda" else "tiny")]
    overrides = {"steps": args.steps, "batch_size": args.batch_size, "sample_chars": args.sample_chars}
    settings = Settings(**{**asdict(settings), **{k: v for k, v in overrides.items() if v is not None}})
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    device_name = describe_device(device)
    print(f"device: {device_name}; precision: {precision}; model: {settings}")
    if device.type != "cuda":
        print(
            "No GPU: the Triton kernels run in the interpreter, one program at a time. The loss curves are "
            "meaningful; the timings are not, and say nothing about speed on a GPU."
        )

    names = ATTENTIONS if args.compare else (args.attention,)
    runs = {name: train(name, settings, device, args.seed, precision) for name in names}
    summary = {
        "device": device_name,
        "interpreter": device.type != "cuda" and os.environ.get("TRITON_INTERPRET") == "1",
        "timings_meaningful": device.type == "cuda",
        "versions": {"torch": torch.__version__, "flash_softmax": fs.__version__, "python": sys.version.split()[0]},
        "settings": asdict(settings),
        "seed": args.seed,
        "precision": precision,
        "runs": runs,
    }
    for name, run in runs.items():
        speed = f"{run['tokens_per_s']:,.0f} tokens/s" if run["tokens_per_s"] else "no timed steps"
        if device.type != "cuda":
            speed += " (interpreter, not a GPU figure)"
        memory = f", peak memory {run['peak_memory_bytes'] / 2**20:,.1f} MiB" if run["peak_memory_bytes"] else ""
        print(f"{name:>6}: final loss {run['losses'][-1]:.4f}, val loss {run['val_loss']:.4f}, {speed}{memory}")

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_losses(runs, device_name, summary["timings_meaningful"], args.out / "loss.png")
        print(f"wrote {args.out / 'summary.json'} and {args.out / 'loss.png'}")
    return summary


if __name__ == "__main__":
    main()
