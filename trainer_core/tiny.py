"""Builds tiny random-weight Llama models with a locally trained tokenizer, for tests and the embedded demo.

Nothing is downloaded: the byte-level BPE tokenizer is trained on a small built-in corpus shaped
like the data the tests use (chat turns, arithmetic, agent traces with Thought/Action/Observation
markers, `<think>` blocks, code). The folder loads with `AutoModelForCausalLM` / `AutoTokenizer`.

Tokenizer conventions (other modules rely on them):
- `<|bos|>` starts every encoded text (post-processor) and every rendered chat (template).
- `eos_token` is `<|im_end|>`, the token that closes a chat turn, so `tokenizer.eos_token_id`
  stops chat generation; `<|eos|>` is a document-end token also listed in
  `generation_config.eos_token_id`. `<|pad|>` pads.
- The chat template is ChatML with `{% generation %}` around assistant content, so
  `apply_chat_template(..., return_assistant_tokens_mask=True)` works.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS, PAD, IM_START, IM_END = "<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START, IM_END]

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_WORDS = (
    "the a an and or but if then else to of in on for with what is how why when where who "
    "please answer question explain step first next finally result number sum total value "
    "you I we it this that there here yes no correct wrong good bad hello thanks sure "
    "tool search lookup calculator weather city file read write list count find compute "
    "assistant user system model data train test loss token text code function return"
).split()


def default_corpus(seed: int = 0) -> list[str]:
    """Returns the built-in training corpus for the tiny tokenizer (deterministic for a seed)."""
    rng = random.Random(seed)
    lines: list[str] = []
    for _ in range(300):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f"{a}+{b}={a + b}")
        lines.append(f"What is {a} times {b}? {a}*{b}={a * b}. The answer is {a * b}.")
    for _ in range(200):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 14)))
        lines.append(f"<|im_start|>user\n{words.capitalize()}?<|im_end|>\n")
        lines.append(f"<|im_start|>assistant\nSure, {words}.<|im_end|>\n")
    for _ in range(100):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        lines.append(
            f"Thought: I need to add {a} and {b}.\nAction: calculator[{a}+{b}]\n"
            f"Observation: {a + b}\nThought: The tool says {a + b}.\nAnswer: {a + b}\n"
        )
        lines.append(f"<think>{a} plus {b} is {a + b}</think>\nThe answer is {a + b}.")
        lines.append(f"Reasoning: search the city.\nAction: search(\"weather {a}\")\nFinal Answer: {b}")
    lines += [
        "```python\ndef add(a, b):\n    return a + b\n```",
        "for i in range(10):\n    print(i)",
        "import json\ndata = json.loads(text)\nreturn data['value']",
        "Ünïcödé café naïve — “quotes” … 日本語 😀",
    ] * 20
    return lines


def _train_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Returns a byte-level BPE tokenizer trained on `corpus`, with the special tokens and chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # trim_offsets=False keeps each token's offsets covering its leading space, so offsets tile
    # the text (spans.py maps characters to tokens through them).
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=IM_END, pad_token=PAD,
        additional_special_tokens=[EOS, IM_START],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


def _save_model(
    out_dir: Path, tokenizer: PreTrainedTokenizerFast, *, hidden_size: int, num_layers: int,
    num_heads: int, seed: int,
) -> None:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    # Initialise under a private generator state so building a model never disturbs the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(EOS)],
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def build_tiny_model(
    out_dir: Path, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
    vocab_size: int = 512, seed: int = 0, corpus: list[str] | None = None,
) -> Path:
    """Returns `out_dir` holding a random-initialised tiny Llama and its freshly trained tokenizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(corpus if corpus is not None else default_corpus(), vocab_size)
    _save_model(
        out_dir, tokenizer, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, seed=seed
    )
    return out_dir


def build_tiny_teacher(
    out_dir: Path, *, tokenizer_dir: Path | None = None, hidden_size: int = 96, num_layers: int = 3,
    num_heads: int = 4, vocab_size: int = 512, seed: int = 1, corpus: list[str] | None = None,
) -> Path:
    """Returns `out_dir` holding a different tiny Llama that shares the student's tokenizer.

    With `tokenizer_dir` (a student folder) its tokenizer files are copied, guaranteeing an
    identical vocabulary; otherwise the tokenizer is trained the same way as `build_tiny_model`'s.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tokenizer = _train_tokenizer(corpus if corpus is not None else default_corpus(), vocab_size)
    else:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    _save_model(
        out_dir, tokenizer, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, seed=seed
    )
    if tokenizer_dir is not None:
        # Byte-identical tokenizer files: distillation compares token ids across the two models.
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (Path(tokenizer_dir) / name).exists():
                shutil.copyfile(Path(tokenizer_dir) / name, out_dir / name)
    return out_dir
