"""Generation latency while MergeAdapter runs beside serving, against the same load without a merge.

Starts a daemon over gRPC on a small random Llama (fp32 on the CPU, or ``--device cuda``), then times one
greedy request after another (``--tokens`` new tokens each, a LoRA adapter) in three phases: no merge, merges
into full weights running back to back through ``MergeAdapter``, no merge again (to see drift). Prints
p50/p95 per phase and the ratio of the merge phase to the quiet ones, and appends them to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from results_table import git_commit


def build(work: Path, layers: int, hidden: int) -> tuple[Path, Path]:
    from adapterd.common.tiny_model import build_tokenizer
    from adapterd.server.merge.synthetic import LlamaShape, write_random_llama, write_random_lora

    shape = LlamaShape(vocab_size=2000, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                       num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64)
    base, root = work / "base", work / "adapters"
    if not (base / "config.json").is_file():
        write_random_llama(base, shape, dtype=torch.float32)
        build_tokenizer(1024).save_pretrained(base)
        write_random_lora(root / "lora", shape, r=16)
    return base, root


def timed_requests(client, n: int, tokens: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        reply = client.generate("hello world", "lora", max_new_tokens=tokens, min_new_tokens=tokens)
        out.append(time.perf_counter() - t)
        assert reply.generated_token_count == tokens
    return out


def summary(xs: list[float]) -> tuple[float, float]:
    s = sorted(xs)
    return statistics.median(s) * 1000, s[min(len(s) - 1, int(0.95 * (len(s) - 1) + 0.5))] * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "adapterd-merge-latency"))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    from adapterd.clients import AdapterdClient
    from adapterd.server.app import DaemonThread
    from adapterd.server.config import ServerConfig
    from adapterd.v1 import adapterd_pb2 as pb

    work = Path(args.work)
    base, root = build(work, args.layers, args.hidden)
    daemon = DaemonThread(ServerConfig(base=base, adapters=root, quantization="none", port=0, device=args.device,
                                       merge_output_root=work / "merged")).start()
    merges: list[float] = []
    stop = threading.Event()

    def merge_loop() -> None:
        with AdapterdClient(f"127.0.0.1:{daemon.port}", timeout=600) as c:
            while not stop.is_set():
                t = time.perf_counter()
                list(c.merge(pb.MergeAdapterRequest(adapters=[pb.WeightedAdapter(adapter_id="lora")],
                                                     output_model_dir="merged", overwrite=True)))
                merges.append(time.perf_counter() - t)

    try:
        with AdapterdClient(f"127.0.0.1:{daemon.port}", timeout=600) as client:
            timed_requests(client, 5, args.tokens)  # warm-up
            quiet1 = timed_requests(client, args.requests, args.tokens)
            merger = threading.Thread(target=merge_loop)
            merger.start()
            while not merges and merger.is_alive():  # the first merge is under way once one has finished
                time.sleep(0.05)
            during = timed_requests(client, args.requests, args.tokens)
            stop.set()
            merger.join()
            quiet2 = timed_requests(client, args.requests, args.tokens)
    finally:
        daemon.stop()
    q1, d, q2 = summary(quiet1), summary(during), summary(quiet2)
    quiet_p50 = (q1[0] + q2[0]) / 2
    size_mb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e6
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = [("no merge (before)", q1), ("merges running back to back", d), ("no merge (after)", q2)]
    for name, (p50, p95) in rows:
        print(f"{name:30s} p50 {p50:8.1f} ms  p95 {p95:8.1f} ms")
    print(f"merges: {len(merges)} of a {size_mb:.0f} MB model, median {statistics.median(merges):.2f} s; "
          f"p50 during / quiet = {d[0] / quiet_p50:.2f}")
    if not args.no_record:
        commit = git_commit()
        machine = torch.cuda.get_device_name(0) if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        lines = [f"\n### merge_latency: {machine}, commit {commit}, {when}",
                 f"Random Llama {args.layers} layers x {args.hidden} ({size_mb:.0f} MB fp32) on {device}; "
                 f"{args.requests} sequential greedy requests of {args.tokens} tokens per phase over gRPC, LoRA "
                 f"r16; {len(merges)} merges into full weights in the middle phase (median "
                 f"{statistics.median(merges):.2f} s each).", "",
                 "| phase | p50 ms | p95 ms |", "| --- | --- | --- |"]
        lines += [f"| {name} | {p50:.1f} | {p95:.1f} |" for name, (p50, p95) in rows]
        lines.append(f"| p50 during merges / quiet | {d[0] / quiet_p50:.2f} | |")
        with (Path(__file__).resolve().parent / "RESULTS.md").open("a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
