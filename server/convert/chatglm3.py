"""``adapterd convert chatglm3 SRC DST``: a ChatGLM3 checkpoint (THUDM's layout) into a transformers-native
``GlmForCausalLM`` directory with a tokenizer that loads without remote code.

Every check is made from the config and the tensor headers before anything is written: a missing tensor, a
wrong shape or an unknown name is refused naming the tensor. Then the output shards are planned (names, dtypes
and shapes are all known), and each tensor is read, renamed (the fused ``query_key_value`` split by rows into
``q_proj``, ``k_proj``, ``v_proj``) and written, one at a time, so memory stays near the largest tensor. DST is
written under a temporary name beside it and renamed when complete (``merge/atomic.py``, ``common/fsutil.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import FailedPrecondition, NotFound
from ..merge.atomic import merge_output
from ..safetensors_io import ITEM_BYTES, ShardWriter, TensorEntry, plan_shards, write_index
from .chatglm3_layout import (
    IGNORED,
    LAYER,
    PREFIX_ENCODER,
    SPECIAL_TOKENS,
    ChatGLM3Config,
    base_tensors,
    glm_config,
    parse_config,
)
from .checkpoint import SourceCheckpoint, read_config_json, weight_files
from .tokenizer import build_tokenizer

DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3
SOURCE_STEMS = ("model", "pytorch_model")


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the converted model: rows ``first .. first + shape[0]`` of a source tensor."""

    name: str
    source: str
    first: int
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class ConvertResult:
    output: Path
    tensors: int
    bytes_written: int
    seconds: float
    has_prefix: bool  # the source also held a P-Tuning v2 prefix encoder (convert it with chatglm3-adapter)


def read_source_config(src: Path) -> ChatGLM3Config:
    return parse_config(read_config_json(src, "not a ChatGLM3 checkpoint directory"))


def open_source(src: Path, stems: tuple[str, ...] = SOURCE_STEMS) -> SourceCheckpoint:
    for stem in stems:
        files = weight_files(src, stem)
        if files:
            return SourceCheckpoint(files)
    raise NotFound(f"no weight files ({', '.join(f'{s}*.safetensors, {s}*.bin' for s in stems)})")


def check_tensors(source: SourceCheckpoint, expected: dict[str, tuple[int, ...]]) -> None:
    """Every expected tensor present, floating-point, with its published shape; FailedPrecondition naming the
    first that is not."""
    for name, shape in expected.items():
        tensor = source.tensors.get(name)
        if tensor is None:
            raise FailedPrecondition(f"tensor {name} is missing")
        if tensor.shape != shape:
            raise FailedPrecondition(f"tensor {name} has shape {list(tensor.shape)}; the config says {list(shape)}")
        if tensor.dtype not in ("F32", "F16", "BF16"):
            raise FailedPrecondition(f"tensor {name} is {tensor.dtype}; F32, F16 or BF16 was expected")


def plan_outputs(cfg: ChatGLM3Config, source: SourceCheckpoint) -> list[OutputTensor]:
    """The converted model's tensors, each a row range of a source tensor, in the source's dtype."""

    def out(name: str, src: str, first: int = 0, rows: int | None = None) -> OutputTensor:
        tensor = source.tensors[src]
        shape = tensor.shape if rows is None else (rows, *tensor.shape[1:])
        return OutputTensor(name, src, first, shape, tensor.dtype)

    outputs = [out("model.embed_tokens.weight", "transformer.embedding.word_embeddings.weight")]
    q, k, v = cfg.qkv_rows
    for i in range(cfg.num_layers):
        src, dst = LAYER.format(i=i), f"model.layers.{i}."
        outputs.append(out(dst + "input_layernorm.weight", src + "input_layernorm.weight"))
        for kind in ("weight", "bias") if cfg.add_qkv_bias else ("weight",):
            fused = src + f"self_attention.query_key_value.{kind}"
            outputs += [out(dst + f"self_attn.q_proj.{kind}", fused, 0, q),
                        out(dst + f"self_attn.k_proj.{kind}", fused, q, k),
                        out(dst + f"self_attn.v_proj.{kind}", fused, q + k, v)]
        outputs += [out(dst + "self_attn.o_proj.weight", src + "self_attention.dense.weight"),
                    out(dst + "post_attention_layernorm.weight", src + "post_attention_layernorm.weight"),
                    # SwiGLU: dense_h_to_4h's rows are the gate then the up projection, as gate_up_proj's
                    out(dst + "mlp.gate_up_proj.weight", src + "mlp.dense_h_to_4h.weight"),
                    out(dst + "mlp.down_proj.weight", src + "mlp.dense_4h_to_h.weight")]
    outputs += [out("model.norm.weight", "transformer.encoder.final_layernorm.weight"),
                out("lm_head.weight", "transformer.output_layer.weight")]
    return outputs


def check_unknown(source: SourceCheckpoint, expected: dict[str, tuple[int, ...]]) -> bool:
    """Refuse tensors outside the published layout (they would be dropped silently); True when the source
    holds a prefix encoder, which belongs to the adapter converter."""
    prefix = False
    for name in source.tensors:
        if name.startswith(PREFIX_ENCODER):
            prefix = True
        elif name not in expected and name not in IGNORED:
            raise FailedPrecondition(f"tensor {name} is not part of ChatGLM3's layout (refusing to drop it)")
    return prefix


def _entry(tensor: OutputTensor) -> TensorEntry:
    """The planned output entry (the shard planner reads its name, dtype, shape and size; no source bytes)."""
    nbytes = ITEM_BYTES[tensor.dtype]
    for size in tensor.shape:
        nbytes *= size
    return TensorEntry(tensor.name, tensor.dtype, tensor.shape, Path(), 0, nbytes)


def write_weights(out_dir: Path, source: SourceCheckpoint, outputs: list[OutputTensor], max_shard_bytes: int,
                  progress: Callable[[int, int], None] | None = None) -> int:
    """Write every output tensor into planned shards, one source read at a time; returns bytes written."""
    by_name = {t.name: t for t in outputs}
    plans = plan_shards([_entry(t) for t in outputs], max_shard_bytes)
    written, done = 0, 0
    for plan in plans:
        writer = ShardWriter(out_dir / plan.filename, plan)
        try:
            for entry in plan.entries:
                tensor = by_name[entry.name]
                writer.write_tensor(entry, source.rows(tensor.source, tensor.first, tensor.shape[0]))
                done += 1
                if progress is not None:
                    progress(done, len(outputs))
        except BaseException:
            writer.abort()
            raise
        writer.close()
        written += writer.bytes_written
    write_index(out_dir, plans)
    return written


DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def write_side_files(out_dir: Path, src: Path, cfg: ChatGLM3Config, dtype: str) -> None:
    """config.json, generation_config.json and the tokenizer (with ChatGLM3's chat template)."""
    from transformers import GenerationConfig, GlmConfig

    spm = src / "tokenizer.model"
    if not spm.is_file():
        raise NotFound("tokenizer.model is missing (ChatGLM3's SentencePiece model)")
    tokenizer = build_tokenizer(spm)
    special = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    if max(special.values()) >= cfg.padded_vocab_size:
        raise FailedPrecondition(f"tokenizer.model has {len(tokenizer)} tokens with ChatGLM3's special tokens; "
                                 f"padded_vocab_size is {cfg.padded_vocab_size}")
    fields = glm_config(cfg, special, tokenizer.eos_token_id, tokenizer.pad_token_id, DTYPES[dtype])
    GlmConfig(**fields).save_pretrained(out_dir)
    GenerationConfig(eos_token_id=fields["eos_token_id"], pad_token_id=fields["pad_token_id"]).save_pretrained(
        out_dir)
    tokenizer.model_max_length = cfg.seq_length
    tokenizer.save_pretrained(out_dir)


def convert_chatglm3(src: str | Path, dst: str | Path, *, overwrite: bool = False,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                     progress: Callable[[int, int], None] | None = None) -> ConvertResult:
    """Convert the ChatGLM3 checkpoint in ``src`` into a ``GlmForCausalLM`` directory at ``dst``."""
    started = time.monotonic()
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise NotFound("SRC is not a directory")
    cfg = read_source_config(src)
    source = open_source(src)
    try:
        expected = base_tensors(cfg)
        check_tensors(source, expected)
        has_prefix = check_unknown(source, expected)
        outputs = plan_outputs(cfg, source)
        with merge_output(dst, overwrite=overwrite, marker="config.json", field="DST") as tmp:
            write_side_files(tmp, src, cfg, outputs[0].dtype)  # the embedding's dtype
            written = write_weights(tmp, source, outputs, max_shard_bytes, progress)
    finally:
        source.close()
    return ConvertResult(dst, len(outputs), written, time.monotonic() - started, has_prefix)
