"""Starting an engine core and connecting a front end to it: spawn it, wait until it serves, build the client."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ..config import ServerConfig
from ..engine import EngineConfig
from .client import EngineClient
from .process import CoreSpec, EngineProcess

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 30.0  # a core that reported ready answers its first call within this, seconds


def engine_config(cfg: ServerConfig) -> EngineConfig:
    return EngineConfig(max_batch_size=cfg.max_batch_size, max_queue=cfg.max_queue, lora_slots=cfg.lora_slots,
                        max_lora_rank=cfg.max_lora_rank, cuda_graphs=cfg.cuda_graphs, int8_kernel=cfg.int8_kernel,
                        fused_kernels=cfg.fused_kernels, own_decoder=cfg.own_decoder)


async def start_engine_core(cfg: ServerConfig, on_down: Callable[[str], None], on_up: Callable[[], None],
                            on_give_up: Callable[[str], None]) -> tuple[EngineProcess, EngineClient]:
    """Spawn the core for ``cfg``, wait until it serves, and return it with a connected client.

    ``on_down`` / ``on_up`` / ``on_give_up`` are called on the event loop when the core dies, serves again after
    a restart, or keeps dying (the caller tells the client: ``EngineClient.core_down`` / ``core_up``)."""
    spec = CoreSpec(base=cfg.base, adapters=cfg.adapters, quantization=cfg.quantization, engine=engine_config(cfg),
                    device=cfg.device, dtype=cfg.dtype, max_loaded_adapter_bytes=cfg.adapter_cache_mb * 2**20,
                    address=EngineProcess.private_address(), metrics=cfg.metrics_port is not None,
                    log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()),
                    gil_switch_interval_s=cfg.gil_switch_interval_ms / 1000)
    process = EngineProcess(spec, on_down, on_up, on_give_up)
    tokenizer = asyncio.create_task(asyncio.to_thread(_load_tokenizer, cfg))
    await process.start()
    client = EngineClient(spec.address, await tokenizer)
    await client.connect(HELLO_TIMEOUT_S)
    return process, client


async def connect_engine_core(cfg: ServerConfig, address: str) -> EngineClient:
    """A client of the engine core serving at ``address`` (started by another front end)."""
    client = EngineClient(address, await asyncio.to_thread(_load_tokenizer, cfg))
    await client.connect(HELLO_TIMEOUT_S)
    return client


def _load_tokenizer(cfg: ServerConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.base)
