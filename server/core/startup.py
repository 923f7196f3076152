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


def core_devices(cfg: ServerConfig) -> list[str | None]:
    """One entry per engine core: ``--device cuda:0,cuda:1`` -> two cores; unset -> one on the default device."""
    if cfg.device is None:
        return [None]
    return [entry.strip() for entry in cfg.device.split(",")]


def core_spec(cfg: ServerConfig, device: str | None) -> CoreSpec:
    return CoreSpec(base=cfg.base, adapters=cfg.adapters, quantization=cfg.quantization, engine=engine_config(cfg),
                    device=device, dtype=cfg.dtype, max_loaded_adapter_bytes=cfg.adapter_cache_mb * 2**20,
                    address=EngineProcess.private_address(), metrics=cfg.metrics_port is not None,
                    log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()),
                    gil_switch_interval_s=cfg.gil_switch_interval_ms / 1000)


async def start_engine_cores(cfg: ServerConfig, on_down: Callable[[int, str], None], on_up: Callable[[int], None],
                             on_give_up: Callable[[str], None]) -> tuple[list[EngineProcess], list[EngineClient]]:
    """Spawn one core per ``--device`` entry (all at once), wait until each serves, and return them with a
    connected client each.

    ``on_down(i, reason)`` / ``on_up(i)`` / ``on_give_up(reason)`` are called on the event loop when core ``i``
    dies, serves again after a restart, or keeps dying (the caller tells its client: ``core_down`` /
    ``core_up``). A core that cannot start stops the others and raises RuntimeError naming its device."""
    devices = core_devices(cfg)
    processes = [EngineProcess(core_spec(cfg, device), lambda reason, i=i: on_down(i, reason),
                               lambda i=i: on_up(i), on_give_up) for i, device in enumerate(devices)]
    tokenizer = asyncio.create_task(asyncio.to_thread(_load_tokenizer, cfg))
    started = await asyncio.gather(*(p.start() for p in processes), return_exceptions=True)
    failed = [(d, e) for d, e in zip(devices, started, strict=True) if isinstance(e, BaseException)]
    if failed:
        await asyncio.gather(*(p.stop(10) for p in processes))
        device, error = failed[0]
        raise RuntimeError(f"{error} (engine core on {device})" if len(devices) > 1 else str(error))
    tokens = await tokenizer
    clients = [EngineClient(p.spec.address, tokens) for p in processes]
    await asyncio.gather(*(c.connect(HELLO_TIMEOUT_S) for c in clients))
    return processes, clients


async def connect_engine_cores(cfg: ServerConfig, addresses: list[str]) -> list[EngineClient]:
    """Clients of the engine cores serving at ``addresses`` (started by another front end)."""
    tokenizer = await asyncio.to_thread(_load_tokenizer, cfg)
    clients = [EngineClient(address, tokenizer) for address in addresses]
    await asyncio.gather(*(c.connect(HELLO_TIMEOUT_S) for c in clients))
    return clients


def _load_tokenizer(cfg: ServerConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.base)
