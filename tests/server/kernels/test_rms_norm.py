"""The fused RMSNorm kernel (server/kernels/rms_norm.py) against transformers' LlamaRMSNorm.

CPU tests run the kernel in Triton's interpreter (conftest sets TRITON_INTERPRET=1 for each test not marked
``gpu``), with small hidden sizes. fp32 differs from transformers only in the reduction order (a few fp32
ulps). For bf16 and fp16 the interpreter's result equals transformers' exactly here (the kernel rounds the
normalized row to the input dtype before the weight multiply, as transformers does); the tests allow one
ulp of the output dtype on a few elements, where the last fp32 bit of ``rsqrt`` can move a rounding.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from adapterd.server import kernels
from adapterd.server.kernels import rms_norm as rn
from adapterd.server.kernels.rms_norm import FusedRMSNorm, fused_rms_norm_available, use_fused_rms_norm

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


def test_compiles_for_hopper(monkeypatch, tmp_path):
    """No GPU here, but Triton's own ptxas: the kernel compiles for sm_90 (the H200) with and without the
    residual add, bf16 in and out, so that a decode step on the GPU cannot fail on it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    rn._triton()
    kernel = triton.jit(rn._rms_norm_rows)
    pointers = dict.fromkeys(("x_ptr", "r_ptr", "w_ptr", "y_ptr", "s_ptr"), "*bf16")
    signature = {**pointers, **dict.fromkeys(("N", "stride_x", "stride_r", "stride_y", "stride_s"), "i32"),
                 "inv_n": "fp32", "eps": "fp32",
                 **dict.fromkeys(("BLOCK", "ADD", "ROUND_X", "ROUND_Y", "USE_PDL"), "constexpr")}
    for add in (False, True):  # with the add, as a decode step launches it: under PDL, waiting before any load
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={"BLOCK": 4096, "ADD": add, "ROUND_X": False, "ROUND_Y": False, "USE_PDL": add})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
        assert compiled.asm["cubin"], add
        ptx = compiled.asm["ptx"]
        assert ("griddepcontrol.wait" in ptx) == add
        if add:
            assert ptx.index("griddepcontrol.wait") < min(ptx.index("ld.global"), ptx.index("griddepcontrol.launch"))
