"""Decode attention with rotary and the cache write, one layer: what the own decoder runs today against library
options (issue 18: "attention decode with per-row lengths, rotary and the cache append fused, from a well-kept
kernel library").

Per layer and step the own decoder (server/engine/decoder.py) runs, for q [rows, heads, 1, dim] and this step's
k, v [rows, kv heads, 1, dim]: transformers' ``apply_rotary_pos_emb`` (rotate-half: slices, a negation, a cat,
multiplies and adds for q and k, ~10 kernels), the cache write at each row's position (``DecodeView.update``:
two index_put), and SDPA over the padded bucket with an additive mask (``decode_mask``). Variants timed here,
each on the same inputs:

* ``eager``     that sequence, as the decoder runs it;
* ``compiled``  the same function under ``torch.compile`` (inductor fuses the rotary and the cache writes into a
  few Triton kernels; SDPA stays the library's call);
* ``flex``      rotary and writes compiled as above, attention by ``flex_attention`` (PyTorch's compiled
  attention) with per-row lengths as a ``mask_mod`` over a block mask, so no additive mask is read and key
  blocks past a row's length are skipped;
* ``liger``     the rotary by liger-kernel's Triton kernel (``liger_rotary_pos_emb``: q and k in one launch, in
  place), the writes and SDPA as in ``eager``. liger-kernel is not in the GPU image: its wheel (0.9 MB,
  py3-none-any) is carried in .whl/optional/ and installed by ``gpu_decode.sh attention``; where it does not
  import (or on the CPU: Triton) the variant is skipped with the reason;
* ``ours``      what decode steps ran from 4452dda: the rotation of q and k and both cache writes in one Triton
  launch (``server/kernels/rope_append.py``, bit for bit transformers' rotation), then SDPA as in ``eager``.
  Skipped where its kernel cannot run (the CPU without ``TRITON_INTERPRET=1``);
* ``splitN``    what they ran from 789a942: ``ours``' rotary + append, then attention split along the keys in
  N-entry chunks (``server/kernels/decode_attention.py``; the engine's N is its ``CHUNK``, 64; ``--chunks``
  names the Ns to time) and the splits merged by a second launch (``fused=False``). Skipped where ``ours`` is;
* ``fusedN``    what they run now: as ``splitN``, the merge done by the last split of each row and head to finish
  instead of a launch of its own (``fused=True``, the same bits as ``splitN``). Skipped where ``ours`` is;
* ``freshN``    the engine's call since f2be504: the merge fused where ``fuse_merge`` picks it, and ``fresh`` (the
  appended entries' positions) given, so that under PDL the chunk's keys and values are read before the kernel
  waits for the append, the appended entry again after it. Skipped where ``ours`` is.

FlashInfer (batch decode over a paged cache, its RoPE and append kernels) was the other candidate the issue names.
Its wheel, flashinfer-python 0.7.4, is 101 MB and needs nvidia-cutlass-dsl, cuda-tile and apache-tvm-ffi besides:
more than the device tool carries to the GPU machine (64 MiB a call, wheels included), so it cannot be measured
there; its kernels compile on first use (nvcc is there) but the package itself cannot travel.

Each variant's output is checked against an fp32 computation written out here (rotary by its formula,
softmax(q k^T / sqrt(dim)) v over each row's valid entries) before it is timed: within 1% of max |out| for bf16.
Timing: ``--calls`` calls captured in one CUDA graph, replayed (bench/graph_timing.py), so launch overheads count
as they do in the engine's decode graphs.

    python3 bench/attention_bench.py                      # on the GPU: Llama-2-7B and Llama-3-8B heads, 1 and 32 rows
    python3 bench/attention_bench.py --variants ours,split32,split64,split128 --chunks 32,64,128
    python3 bench/attention_bench.py --variants split64,fused64 --rows 1   # the merge's launch against none
    python3 bench/attention_bench.py --device cpu --shape tiny --variants eager,flex   # the CPU check (tests)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from graph_timing import time_cpu, time_cuda

SHAPES = {  # (q heads, key/value heads, head dim)
    "llama2-7b": (32, 32, 128),
    "llama3-8b": (32, 8, 128),
    "tiny": (4, 2, 16),
}
TOLERANCE = 0.01  # of max |out|: bf16 keeps 8 significant bits (0.4% a rounding), a few roundings deep


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """transformers' Llama ``apply_rotary_pos_emb`` (cos, sin ``[rows, 1, dim]`` unsqueezed over heads)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class Inputs:
    """One decode step's tensors for one layer: rows at positions ``pos`` (their first ``pos`` cache entries
    valid), a bucket of ``bucket`` entries, bf16 (fp32 on the CPU)."""

    def __init__(self, shape: tuple[int, int, int], rows: int, ctx: int, bucket: int, device: str,
                 dtype: torch.dtype, seed: int = 0) -> None:
        heads, kv_heads, dim = shape
        g = torch.Generator().manual_seed(seed)

        def rand(*size: int) -> torch.Tensor:
            return torch.randn(*size, generator=g).to(device=device, dtype=dtype)

        self.heads, self.kv_heads, self.dim, self.bucket = heads, kv_heads, dim, bucket
        self.q, self.k, self.v = rand(rows, heads, 1, dim), rand(rows, kv_heads, 1, dim), rand(rows, kv_heads, 1, dim)
        self.keys, self.values = rand(rows, kv_heads, bucket, dim), rand(rows, kv_heads, bucket, dim)
        # rows at different lengths around ctx (the batch's rows never share one), all inside the bucket
        self.pos = torch.tensor([max(1, ctx - 37 * i % max(ctx // 2, 1)) for i in range(rows)], device=device)
        inv = 1.0 / 10000 ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
        angles = self.pos[:, None].float() * inv[None, :]
        emb = torch.cat((angles, angles), dim=-1)[:, None, :]  # [rows, 1, dim]
        self.cos, self.sin = emb.cos().to(dtype), emb.sin().to(dtype)
        entry = torch.arange(bucket, device=device)[None, :]
        self.mask = torch.where(entry <= self.pos[:, None], 0.0, float("-inf")).to(dtype)[:, None, None, :]
        self.rows = torch.arange(rows, device=device)

    def reference(self) -> torch.Tensor:
        """fp32, written out: rotary by its formula, the new entry at ``pos``, attention over entries 0..pos."""
        q, k = (t.float() for t in (self.q, self.k))
        cos, sin = self.cos.float()[:, None], self.sin.float()[:, None]
        half = self.dim // 2
        q = q * cos + torch.cat((-q[..., half:], q[..., :half]), -1) * sin
        k = k * cos + torch.cat((-k[..., half:], k[..., :half]), -1) * sin
        out = torch.empty(self.q.shape, dtype=torch.float32, device=self.q.device)
        group = self.heads // self.kv_heads
        for r, p in enumerate(self.pos.tolist()):
            keys, values = self.keys[r, :, : p + 1].float().clone(), self.values[r, :, : p + 1].float().clone()
            keys[:, p], values[:, p] = k[r, :, 0], self.v[r, :, 0].float()
            keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
            weights = torch.softmax(q[r] @ keys.transpose(-1, -2) / self.dim**0.5, dim=-1)
            out[r] = weights @ values
        return out


def eager(x: Inputs, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    q, k = rotary(x.q, x.k, x.cos, x.sin)
    keys[x.rows, :, x.pos] = k[:, :, 0]
    values[x.rows, :, x.pos] = x.v[:, :, 0]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=x.mask, enable_gqa=x.kv_heads != x.heads)


def _rotate_and_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    q, k = rotary(q, k, cos, sin)
    keys[rows, :, pos] = k[:, :, 0]
    values[rows, :, pos] = v[:, :, 0]
    return q


def liger_rope() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """liger-kernel's rotary (ImportError where it or Triton is missing)."""
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    return liger_rotary_pos_emb


def variants(names: list[str], compile_ok: bool,
             chunks: tuple[int, ...] = (64,)) -> dict[str, Callable[[Inputs], Callable[[], torch.Tensor]]]:
    """name -> (inputs -> a call of that variant on fresh copies of the cache)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled_step = torch.compile(eager, fullgraph=True, dynamic=False) if compile_ok else eager
    write = torch.compile(_rotate_and_write, fullgraph=True, dynamic=False) if compile_ok else _rotate_and_write
    flex = torch.compile(flex_attention, fullgraph=True, dynamic=False) if compile_ok else flex_attention

    def make(step: Callable[..., torch.Tensor]) -> Callable[[Inputs], Callable[[], torch.Tensor]]:
        def build(x: Inputs) -> Callable[[], torch.Tensor]:
            keys, values = x.keys.clone(), x.values.clone()
            return lambda: step(x, keys, values)
        return build

    def build_flex(x: Inputs) -> Callable[[], torch.Tensor]:
        keys, values = x.keys.clone(), x.values.clone()
        pos = x.pos

        def visible(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202 (flex's mask_mod signature)
            return kv_idx <= pos[b]

        # Once a step in the engine (every layer shares it); here once, outside the timed call.
        block_mask = create_block_mask(visible, len(pos), None, 1, x.bucket, device=str(pos.device))

        def call() -> torch.Tensor:
            q = write(x.q, x.k, x.v, x.cos, x.sin, keys, values, x.rows, x.pos)
            return flex(q, keys, values, block_mask=block_mask, enable_gqa=x.kv_heads != x.heads)
        return call

    def build_liger(x: Inputs) -> Callable[[], torch.Tensor]:
        rope = liger_rope()
        keys, values = x.keys.clone(), x.values.clone()
        q, k = x.q.clone(), x.k.clone()  # rotated in place: the first call (the one checked) sees x's values

        def call() -> torch.Tensor:
            rq, rk = rope(q, k, x.cos, x.sin)
            keys[x.rows, :, x.pos] = rk[:, :, 0]
            values[x.rows, :, x.pos] = x.v[:, :, 0]
            return F.scaled_dot_product_attention(rq, keys, values, attn_mask=x.mask,
                                                  enable_gqa=x.kv_heads != x.heads)
        return call

    def require_kernels(device: torch.device) -> None:
        from adapterd.server.kernels.rope_append import rope_append_available

        if not rope_append_available(device):
            raise ImportError(f"the rotary + append kernel does not run on {device} (Triton, or "
                              "TRITON_INTERPRET=1 on the CPU)")

    def build_ours(x: Inputs) -> Callable[[], torch.Tensor]:
        from adapterd.server.kernels.rope_append import rope_append

        require_kernels(x.q.device)
        keys, values = x.keys.clone(), x.values.clone()
        q, k, v = (t.transpose(1, 2) for t in (x.q, x.k, x.v))  # [rows, 1, heads, dim], as split from q/k/v

        def call() -> torch.Tensor:
            rq = rope_append(q, k, v, x.cos, x.sin, keys, values, x.pos)
            return F.scaled_dot_product_attention(rq, keys, values, attn_mask=x.mask,
                                                  enable_gqa=x.kv_heads != x.heads)
        return call

    def build_split(chunk: int, fused: bool | None = False, fresh: bool = False,
                    ) -> Callable[[Inputs], Callable[[], torch.Tensor]]:
        def build(x: Inputs) -> Callable[[], torch.Tensor]:
            from adapterd.server.kernels.decode_attention import decode_attention
            from adapterd.server.kernels.rope_append import rope_append

            require_kernels(x.q.device)
            keys, values = x.keys.clone(), x.values.clone()
            q, k, v = (t.transpose(1, 2) for t in (x.q, x.k, x.v))

            def call() -> torch.Tensor:
                rq = rope_append(q, k, v, x.cos, x.sin, keys, values, x.pos)
                return decode_attention(rq, keys, values, x.mask, x.dim**-0.5, chunk=chunk, fused=fused,
                                        fresh=x.pos if fresh else None)
            return call
        return build

    table = {"eager": make(eager), "compiled": make(compiled_step), "flex": build_flex, "liger": build_liger,
             "ours": build_ours, **{f"split{c}": build_split(c) for c in chunks},
             **{f"fused{c}": build_split(c, fused=True) for c in chunks},
             **{f"fresh{c}": build_split(c, fused=None, fresh=True) for c in chunks}}
    return {n: table[n] for n in names}


def within_tolerance(out: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float]:
    err = (out.float() - ref).abs().max().item()
    return err <= TOLERANCE * ref.abs().max().item(), err


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="llama2-7b,llama3-8b", help=f"comma-separated: {', '.join(SHAPES)}")
    p.add_argument("--rows", default="1,32")
    p.add_argument("--ctx", type=int, default=512, help="positions of the longest row")
    p.add_argument("--bucket", type=int, default=640, help="cache entries attention reads (the engine pads to it)")
    p.add_argument("--variants", default="eager,compiled,flex,liger,ours,split64,fused64",
                   help="comma-separated: eager, compiled, flex, liger, ours, split<N>, fused<N>, fresh<N> "
                   "(N among --chunks)")
    p.add_argument("--chunks", default="64",
                   help="comma-separated entries a split for the split<N> and fused<N> variants")
    p.add_argument("--calls", type=int, default=32, help="calls captured in one graph (one per layer)")
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    gpu = args.device.startswith("cuda")
    dtype = torch.bfloat16 if gpu else torch.float32
    names = args.variants.split(",")
    chunks = tuple(int(c) for c in args.chunks.split(","))
    known = {"eager", "compiled", "flex", "liger", "ours",
             *(f"{v}{c}" for v in ("split", "fused", "fresh") for c in chunks)}
    if set(names) - known:
        p.error(f"--variants: unknown {', '.join(sorted(set(names) - known))} (split<N>, fused<N> need N in --chunks)")
    results, failed = [], False
    print(f"{torch.cuda.get_device_name(0) if gpu else 'CPU'}; {dtype}; ctx {args.ctx} in a {args.bucket}-entry bucket")
    for shape in args.shape.split(","):
        for rows in (int(r) for r in args.rows.split(",")):
            x = Inputs(SHAPES[shape], rows, min(args.ctx, args.bucket - 1), args.bucket, args.device, dtype)
            ref = x.reference()
            line = {"shape": shape, "rows": rows}
            for name, build in variants(names, compile_ok=gpu, chunks=chunks).items():
                try:
                    call = build(x)
                except ImportError as exc:  # liger-kernel or Triton missing: say so, time the others
                    print(f"{shape:10s} rows={rows:<3d} {name:9s} skipped: {exc}", flush=True)
                    line[name] = {"skipped": str(exc)}
                    continue
                ok, err = within_tolerance(call(), ref)
                failed |= not ok
                us, mode = (time_cuda([call], args.calls, args.replays) if gpu else time_cpu([call], 3))
                line[name] = {"us": round(us, 2), "max_err": err, "ok": ok, "mode": mode}
                print(f"{shape:10s} rows={rows:<3d} {name:9s} {us:9.2f} us/layer ({mode})  max err {err:.2e} "
                      f"{'ok' if ok else 'OVER TOLERANCE'}", flush=True)
            results.append(line)
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
