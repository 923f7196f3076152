"""The fused RMSNorm kernel (server/kernels/rms_norm.py) against transformers' LlamaRMSNorm.

CPU tests run the kernel in Triton's interpreter (conftest sets TRITON_INTERPRET=1 for each test not marked
``gpu``), with small hidden sizes. fp32 differs from transformers only in the reduction order (a few fp32
ulps). For bf16 and fp16 the interpreter's result equals transformers' exactly here (the kernel rounds the
normalized row to the input dtype before the weight multiply, as transformers does); the tests allow one
ulp of the output dtype on a few elements, where the last fp32 bit of ``rsqrt`` can move a rounding.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch
import triton
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from adapterd.server import kernels
from adapterd.server.kernels import rms_norm as rn
from adapterd.server.kernels.rms_norm import FusedRMSNorm, fused_rms_norm_available, use_fused_rms_norm

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-23}  # relative, at worst


def _llama_norm(n: int, dtype: torch.dtype, eps: float = 1e-5, device: str = "cpu", seed: int = 0) -> LlamaRMSNorm:
    gen = torch.Generator().manual_seed(seed)
    norm = LlamaRMSNorm(n, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(n, generator=gen))
    return norm.to(device=device, dtype=dtype).eval()


def _x(shape: tuple[int, ...], dtype: torch.dtype, device: str = "cpu", seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype)


def _assert_matches(y: torch.Tensor, ref: torch.Tensor, min_exact: float = 0.99) -> None:
    """Same dtype and shape; every element within one ulp of y's dtype; at least ``min_exact`` of them equal
    (bf16/fp16); fp32: within 1e-6 relative."""
    assert y.dtype == ref.dtype and y.shape == ref.shape
    diff = (y.float() - ref.float()).abs()
    if y.dtype == torch.float32:
        bad = diff > 1e-6 * ref.abs() + 1e-30
        assert not bad.any(), f"{int(bad.sum())} of {y.numel()} off; max diff {diff.max().item():.3g}"
        return
    bad = diff > ULP[y.dtype] * ref.float().abs()
    assert not bad.any(), f"{int(bad.sum())} of {y.numel()} off by more than one ulp"
    exact = (y == ref).float().mean().item()
    assert exact >= min_exact, f"only {exact:.4f} of the outputs equal transformers'"


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 100), (96,)])
def test_matches_llama_rms_norm(dtype, shape):
    """Any leading shape (flattened to rows), a hidden size that is not a power of two (masked lanes)."""
    norm = _llama_norm(shape[-1], dtype)
    x = _x(shape, dtype)
    _assert_matches(FusedRMSNorm.from_module(norm)(x), norm(x))


@torch.no_grad()
@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                              (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_mixed_dtypes_promote_as_transformers(x_dtype, w_dtype):
    """The output dtype is ``promote_types(weight, x)`` (``weight * h.to(input_dtype)``), and the normalized
    row is rounded to x's dtype before the weight multiply (a bf16 x with an fp32 weight: fp32 output of
    bf16-rounded values times the weight)."""
    norm = _llama_norm(64, w_dtype)
    x = _x((4, 64), x_dtype)
    y = FusedRMSNorm.from_module(norm)(x)
    assert y.dtype == torch.promote_types(w_dtype, x_dtype)
    _assert_matches(y, norm(x))


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_add_then_norm_in_one_launch(dtype):
    """``add_forward``: the residual stream plus a layer's output, rounded as torch's sum (bit for bit), stored,
    and normed as the norm alone norms it; a strided residual goes in too."""
    norm = _llama_norm(100, dtype)
    fused = FusedRMSNorm.from_module(norm)
    h, delta = _x((3, 2, 100), dtype, seed=2), _x((3, 100, 2), dtype, seed=3).transpose(1, 2)
    summed, y = fused.add_forward(h, delta)
    assert torch.equal(summed, h + delta)
    assert torch.equal(y, fused(h + delta))
    _assert_matches(y, norm(h + delta))
    with pytest.raises(ValueError, match="residual must match"):
        rn.fused_add_rms_norm(h, delta.float() if dtype != torch.float32 else delta.half(), fused.weight, 1e-5)


def _output_delta(rows: int, n: int, rank: int, slots: list[int], dtype: torch.dtype, splits: int = 4):
    """o_proj's pending LoRA delta for ``rows`` rows: B tables [32, 3 slots, n] (slot 0 all zeros, as the slot
    table keeps it), partials [1, splits, rows, 16] (NaN on slot-0 rows: never written there, so never read)."""
    from adapterd.server.kernels.lora_bgmv import LoraPartials

    g = torch.Generator().manual_seed(5)
    lora_b = (torch.randn(32, 3, n, generator=g) * 0.1).to(dtype)  # deltas of about the outputs' size
    lora_b[:, 0] = 0
    p = torch.randn(1, splits, rows, 16, generator=g) * 0.1
    slot_t = torch.tensor(slots)
    p[:, :, slot_t == 0] = float("nan")
    return rn.OutputDelta(LoraPartials(p, slot_t, rank), lora_b)


def _with_delta_by_hand(r: torch.Tensor, delta: rn.OutputDelta) -> torch.Tensor:
    """r plus each row's delta in fp32, rounded once to r's dtype (rows on slot 0 untouched)."""
    p, rank = delta.partials.p, delta.partials.rank
    out = r.clone()
    for i, slot in enumerate(delta.partials.slots.tolist()):
        if slot:
            xa = p[0, :, i, :rank].sum(0)
            out[i] = (r[i].float() + xa @ delta.lora_b[:rank, slot].float()).to(r.dtype)
    return out


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [32, 1024])
def test_add_then_norm_adds_the_outputs_lora_delta_first(dtype, chunk, monkeypatch):
    """``add_forward`` with o_proj's pending LoRA delta (``OutputDelta``): the output plus each row's delta
    (its partials summed, times its slot's B, rounded once), then the residual add and the norm, in one launch,
    over several column chunks or one; base rows (slot 0) get no delta and their unwritten partials (NaN here)
    reach nothing; the output tensor itself is left as it was. In fp32 it equals the expand's own launch
    followed by the plain add + norm bit for bit (the interpreter sums both the same way)."""
    monkeypatch.setattr(rn, "FOLD_CHUNK", chunk)
    rows, n, rank = 5, 100, 3
    norm = _llama_norm(n, dtype)
    fused = FusedRMSNorm.from_module(norm)
    h, out = _x((rows, 1, n), dtype, seed=2), _x((rows, 1, n), dtype, seed=3)
    delta = _output_delta(rows, n, rank, [0, 1, 2, 1, 0], dtype)
    before = out.clone()
    assert fused.takes(h, out, delta)
    summed, y = fused.add_forward(h, out, delta)
    assert torch.equal(out, before)
    assert torch.isfinite(summed).all() and torch.isfinite(y).all()
    expected = h + _with_delta_by_hand(out.view(rows, n), delta).view(rows, 1, n)
    if dtype == torch.float32:
        from adapterd.server.kernels.lora_bgmv import lora_expand_

        unfolded = out.clone()
        lora_expand_((unfolded.view(rows, n),), delta.partials, (delta.lora_b,))
        plain_sum, plain_y = fused.add_forward(h, unfolded)
        assert torch.equal(summed, plain_sum) and torch.equal(y, plain_y)
        torch.testing.assert_close(summed, expected, rtol=1e-6, atol=1e-5)
    else:  # one bf16 rounding of the delta's fp32 sum, then the sum's: a unit of the last place at most
        torch.testing.assert_close(summed.float(), expected.float(), rtol=2 * ULP[dtype], atol=0.0)
    assert torch.equal(summed[[0, 4]], h[[0, 4]] + out[[0, 4]])  # base rows: the plain sum, bit for bit
    _assert_matches(y, norm(summed))


@torch.no_grad()
def test_a_delta_the_kernel_cannot_take_is_refused(monkeypatch):
    """``takes`` is false (and ``fused_add_rms_norm`` refuses) where the delta does not fit: another width, a
    B tile past ``MAX_FOLD_ELEMS``, other rows; the decoder then runs the expand's own launch."""
    norm = FusedRMSNorm.from_module(_llama_norm(64, torch.float32))
    h, out = _x((3, 1, 64), torch.float32), _x((3, 1, 64), torch.float32, seed=4)
    assert norm.takes(h, out, _output_delta(3, 64, 2, [1, 0, 2], torch.float32))
    for delta in (_output_delta(3, 96, 2, [1, 0, 2], torch.float32), _output_delta(2, 64, 2, [1, 0], torch.float32)):
        assert not norm.takes(h, out, delta)
        with pytest.raises(ValueError, match="does not fit"):
            rn.fused_add_rms_norm(h, out, norm.weight, 1e-5, delta)
    monkeypatch.setattr(rn, "MAX_FOLD_ELEMS", 16 * 32)
    assert not norm.takes(h, out, _output_delta(3, 64, 2, [1, 0, 2], torch.float32))


@torch.no_grad()
def test_strided_inputs():
    """A row-strided view goes in without a copy (its row stride is passed); a last dimension with a stride
    and a transposed tensor are made contiguous; results match either way."""
    norm = _llama_norm(64, torch.bfloat16)
    fused = FusedRMSNorm.from_module(norm)
    wide = _x((6, 160), torch.bfloat16)
    for x in (wide[:, 16:80], wide[::2, 32:96], wide[:, ::2][:, :64], _x((64, 6), torch.bfloat16).t(),
              _x((2, 64, 3), torch.bfloat16).transpose(1, 2)):
        assert not x.is_contiguous()
        _assert_matches(fused(x), norm(x))


@torch.no_grad()
def test_no_rows_and_bad_shapes():
    fused = FusedRMSNorm.from_module(_llama_norm(64, torch.float32))
    assert fused(torch.empty(0, 64)).shape == (0, 64)
    with pytest.raises(ValueError, match="weight must be"):
        rn.fused_rms_norm(torch.ones(2, 32), fused.weight, 1e-5)
    with pytest.raises(ValueError, match="rows of 1 to"):
        rn.fused_rms_norm(torch.ones(1, rn.MAX_HIDDEN + 1), torch.ones(rn.MAX_HIDDEN + 1), 1e-5)


def test_eager_math_where_the_kernel_cannot_run(monkeypatch):
    """Without the interpreter a CPU tensor takes transformers' math exactly; with autograd wanting a
    gradient too (the kernel has no backward), and the gradient is transformers'."""
    norm = _llama_norm(64, torch.float32)
    fused = FusedRMSNorm.from_module(norm)
    x = _x((3, 64), torch.float32).requires_grad_()
    calls = []
    monkeypatch.setattr(rn, "fused_rms_norm", lambda *a: calls.append(a))
    y = fused(x)  # grad enabled, x and the weight require grad
    assert torch.equal(y, norm(x)) and not calls
    y.sum().backward()
    assert x.grad is not None and norm.weight.grad is not None
    monkeypatch.delenv("TRITON_INTERPRET")
    with torch.no_grad():
        assert torch.equal(fused(x), norm(x)) and not calls


def test_available(monkeypatch):
    assert fused_rms_norm_available("cpu")  # TRITON_INTERPRET=1 (conftest)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not fused_rms_norm_available("cpu")
    assert fused_rms_norm_available("cuda") == (torch.cuda.is_available()
                                                and torch.cuda.get_device_capability() >= (8, 0))


def test_package_exports():
    assert kernels.FusedRMSNorm is FusedRMSNorm
    assert kernels.use_fused_rms_norm is use_fused_rms_norm
    assert kernels.fused_rms_norm_available is fused_rms_norm_available


def _tiny_llama(layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms at ones would hide a wrong weight multiply
        for module in model.modules():
            if isinstance(module, LlamaRMSNorm):
                module.weight.copy_(1 + 0.3 * torch.randn_like(module.weight))
    return model


def test_swap_in_a_llama_keeps_the_logits(monkeypatch):
    """2 layers: 2 norms a layer and the final one are replaced, sharing their weights (same parameters,
    same state dict keys); the logits are those of transformers' norms (fp32, to a few fp32 ulps), and the
    kernel did run (once per norm)."""
    model = _tiny_llama(layers=2)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        before = model(ids).logits
    weights = {name: p for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    assert use_fused_rms_norm(model) == 2 * 2 + 1
    assert use_fused_rms_norm(model) == 0  # nothing left to swap
    fused = [m for m in model.modules() if isinstance(m, FusedRMSNorm)]
    assert len(fused) == 5 and not any(isinstance(m, LlamaRMSNorm) for m in model.modules())
    assert all(p is weights[name] for name, p in model.named_parameters())
    assert list(model.state_dict()) == keys
    assert model.model.norm.variance_epsilon == 1e-5
    launches = []
    kernel = rn.fused_rms_norm
    monkeypatch.setattr(rn, "fused_rms_norm", lambda *a: launches.append(a) or kernel(*a))
    with torch.inference_mode():
        after = model(ids).logits
    assert len(launches) == 5
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


class GemmaStyleRMSNorm(nn.Module):  # (1 + weight), cast after the multiply: other math, never swapped
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(8))
        self.eps = 1e-6


class MistralRMSNorm(nn.Module):  # matched by class name, epsilon read from ``eps`` when no variance_epsilon
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(8))
        self.eps = 1e-3


def test_swap_by_class_name_only():
    shared = MistralRMSNorm()
    model = nn.Sequential(GemmaStyleRMSNorm(), shared, nn.Sequential(shared, nn.Linear(8, 8)))
    assert use_fused_rms_norm(model) == 1  # one module, referenced twice: stays one shared module
    assert isinstance(model[0], GemmaStyleRMSNorm)
    assert model[1] is model[2][0] and isinstance(model[1], FusedRMSNorm)
    assert model[1].variance_epsilon == 1e-3 and model[1].weight is shared.weight


# ------------------------------------------------------------------------- the compiled kernel (GPU only)


@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 4096), (32, 4096), (2, 17, 4096), (3, 5120), (4, 8192), (2, 16384)])
def test_gpu_matches_llama_rms_norm(dtype, shape):
    norm = _llama_norm(shape[-1], dtype, eps=1e-6, device="cuda")
    x = _x(shape, dtype, device="cuda")
    _assert_matches(FusedRMSNorm.from_module(norm)(x), norm(x))


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_strided_and_mixed():
    norm = _llama_norm(4096, torch.bfloat16, device="cuda")
    fused = FusedRMSNorm.from_module(norm)
    wide = _x((8, 3, 4096), torch.bfloat16, device="cuda")
    for x in (wide[:, -1], wide[:, :, ::1][::2], wide.transpose(0, 1)):  # last token of a prefill; views
        _assert_matches(fused(x), norm(x))
    norm32 = _llama_norm(4096, torch.float32, device="cuda")
    x = _x((5, 4096), torch.bfloat16, device="cuda")
    _assert_matches(FusedRMSNorm.from_module(norm32)(x), norm32(x))


@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("splits", [32, 43])
def test_gpu_add_then_norm_with_the_outputs_lora_delta(dtype, splits):
    """The fold at a 7B decode step's shape (32 rows, hidden 4096, rank 16; 32 splits: o_proj's, one a head; 43:
    down_proj's 11008 inputs), compiled:
    against the by-hand delta rounded once (fp32: within fp32's last bits; bf16: one unit of the last place at
    most, on a few elements), base rows the plain sum bit for bit, NaN partials of base rows unread; and inside
    a CUDA graph the same as eagerly."""
    rows, n = 32, 4096
    slots = [i % 3 for i in range(rows)]
    delta = _output_delta(rows, n, 16, slots, dtype, splits=splits)
    delta = rn.OutputDelta(type(delta.partials)(delta.partials.p.cuda(), delta.partials.slots.cuda(), 16),
                           delta.lora_b.cuda())
    norm = _llama_norm(n, dtype, device="cuda")
    fused = FusedRMSNorm.from_module(norm)
    h, out = _x((rows, 1, n), dtype, device="cuda", seed=2), _x((rows, 1, n), dtype, device="cuda", seed=3)
    assert fused.takes(h, out, delta)
    summed, y = fused.add_forward(h, out, delta)
    expected = h + _with_delta_by_hand(out.view(rows, n), delta).view(rows, 1, n)
    assert torch.isfinite(y).all()
    base = [i for i, slot in enumerate(slots) if slot == 0]
    assert torch.equal(summed[base], h[base] + out[base])
    if dtype == torch.float32:  # another summation order: fp32's last bits
        torch.testing.assert_close(summed, expected, rtol=1e-5, atol=1e-5)
    else:  # the delta's sum may round an ulp away from the hand's, rarely
        assert (summed == expected).float().mean() > 0.99
        torch.testing.assert_close(summed.float(), expected.float(), rtol=2 * ULP[dtype], atol=2 * ULP[dtype])
    _assert_matches(y, norm(summed))
    if dtype == torch.bfloat16:  # as launched: no tile read or written 2 bytes at a time
        from tests.server.kernels.launched import launched_ptx, narrow_global_accesses

        folds = [ptx for ptx in launched_ptx(rn._kernel(False)) if "evict_first" in ptx]  # B's loads: the fold's
        assert folds and not any(narrow_global_accesses(ptx) for ptx in folds)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_summed, g_y = fused.add_forward(h, out, delta)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(g_summed, summed) and torch.equal(g_y, y)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_and_replay():
    """Compiled by an eager call, the kernel captures in a CUDA graph (1 and 32 rows, the same compiled
    kernel) and replays with new inputs; no host sync on the way."""
    norm = _llama_norm(4096, torch.bfloat16, device="cuda")
    fused = FusedRMSNorm.from_module(norm)
    xs = [_x((1, 4096), torch.bfloat16, device="cuda"), _x((32, 4096), torch.bfloat16, device="cuda", seed=2)]
    with torch.inference_mode():
        for x in xs:
            fused(x)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ys = [fused(x) for x in xs]
        for i, x in enumerate(xs):
            x.copy_(_x(tuple(x.shape), torch.bfloat16, device="cuda", seed=10 + i))
        graph.replay()
        torch.cuda.synchronize()
        for x, y in zip(xs, ys, strict=True):
            _assert_matches(y, norm(x))


@pytest.mark.gpu
def test_gpu_swap_in_a_llama_keeps_the_logits():
    model = _tiny_llama(layers=2).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.inference_mode():
        before = model(ids).logits
        assert use_fused_rms_norm(model) == 5
        after = model(ids).logits
    torch.testing.assert_close(after.float(), before.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.sm90
def test_compiles_for_hopper(monkeypatch, tmp_path):
    """No GPU here, but Triton's own ptxas: the kernel compiles for sm_90 (the H200) with and without the
    residual add, and with o_proj's or down_proj's LoRA delta (rank 16 at hidden 4096, as a 7B decode step launches
    it), bf16 in and out, so that a decode step on the GPU cannot fail on it. Given the 16-divisible pointers and
    sizes that Triton specializes at run time, the delta's B is read 16 bytes a load, nothing spills, and the sums
    over the rank stay within each thread: a few barriers more than the plain add + norm (the partials' sum, the
    delta's layout change, the one between its store and the row's load: 6 at this Triton), where rank rows
    spread over warps add dozens (a 1024-column chunk: 54). Only the slot and B's first chunk are read before the
    PDL wait (the layer's output, the residual and the partials are the kernels' before it)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    rn._triton()
    kernel = triton.jit(rn._rms_norm_rows)
    pointers = dict.fromkeys(("x_ptr", "r_ptr", "w_ptr", "y_ptr", "s_ptr", "b_ptr"), "*bf16")
    ints = ("N", "stride_x", "stride_r", "stride_y", "stride_s", "rank", "splits", "stride_br", "stride_bs",
            "stride_ps", "stride_slot")
    signature = {**pointers, "slot_ptr": "*i64", "p_ptr": "*fp32", **dict.fromkeys(ints, "i32"),
                 "inv_n": "fp32", "eps": "fp32", "d_ptr": "*fp32", "stride_d": "i32",
                 **dict.fromkeys(("BLOCK", "ADD", "ROUND_X", "ROUND_Y", "LORA", "BLOCK_R", "BLOCK_S", "CHUNK",
                                  "USE_PDL", "DONE"), "constexpr")}
    aligned = (*pointers, "slot_ptr", "p_ptr", "N", "stride_x", "stride_r", "stride_y", "stride_s", "stride_br",
               "stride_bs", "stride_ps")
    attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    barriers = {}
    # with the add, as a decode step launches it; the delta of o_proj (32 splits: one a head) and of down_proj (43
    # splits of 11008 inputs, in a 64-split tile)
    for add, lora, block_s in ((False, False, 1), (True, False, 1), (True, True, 32), (True, True, 64)):
        constexprs = {"BLOCK": 4096, "ADD": add, "ROUND_X": False, "ROUND_Y": False, "LORA": lora, "BLOCK_R": 16,
                      "BLOCK_S": block_s, "CHUNK": min(rn.FOLD_CHUNK, 4096), "USE_PDL": add, "DONE": False}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        warps = rn.FOLD_WARPS if lora else 8
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        assert compiled.asm["cubin"], add
        ptx = compiled.asm["ptx"]
        barriers[add, lora] = ptx.count("bar.sync")
        assert ("griddepcontrol.wait" in ptx) == add
        wait = ptx.index("griddepcontrol.wait") if add else 0
        if add and not lora:  # under PDL, waiting before any load
            assert wait < min(ptx.index("ld.global"), ptx.index("griddepcontrol.launch"))
        if lora:  # before the wait only the slot and B's first chunk (no kernel writes either): B in flight early
            early = re.findall(r"ld\.global[^\s]*", ptx[:wait])
            assert early and all(ld == "ld.global.b64" or "evict_first" in ld for ld in early), early
        if lora:  # B 16 bytes a load; no local memory (no spill); the rank's sums within each thread
            assert "evict_first.L2::cache_hint.v4" in ptx and "ld.local" not in ptx and "st.local" not in ptx
            assert barriers[True, True] <= barriers[True, False] + 8, barriers
            cubin = tmp_path / "fold.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            usage = subprocess.run([str(CUOBJDUMP), "-res-usage", str(cubin)], capture_output=True, text=True,
                                   check=True).stdout
            assert re.search(r"REG:(\d+)", usage) and int(re.search(r"REG:(\d+)", usage).group(1)) <= 128, usage
            assert re.search(r"STACK:0\b", usage), usage
    # with the delta's sums done (int8_expand.py): no B read (no evict-first load), the sums read after the wait
    done = {**constexprs, "BLOCK_S": 32, "DONE": True}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=done, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": rn.FOLD_WARPS})
    ptx = compiled.asm["ptx"]
    assert "evict_first" not in ptx and "ld.local" not in ptx and "st.local" not in ptx
    assert re.findall(r"ld\.global[^\s]*", ptx[:ptx.index("griddepcontrol.wait")]) == ["ld.global.b64"]  # the slot
