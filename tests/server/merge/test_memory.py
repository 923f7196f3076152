"""Peak memory of a streamed merge stays bounded as the model grows.

Two random Llama checkpoints that differ only in depth (same largest tensor) are merged with an r 8
adapter on every attention and MLP projection, each in a fresh subprocess that reports its resident set
just before the merge and its peak during it. The peak is Linux's VmHWM, reset just before the merge by
writing 5 to ``/proc/self/clear_refs`` (else the import of torch would be the peak); where that is not
allowed, ``ru_maxrss`` is used. The growth must not follow the model's size.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from adapterd.server.merge.synthetic import ATTN, MLP, LlamaShape, write_random_llama, write_random_lora

CHILD = textwrap.dedent("""
    import gc, json, resource, sys
    from adapterd.server.merge import Merger

    def status_kib(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])

    base, root, out = sys.argv[1:4]
    merger = Merger(base, root, max_shard_bytes=32 * 1024**2)
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before, peak_key = status_kib("VmRSS"), "VmHWM"
    except OSError:
        before, peak_key = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, None
    merger.merge_to_model([("lora", 1.0)], out)
    after = status_kib(peak_key) if peak_key else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_kib": before, "after_kib": after}))
""")


def _measure(tmp_path: Path, layers: int) -> tuple[int, int, int]:
    """(model bytes, adapter bytes, peak RSS growth during the merge in bytes) for ``layers`` layers."""
    shape = LlamaShape(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=4)
    base = tmp_path / f"base-{layers}"
    size = write_random_llama(base, shape, dtype=__import__("torch").float32, max_shard_bytes=32 * 1024**2)
    adapter = write_random_lora(tmp_path / f"root-{layers}" / "lora", shape, r=8, targets=ATTN + MLP)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(base), str(tmp_path / f"root-{layers}"),
                           str(tmp_path / f"out-{layers}")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return size, adapter, (report["after_kib"] - report["before_kib"]) * 1024


def test_peak_memory_does_not_grow_with_model_size(tmp_path):
    small_size, small_adapter, small_growth = _measure(tmp_path, layers=2)
    big_size, big_adapter, big_growth = _measure(tmp_path, layers=40)
    largest = 2048 * 256 * 4  # the embedding / lm_head, fp32 bytes
    print(f"\nmodel {small_size / 1e6:.1f} MB (adapter {small_adapter / 1e6:.1f} MB) -> peak "
          f"+{small_growth / 1e6:.1f} MB; model {big_size / 1e6:.1f} MB (adapter {big_adapter / 1e6:.1f} MB) -> "
          f"peak +{big_growth / 1e6:.1f} MB; largest tensor {largest / 1e6:.1f} MB")
    assert big_size > 10 * small_size
    # Peak = the adapters (held whole: megabytes) + a few tensors in flight. The model grew by ~120 MB;
    # beyond the adapter's own growth the peak may move by allocator noise only.
    assert big_growth - small_growth < (big_adapter - small_adapter) + 4 * 1024**2
    assert big_growth - small_growth < 0.1 * (big_size - small_size)
    assert big_growth < big_adapter + 4 * largest + 16 * 1024**2
