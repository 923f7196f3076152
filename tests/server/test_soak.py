"""Soak on loopback, bounded (25 s, at most 400 requests): concurrent streaming clients on random adapters
(LoRA, prefix, base) with random cancellations and deadlines while adapters are loaded and unloaded in a
loop, with poisoned adapters (NaN, inf, overflow) and hostile sampling parameters mixed into the batches.
Zero unexpected errors, every completed greedy answer equal to its reference, the engine left empty
and memory flat. The load is bench/soak.py's ``run_soak``; bench/soak.py runs it longer and records figures.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.helpers import reference_greedy
from tests.server.conftest import engine_stats, start_daemon

ADAPTER_KINDS = {"": "BASE", "lora-qv": "LORA", "team/lora-all": "LORA", "lora-rs": "LORA",
                 "prefix": "PREFIX_TUNING", "prefix-proj": "PREFIX_TUNING"}
# The daemon runs in this process, so the reading covers the client side too. Measured on the CPU: a few
# MiB either way between the warm-up and the end; a leak of a row's cache or an adapter's tensors per
# request would exceed this well within 400 requests.
RSS_GROWTH_BOUND = 64 * 1024**2


def _soak_module():
    path = Path(__file__).resolve().parents[2] / "bench" / "soak.py"
    spec = importlib.util.spec_from_file_location("adapterd_bench_soak", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_soak(tiny_model_dir, served_root):
    soak = _soak_module()
    # 3 LoRA slots for 3 LoRA adapters plus churn: slots are filled, evicted and refilled throughout
    d = start_daemon(tiny_model_dir, served_root, lora_slots=3)
    target = f"127.0.0.1:{d.port}"
    try:
        adapters = [a for a in ADAPTER_KINDS if a]
        hostile = soak.make_poisoned_adapters(served_root)  # NaN / inf / overflowing adapters (issue 12)
        refs = asyncio.run(soak.references(target, adapters, lengths=(8, 32)))
        # the references are the daemon alone; spot-check them against PEFT (the full parity suite is
        # test_generate_rpc.py)
        tok = AutoTokenizer.from_pretrained(tiny_model_dir)
        for prompt, adapter_id in (("你是谁？", "prefix"), ("hello world", "team/lora-all")):
            ref = reference_greedy(tiny_model_dir, prompt, served_root / adapter_id, 32)
            assert refs[(prompt, adapter_id, 32)][0] == tok.decode(ref, skip_special_tokens=True)
        config = soak.SoakConfig(adapters=adapters, duration_s=25.0, max_requests=400, concurrency=32,
                                 warmup_s=5.0, warmup_requests=80, seed=1, hostile=hostile, hostile_share=0.08)
        processes = {"front end": os.getpid(), "engine core": d.daemon.engine_process.process.pid}
        report = asyncio.run(soak.run_soak(target, config, refs, ADAPTER_KINDS,
                                           lambda: soak.rss_by_process(processes)))
        print(soak.format_report(report, config))
        assert report.errors == []
        o = report.outcomes
        assert o["ok"] >= report.requests // 3 and o["cancelled"] > 0 and o["deadline"] > 0 and o["refused"] > 0
        assert o["hostile"] > 0  # poisoned adapters and hostile parameters were refused, alone
        assert set(report.by_kind) == {"BASE", "LORA", "PREFIX_TUNING"}
        assert report.loads > 0 and report.unloads > 0 and report.peak_in_flight >= 16
        growth = soak.rss_growth(report)
        assert set(growth) == {"front end", "engine core"}
        assert all(grew < RSS_GROWTH_BOUND for grew in growth.values()), growth  # flat in every process
        deadline = time.monotonic() + 10  # the last cancellations land at the next step
        idle = {"running": 0, "waiting": 0, "pinned_slots": 0}  # no slot stays pinned either
        while engine_stats(d) != idle and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine_stats(d) == idle
    finally:
        d.stop()
