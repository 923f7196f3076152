"""A small random-weight Llama model with a byte-level BPE tokenizer, built offline in seconds.

The tests and the demo use it: no hub, no download. The tokenizer is trained on the text below, which
mixes English and Chinese, and is byte-level, so any UTF-8 text round-trips.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Training text for the tokenizer: the Alpaca template's words, the demo's data, some plain prose.
_CORPUS = """
Below is an instruction that describes a task. Write a response that appropriately completes the request.
Below is an instruction that describes a task, paired with an input that provides further context.
### Instruction: ### Input: ### Response:
The quick brown fox jumps over the lazy dog. Hello world, hello adapters, hello daemon.
A language model predicts the next token. Adapters are small; the base model is large.
Low-rank adaptation adds a product of two thin matrices to a frozen weight.
Prefix tuning prepends trained keys and values to every attention layer.
What is the capital of France? Paris is the capital of France. Tell me a story about a robot.
Summarize the following text. Translate to French. Write a poem about the sea and the sky.
One two three four five six seven eight nine ten. Monday Tuesday Wednesday Thursday Friday.
你是谁？我是Gitclone，一个语言模型，由来自git-cloner的研究人员训练。
你能做什么呢？我可以和你聊天。你是谁啊？我叫Gitclone，我是git-cloner开发的语言模型。
今天天气很好。我们一起去公园散步吧。机器学习是人工智能的一个分支。请把这句话翻译成英文。
你好，世界！大语言模型可以回答问题、写文章、翻译和总结。谢谢你的帮助。
"""

SPECIAL_TOKENS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of the tiny model. The defaults build in about a second and are ~1 MB on disk."""

    vocab_size: int = 1024  # upper bound; the BPE may stop earlier
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # grouped-query attention, as Llama 2 70B and Llama 3 use
    max_position_embeddings: int = 512
    seed: int = 0


def build_tokenizer(vocab_size: int):
    """Train a byte-level BPE on the embedded corpus and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        unk_token=SPECIAL_TOKENS["unk"],
        pad_token=SPECIAL_TOKENS["pad"],
        padding_side="left",
        model_max_length=4096,
    )


def build_tiny_model(out_dir: str | os.PathLike, config: TinyModelConfig | None = None,
                     model_type: str = "llama", **architecture: Any) -> Path:
    """Write a tokenizer and a random-weight causal LM to ``out_dir`` (safetensors): Llama by default, or any
    transformers ``model_type`` (``mistral``, ``qwen2``, ...) from its own config class, with ``architecture``
    overriding that config's fields (``sliding_window=8``, ``head_dim=16``, ...)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    cfg = config or TinyModelConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(cfg.vocab_size)
    fields: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }
    model_config = AutoConfig.for_model(model_type, **{**fields, **architecture})
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(model_config)
    # Wider weights than the default init (std 0.02) so that greedy decoding does not settle on one
    # token: the tests compare token sequences, which must vary with the prompt and the adapter.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.2 if "embed" in name or "lm_head" in name else 0.1)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
