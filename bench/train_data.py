"""Synthetic chat SFT data with a realistic length spread, and the model folders the training bench uses.

Lengths (prompt + answer, in tokens) follow a log-normal clipped to [min_len, max_len], the shape
real chat SFT sets have (many short exchanges, a long tail). Text is made of pseudo-words so the
locally trained byte-level BPE tokenizer has enough material to reach the requested vocabulary.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_ONSETS = ["", "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "st", "tr", "pl", "gr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
_CODAS = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st"]


@dataclass(frozen=True)
class LengthSpread:
    """Log-normal token lengths clipped to [min_len, max_len]; `median` is exp(mu)."""

    median: float = 160.0
    sigma: float = 0.75
    min_len: int = 32
    max_len: int = 512

    def draw(self, rng: random.Random) -> int:
        value = rng.lognormvariate(math.log(self.median), self.sigma)
        return int(min(self.max_len, max(self.min_len, value)))


def _lexicon(rng: random.Random, size: int = 4000) -> list[str]:
    words: set[str] = set()
    while len(words) < size:
        syllables = rng.choice([1, 1, 2, 2, 2, 3])
        words.add(
            "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
        )
    # Zipf-like use: sort so that early words are drawn far more often.
    return sorted(words)


class TextSource:
    """Draws sentences from a fixed pseudo-word lexicon with a Zipf-like word frequency."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.words = _lexicon(random.Random(1234))
        weights = [1.0 / (rank + 5) for rank in range(len(self.words))]
        self._cum = list(_cumulative(weights))

    def sentence(self, num_words: int) -> str:
        chosen = self.rng.choices(self.words, cum_weights=self._cum, k=max(1, num_words))
        text = " ".join(chosen)
        if self.rng.random() < 0.3:
            text += f" {self.rng.randint(0, 9999)}"
        return text.capitalize() + self.rng.choice([".", "?", "!", "."])


def _cumulative(weights: list[float]) -> list[float]:
    total, out = 0.0, []
    for w in weights:
        total += w
        out.append(total)
    return out


def tokenizer_corpus(seed: int = 0, lines: int = 3000) -> list[str]:
    """Returns text for training the bench tokenizer: the built-in corpus plus pseudo-word chat lines."""
    from trainer_core.tiny import default_corpus

    source = TextSource(seed + 99)
    chat = [
        f"<|im_start|>user\n{source.sentence(12)}<|im_end|>\n<|im_start|>assistant\n"
        f"{source.sentence(20)}<|im_end|>\n"
        for _ in range(lines)
    ]
    return default_corpus() + chat


def make_records(num: int, spread: LengthSpread, tokens_per_word: float, seed: int) -> list[dict[str, Any]]:
    """Returns `num` canonical sft records ({"messages": [...]}) whose lengths follow `spread`.

    A third of them have two user/assistant exchanges and some a system message, as chat data does.
    `tokens_per_word` (measured on this tokenizer) turns a target token count into a word count; the
    chat template's own tokens are budgeted too (about 6 per turn).
    """
    rng = random.Random(seed)
    source = TextSource(seed)
    records = []
    for _ in range(num):
        target = spread.draw(rng)
        turns = 2 if rng.random() < 0.33 and target > 120 else 1
        system = rng.random() < 0.2
        overhead = 2 + 12 * turns + (8 if system else 0)
        words = max(4, int((target - overhead) / tokens_per_word))
        messages = [{"role": "system", "content": source.sentence(4)}] if system else []
        per_turn = words // turns
        for _ in range(turns):
            prompt_share = rng.uniform(0.15, 0.6)
            prompt_words = max(2, int(per_turn * prompt_share))
            messages.append({"role": "user", "content": source.sentence(prompt_words)})
            messages.append(
                {"role": "assistant", "content": source.sentence(max(2, per_turn - prompt_words))}
            )
        records.append({"messages": messages, "format": "sft"})
    return records


def measure_tokens_per_word(tokenizer: Any, seed: int = 5) -> float:
    """Returns the tokenizer's mean tokens per pseudo-word on a sample of sentences."""
    source = TextSource(seed)
    sentences = [source.sentence(50) for _ in range(40)]
    tokens = sum(len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in sentences)
    return tokens / (50 * len(sentences))


def build_bench_model(out_dir: Path, size: str, seed: int = 0) -> Path:
    """Returns a folder with the bench model: "tiny" (4×256, vocab 2048), "0.5b" (Qwen2-0.5B-like sizes)
    or "smoke" (2×64, vocab 512: only to check the script runs).

    Both share a locally trained 2048-token tokenizer; the 0.5b model keeps Qwen2-0.5B's 151,936-row
    embedding and head (ids above 2047 are simply never used), so its FLOPs per token are realistic.
    """
    from trainer_core.tiny import build_tiny_model

    if (out_dir / "config.json").is_file():
        return out_dir
    if size == "smoke":
        return build_tiny_model(out_dir, seed=seed)
    build_tiny_model(
        out_dir,
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        vocab_size=2048,
        seed=seed,
        corpus=tokenizer_corpus(seed),
    )
    if size == "0.5b":
        _replace_with_qwen2_05b(out_dir, seed)
    return out_dir


def _replace_with_qwen2_05b(out_dir: Path, seed: int) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    config = Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    for stale in out_dir.glob("*.safetensors"):
        stale.unlink()
    model.save_pretrained(out_dir)
