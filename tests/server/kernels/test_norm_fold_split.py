"""The split fold (server/kernels/norm_fold_split.py): the post-attention add + norm with o_proj's LoRA delta, B read
over several programs a row, the row's last program finishing the norm. Judged against rms_norm's fold (one
program a row), which its own tests judge against the expand's launch and transformers' norm: in Triton's
interpreter the same bits; on a GPU within the fold's own tolerance; compiled for sm_90, B requested before the
PDL wait and the row's parts ordered by a release-acquire counter."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch

from adapterd.server.kernels import norm_fold_split as nfs
from adapterd.server.kernels import rms_norm as rn
from tests.server.kernels.test_rms_norm import _llama_norm, _output_delta, _x


def _case(rows: int, n: int, rank: int, slots: list[int], dtype: torch.dtype, device: str = "cpu", splits: int = 4):
    """One random decode step's add + norm inputs: (h, the layer's output, the norm, o_proj's pending delta)."""
    delta = _output_delta(rows, n, rank, slots, dtype, splits=splits)
    delta = rn.OutputDelta(type(delta.partials)(delta.partials.p.to(device), delta.partials.slots.to(device), rank),
                           delta.lora_b.to(device))
    h, out = _x((rows, 1, n), dtype, device=device, seed=2), _x((rows, 1, n), dtype, device=device, seed=3)
    return h, out, _llama_norm(n, dtype, device=device), delta


def _both(rows: int, n: int, rank: int, slots: list[int], dtype: torch.dtype, device: str = "cpu", splits: int = 4):
    """(the split fold's (s, y), the fold's (s, y)) for one random case; the layer's output left as it was."""
    h, out, norm, delta = _case(rows, n, rank, slots, dtype, device, splits)
    before = out.clone()
    split = nfs.add_norm(h, out, norm.weight, norm.variance_epsilon, delta)
    assert split is not None
    assert torch.equal(out, before)  # the residual itself is not written
    return split, rn.fused_add_rms_norm(h, out, norm.weight, norm.variance_epsilon, delta)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "cols"), [(96, 32), (100, 32), (128, 64)])  # parts: 3, 4 (the last ragged), 2
def test_equals_the_one_program_fold_bit_for_bit(dtype, n, cols, monkeypatch):
    """Every part's columns of the delta, the residual add and the norm equal the fold's, base rows (slot 0, NaN
    partials never read) included, and the counters are all zero again after the launch."""
    monkeypatch.setattr(nfs, "COLS", cols)
    rows = 5
    (s, y), (s_fold, y_fold) = _both(rows, n, 3, [0, 1, 2, 1, 0], dtype)
    assert torch.isfinite(s).all() and torch.isfinite(y).all()
    assert torch.equal(s, s_fold) and torch.equal(y, y_fold)
    assert not nfs._counters(s.device, 256).any()


@torch.no_grad()
def test_where_it_does_not_run_the_fold_serves(monkeypatch):
    """None (nothing launched) for a delta whose sums are done, and for rows no wider than one program's columns;
    ``fused_add_rms_norm`` takes the split only with ``ON``, and gives the fold's bits either way."""
    monkeypatch.setattr(nfs, "COLS", 32)
    rows, n = 3, 96
    delta = _output_delta(rows, n, 3, [1, 0, 2], torch.float32)
    norm = _llama_norm(n, torch.float32)
    h, out = _x((rows, n), torch.float32, seed=2), _x((rows, n), torch.float32, seed=3)
    done = rn.OutputDelta(delta.partials, delta.lora_b, done=torch.zeros(rows, n))
    assert nfs.add_norm(h, out, norm.weight, 1e-5, done) is None
    monkeypatch.setattr(nfs, "COLS", n)
    assert nfs.add_norm(h, out, norm.weight, 1e-5, delta) is None
    monkeypatch.setattr(nfs, "COLS", 32)
    calls = []
    real = nfs.add_norm
    monkeypatch.setattr(nfs, "add_norm", lambda *a: calls.append(1) or real(*a))
    off = rn.fused_add_rms_norm(h, out, norm.weight, 1e-5, delta)
    assert not calls
    monkeypatch.setattr(nfs, "ON", True)
    on = rn.fused_add_rms_norm(h, out, norm.weight, 1e-5, delta)
    assert calls and all(torch.equal(a, b) for a, b in zip(on, off, strict=True))


@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_at_a_7b_decode_steps_shape(dtype):
    """32 rows, hidden 4096, rank 16, o_proj's 32 splits, compiled: the sum as the fold's (fp32: within its last
    bits; bf16: one unit of the last place at most, on a few elements: a column's sum over the rank may be laid
    out otherwise), base rows bit for bit, the norm as transformers'; the counters zero again; and inside a
    CUDA graph, replayed twice, the same as eagerly."""
    from tests.server.kernels.test_rms_norm import ULP, _assert_matches

    rows, n = 32, 4096
    slots = [i % 3 for i in range(rows)]
    (s, y), (s_fold, _) = _both(rows, n, 16, slots, dtype, device="cuda", splits=32)
    base = [i for i, slot in enumerate(slots) if slot == 0]
    assert torch.equal(s[base], s_fold[base])
    if dtype == torch.float32:
        torch.testing.assert_close(s, s_fold, rtol=1e-5, atol=1e-5)
    else:
        assert (s == s_fold).float().mean() > 0.99
        torch.testing.assert_close(s.float(), s_fold.float(), rtol=2 * ULP[dtype], atol=2 * ULP[dtype])
    _assert_matches(y, _llama_norm(n, dtype, device="cuda")(s))
    assert not nfs._counters(s.device, 256).any()
    h, out, norm, delta = _case(rows, n, 16, slots, dtype, device="cuda", splits=32)
    eager = nfs.add_norm(h, out, norm.weight, norm.variance_epsilon, delta)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = nfs.add_norm(h, out, norm.weight, norm.variance_epsilon, delta)
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(captured, eager, strict=True))


@pytest.mark.sm90
def test_compiles_for_hopper(monkeypatch, tmp_path):
    """No GPU here, but Triton's own ptxas: the kernel compiles for sm_90 in bf16 at hidden 4096 (8 warps, the
    plain norm's), specialized as a launch is; B's tile is requested 16 bytes a load before ``griddepcontrol.wait``;
    the part's stores, a barrier, then one release-acquire increment; the row read back past L1 (``.cg``) after
    it, the counter zeroed atomically; no spill, and registers for one wave at 32 rows (256 programs)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    nfs._triton()
    kernel = triton.jit(nfs._norm_fold_split)
    fixed = {"BLOCK": 4096, "COLS": 512, "ROUND_X": False, "ROUND_Y": False, "BLOCK_R": 16, "BLOCK_S": 32,
             "USE_PDL": True}
    pointers = {"count_ptr": "*i32", "slot_ptr": "*i64", "p_ptr": "*fp32"}
    signature = {a: "constexpr" if a in fixed else pointers.get(a, "*bf16") if a.endswith("_ptr")
                 else "fp32" if a in ("inv_n", "eps") else "i32" for a in kernel.arg_names}
    aligned = [a for a in kernel.arg_names if a not in fixed and (a.endswith("_ptr") or a.startswith("stride_")
                                                                  or a == "N")]
    source = ASTSource(fn=kernel, signature=signature, constexprs=fixed,
                       attrs={(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    ptx = compiled.asm["ptx"]
    wait = ptx.index("griddepcontrol.wait")
    assert len(re.findall(r"ld\.global[\w.:]*\.v4\.b32", ptx[:wait])) >= 4, ptx[:wait]  # 16 KB over 256 threads
    assert not re.findall(r"(?:ld|st)\.global[\w.:]*\.b16\b", ptx)
    atom = ptx.index("atom.global.gpu.acq_rel.add")
    assert wait < atom and "bar.sync" in ptx[ptx.rindex("st.global", 0, atom):atom]
    assert "bar.sync" in ptx[atom:ptx.index("ld.global.cg", atom)]
    assert "atom.global.gpu.acq_rel.exch" in ptx[atom + 1:] or "atom.global.gpu.exch" in ptx[atom + 1:]
    cubin = tmp_path / "split_fold.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    usage = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True,
                           check=True).stdout
    # 2 programs of 8 warps an SM by registers (<= 128 a thread): 264 on the H200's 132 SMs against 256
    assert int(re.search(r"REG:(\d+)", usage).group(1)) <= 128 and re.search(r"STACK:0\b", usage), usage


def test_engine_decode_steps_with_the_split_fold_keep_pefts_tokens(tiny_model_dir, adapter_root, monkeypatch):
    """Switched on (``ON``), with o_proj's delta going to the post-attention norm at every decode step
    (``NORM_FOLD_MIN_ROWS`` 1) over the float base (its sums not done in o_proj's launch): each such norm runs as
    the split fold (the tiny model's 64 columns over 4 programs a row), and every row's greedy tokens equal PEFT's
    for it alone, adapters on q and v, on every linear, on q and o, mixed with base and prefix rows."""
    from adapterd.server.engine import decoder
    from tests.server.adapters.test_lora_group import _serve_jobs_against_peft

    monkeypatch.setattr(nfs, "ON", True)
    monkeypatch.setattr(nfs, "COLS", 16)
    monkeypatch.setattr(decoder, "NORM_FOLD_MIN_ROWS", 1)
    launches, real = [], nfs.add_norm

    def counted(*args):
        out = real(*args)
        launches.append(out is not None)
        return out

    monkeypatch.setattr(nfs, "add_norm", counted)
    base = _serve_jobs_against_peft(tiny_model_dir, adapter_root, "none", monkeypatch)
    assert launches and all(launches) and len(launches) >= 3 * base.num_layers
