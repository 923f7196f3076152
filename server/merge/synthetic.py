"""Random-weight Llama checkpoints and LoRA adapters of any shape, written tensor by tensor.

For the merge's memory test and ``bench/merge_bench.py``: a Llama-2-7B-shaped bf16 checkpoint (13.5 GB) is
written with one tensor in memory at a time, through the same streaming shard writer the merge uses. No
transformers model is built, so any size can be made on a machine with little RAM.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..safetensors_io import ShardWriter, TensorEntry, plan_shards, write_index

DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LlamaShape:
    """Architecture sizes; the defaults are Llama-2-7B's."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Module suffix -> (out_features, in_features) for one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        kv = h // self.num_attention_heads * self.num_key_value_heads
        return {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h),
                "mlp.down_proj": (h, i)}

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Checkpoint key -> shape, as ``LlamaForCausalLM.save_pretrained`` names them (untied head)."""
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, self.hidden_size)}
        for layer in range(self.num_hidden_layers):
            p = f"model.layers.{layer}"
            for suffix, shape in self.linear_shapes().items():
                shapes[f"{p}.{suffix}.weight"] = shape
            shapes[f"{p}.input_layernorm.weight"] = (self.hidden_size,)
            shapes[f"{p}.post_attention_layernorm.weight"] = (self.hidden_size,)
        shapes["model.norm.weight"] = (self.hidden_size,)
        shapes["lm_head.weight"] = (self.vocab_size, self.hidden_size)
        return shapes


def _config_json(shape: LlamaShape, dtype: torch.dtype) -> dict[str, object]:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **asdict(shape),
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "hidden_act": "silu", "dtype": str(dtype).removeprefix("torch."), "bos_token_id": 1,
            "eos_token_id": 2}


def write_random_llama(out_dir: Path, shape: LlamaShape, *, dtype: torch.dtype = torch.bfloat16,
                       max_shard_bytes: int = 4 * 1024**3, seed: int = 0, std: float = 0.02) -> int:
    """Write a random checkpoint (safetensors shards, index, config.json); returns its tensor bytes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    item = torch.empty((), dtype=dtype).element_size()
    entries = [TensorEntry(name, DTYPE_NAMES[dtype], s, Path(), 0, item * int(torch.Size(s).numel()))
               for name, s in shape.tensor_shapes().items()]
    plans = plan_shards(entries, max_shard_bytes)
    gen = torch.Generator().manual_seed(seed)
    for plan in plans:
        writer = ShardWriter(out_dir / plan.filename, plan)
        for e in plan.entries:
            t = torch.ones(e.shape, dtype=dtype) if len(e.shape) == 1 else \
                (torch.randn(e.shape, generator=gen, dtype=torch.float32) * std).to(dtype)
            writer.write_tensor(e, t)
            del t
        writer.close()
    write_index(out_dir, plans)
    (out_dir / "config.json").write_text(json.dumps(_config_json(shape, dtype), indent=2) + "\n")
    return sum(e.nbytes for e in entries)


def write_random_lora(out_dir: Path, shape: LlamaShape, *, r: int = 16, alpha: int = 32,
                      targets: tuple[str, ...] = ATTN, seed: int = 0, std: float = 0.02) -> int:
    """Write a PEFT-format LoRA adapter with random A and B (fp32) on ``targets`` of every layer."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for layer in range(shape.num_hidden_layers):
        for suffix, (out_f, in_f) in shape.linear_shapes().items():
            if suffix.split(".")[-1] not in targets:
                continue
            key = f"base_model.model.model.layers.{layer}.{suffix}"
            state[f"{key}.lora_A.weight"] = torch.randn(r, in_f, generator=gen) * std
            state[f"{key}.lora_B.weight"] = torch.randn(out_f, r, generator=gen) * std
    save_file(state, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
              "target_modules": sorted(targets), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True}
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return sum(t.numel() * t.element_size() for t in state.values())
