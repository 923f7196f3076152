"""Fused q/k/v and gate/up base projections (``server/engine/fused_projections.py``) in the engine's own decoder:
one matmul each, the same logits as the modules' own matmuls, the modules' tensors views of the fused ones
(no memory added), and whatever cannot be fused left to its module. Token parity with PEFT through the engine
(fused, since the own decoder fuses) is test_parity.py's and test_architectures.py's."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from adapterd.common.tiny_model import build_tiny_model
from adapterd.server.adapters.lora import QKV
from adapterd.server.engine.decoder import Decoder
from adapterd.server.engine.fused_projections import GATE_UP, LayerFusion
from tests.helpers import TEST_DEVICE
from tests.server.engine.test_architectures import FAMILIES
from tests.server.engine.test_decoder import LENGTH, OWN, PROMPT, step_logits
from tests.server.engine.test_decoder import TOLERANCE as DECODER_TOLERANCE

# fp32 logits, fused against unfused: one [q + k + v, in] matmul sums the same K products per output as three,
# but the BLAS may block a wider N differently (another summation order): rounding-level differences only.
TOLERANCE = 1e-5
PROJECTIONS = QKV + GATE_UP


def load(path, device: str = TEST_DEVICE) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()


@pytest.fixture(scope="module", params=OWN)
def family_dir(request, tmp_path_factory):
    model_type, fields = FAMILIES[request.param]
    return model_type, build_tiny_model(tmp_path_factory.mktemp(request.param) / "m", model_type=model_type, **fields)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    """Qwen2: biases on q, k and v (not on o or the MLP)."""
    return build_tiny_model(tmp_path_factory.mktemp("qwen2") / "m", model_type="qwen2")


def _ids(model: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, model.config.vocab_size, (2, LENGTH), generator=generator).to(TEST_DEVICE)


def _module_calls(model: nn.Module) -> list[str]:
    """Names of the projection modules called from now on (forward hooks; the fused matmul calls none)."""
    calls: list[str] = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in PROJECTIONS:
            module.register_forward_hook(lambda m, args, out, name=name: calls.append(name))
    return calls


@torch.no_grad()
def test_fused_logits_equal_the_modules_own_matmuls(family_dir):
    """Every own family: q/k/v fused in every layer (Qwen2's and GLM's biases too; Qwen3 norms each head after
    the split), gate/up wherever the MLP is Llama's (GLM's is one gate_up_proj already); prefill and decode
    logits within TOLERANCE of the unfused decoder's, and transformers' forward over the views unchanged."""
    model_type, path = family_dir
    model = load(path)
    ids = _ids(model)
    before = model(ids).logits
    calls = _module_calls(model)
    unfused = step_logits(Decoder(model, fuse=False), model, ids)
    assert calls, "the unfused decoder calls each projection module"
    calls.clear()
    decoder = Decoder(model)
    assert all(f.qkv is not None and (f.gate_up is None) == (model_type == "glm") for f in decoder.fused)
    fused = step_logits(decoder, model, ids)
    assert not calls, f"fused projections must not run their modules' own matmuls: {sorted(set(calls))}"
    for step, (got, want) in enumerate(zip(fused, unfused, strict=True)):
        assert torch.allclose(got, want, atol=TOLERANCE, rtol=0), (step, (got - want).abs().max())
    assert torch.allclose(model(ids).logits, before, atol=TOLERANCE, rtol=0)  # the modules read the same values


def _storages(model: nn.Module, decoder: Decoder | None = None) -> dict[int, int]:
    """{storage address: bytes} of every tensor the model (and the decoder's fused matmuls) holds."""
    tensors = list(model.parameters()) + list(model.buffers())
    for fusion in decoder.fused if decoder else []:
        tensors += [t for f in (fusion.qkv, fusion.gate_up) if f is not None for t in f.matmul.state_dict().values()]
        tensors += [f.matmul.scb for f in (fusion.qkv, fusion.gate_up) if f is not None and hasattr(f.matmul, "scb")]
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def _inside(view: torch.Tensor, buffer: torch.Tensor) -> bool:
    start, end = buffer.data_ptr(), buffer.data_ptr() + buffer.numel() * buffer.element_size()
    return start <= view.data_ptr() and view.data_ptr() + view.numel() * view.element_size() <= end


def _int8_model(path) -> nn.Module:
    """The tiny model in bitsandbytes int8, swapped to the engine's int8 kernel layer (Triton's interpreter
    on the CPU), as the engine does at start."""
    from adapterd.server.kernels import use_int8_kernel
    from tests.helpers import _load_base

    model = _load_base(path, "int8", TEST_DEVICE)
    assert use_int8_kernel(model) > 0
    return model


def _interpreter(monkeypatch) -> None:
    pytest.importorskip("triton")
    if TEST_DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("quantization", ["none", "int8"])
@torch.no_grad()
def test_module_tensors_become_views_of_the_fused_ones_and_no_memory_is_added(quantization, qwen2_dir,
                                                                                  monkeypatch):
    """Qwen2 (biases on q, k, v): each projection's weight, bias (and int8 row scales) lie inside its fused
    tensor, at its own rows; the old tensors are freed, the model holds as many bytes as before, and on a GPU
    allocated memory does not grow. A second decoder over the same model reuses the fused memory."""
    if quantization == "int8":
        _interpreter(monkeypatch)
    model = _int8_model(qwen2_dir) if quantization == "int8" else load(qwen2_dir)
    attn = model.model.layers[0].self_attn
    old = [weakref.ref(getattr(m, name)) for m in (attn.q_proj, attn.k_proj, attn.v_proj) for name in ("weight",
                                                                                                        "bias")]
    held = sum(_storages(model).values())
    allocated = torch.cuda.memory_allocated() if TEST_DEVICE.startswith("cuda") else None
    decoder = Decoder(model)
    gc.collect()
    assert all(ref() is None for ref in old), "the projections' old tensors must be freed"
    assert sum(_storages(model, decoder).values()) == held
    if allocated is not None:
        assert torch.cuda.memory_allocated() <= allocated
    for layer, fusion in zip(model.model.layers, decoder.fused, strict=True):
        for parent, fused in ((layer.self_attn, fusion.qkv), (layer.mlp, fusion.gate_up)):
            assert fused.current(parent)
            start = 0
            for member in fused.members:
                rows = slice(start, start + member.out_features)
                assert member.weight.data.data_ptr() == fused.matmul.weight.data[rows].data_ptr()
                assert _inside(member.weight.data, fused.matmul.weight.data)
                for name in ("bias", "scb"):
                    tensor = getattr(member, name, None)
                    if tensor is not None:
                        assert tensor.data_ptr() == getattr(fused.matmul, name)[rows].data_ptr()
                start += member.out_features
    again = Decoder(model)
    assert again.fused[0].qkv.matmul.weight.data_ptr() == decoder.fused[0].qkv.matmul.weight.data_ptr()
    assert sum(_storages(model, again).values()) == held


@torch.no_grad()
def test_fused_int8_logits_equal_the_modules_own(tiny_model_dir, monkeypatch):
    """int8 (the engine's kernel layer; Triton's interpreter on the CPU): the row scales concatenate exactly,
    so the fused matmul gives the modules' logits (the kernel accumulates in fp32: TOLERANCE), in a prefill
    and two decode steps."""
    _interpreter(monkeypatch)
    model = _int8_model(tiny_model_dir)
    ids = _ids(model)[:, :PROMPT + 2]
    unfused = step_logits(Decoder(model, fuse=False), model, ids)
    decoder = Decoder(model)
    assert all(f.qkv is not None and f.gate_up is not None for f in decoder.fused)
    for step, (got, want) in enumerate(zip(step_logits(decoder, model, ids), unfused, strict=True)):
        assert torch.allclose(got, want, atol=TOLERANCE, rtol=0), (step, (got - want).abs().max())


@torch.no_grad()
def test_one_row_int8_silu_product_comes_from_the_fused_gate_up_epilogue(tiny_model_dir, monkeypatch):
    """int8, one row (a batch-1 decode step): each layer's MLP takes ``silu(gate) * up`` from the fused gate/up
    matmul's epilogue (``int8_epilogues.silu_glu``, once a layer a decode step; on the GPU only where the one-row
    key was tuned to GEMV tiles of one split), and the logits stay those of the unfused modules."""
    _interpreter(monkeypatch)
    from adapterd.server.kernels import int8_epilogues

    model = _int8_model(tiny_model_dir)
    ids = _ids(model)[:1, :PROMPT + 2]
    unfused = step_logits(Decoder(model, fuse=False), model, ids)
    calls: list[int] = []
    real = int8_epilogues.silu_glu
    monkeypatch.setattr(int8_epilogues, "silu_glu", lambda *a, **k: calls.append(1) or real(*a, **k))
    decoder = Decoder(model)
    step_logits(decoder, model, ids)  # on a GPU, the first one-row call of the fused shape tunes it
    gate_up = decoder.fused[0].gate_up.matmul
    x = torch.zeros(1, gate_up.in_features, device=TEST_DEVICE)
    takes = int8_epilogues.glu_fits(x, gate_up.weight.data, gate_up.scb, gate_up.bias)  # always, in the interpreter
    assert takes or TEST_DEVICE != "cpu"
    calls.clear()
    for step, (got, want) in enumerate(zip(step_logits(decoder, model, ids), unfused, strict=True)):
        assert torch.allclose(got, want, atol=10 * TOLERANCE, rtol=0), (step, (got - want).abs().max())
    assert len(calls) == 2 * model.config.num_hidden_layers * takes  # two decode steps; the prefill has 12 rows


@torch.no_grad()
def test_what_cannot_be_fused_keeps_its_modules(tiny_model_dir, qwen2_dir):
    """bitsandbytes layers that were not swapped (int8 without the kernel, nf4), projections that differ (one
    without the others' bias) and an MLP whose forward is not Llama's stay unfused; a projection replaced after
    fusing is called as the module it is now. Logits are transformers' in each case."""
    from tests.helpers import _load_base

    for quantization in ("int8", "nf4"):  # no swap: Linear8bitLt, Linear4bit everywhere
        bnb = _load_base(tiny_model_dir, quantization, TEST_DEVICE)
        assert Decoder(bnb).fused == [LayerFusion()] * bnb.config.num_hidden_layers, quantization

    model = load(qwen2_dir)
    model.model.layers[0].self_attn.v_proj.bias = None  # q and k keep theirs: no fused bias for the three
    mlp = model.model.layers[0].mlp

    class OtherMlp(type(mlp)):  # gate and up, but not Llama's math: the decoder must call its forward
        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))

    mlp.__class__ = OtherMlp
    decoder = Decoder(model)
    assert decoder.fused[0].qkv is None and decoder.fused[1].qkv is not None
    assert decoder.fused[0].gate_up is None and decoder.fused[1].gate_up is not None
    replaced = nn.Linear(model.config.hidden_size, model.config.intermediate_size, bias=False).to(TEST_DEVICE)
    model.model.layers[1].mlp.up_proj = replaced  # e.g. a later swap: the fusion no longer holds its weights
    ids = _ids(model)
    for t, got in enumerate(step_logits(decoder, model, ids), start=PROMPT):
        want = model(ids[:, :t]).logits[:, -1]
        assert torch.allclose(got, want, atol=DECODER_TOLERANCE, rtol=0), (t, (got - want).abs().max())


def test_the_engine_tunes_the_int8_kernel_for_the_fused_shapes(tiny_model_dir, monkeypatch):
    """The fused int8 matmuls' shapes ([q + k + v, in], [gate + up, in]) are in no module of the model, so the
    int8 warm-up of the swap does not see them: ``model_forward`` tunes the kernel for them before the engine
    captures any graph (autotuning inside a capture would fail)."""
    from types import SimpleNamespace

    from adapterd.server.engine.decoder import model_forward
    from adapterd.server.kernels import int8_linear

    _interpreter(monkeypatch)
    model = _int8_model(tiny_model_dir)
    tuned: list[tuple[int, int]] = []

    def warm_up(layers, dtype, max_rows):
        assert max_rows == 8  # the engine's batch size, as the swap's own warm-up
        tuned.extend((m.out_features, m.in_features) for m in layers)

    monkeypatch.setattr(int8_linear, "warm_up", warm_up)
    assert isinstance(model_forward(SimpleNamespace(model=model, dtype=torch.float32), own=True, max_rows=8), Decoder)
    config = model.config
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    assert set(tuned) == {(qkv, config.hidden_size), (2 * config.intermediate_size, config.hidden_size)}
    assert len(tuned) == 2 * config.num_hidden_layers
