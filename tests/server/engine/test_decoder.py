"""The engine's own decoder forward (``server/engine/decoder.py``) against transformers' forward of the same
model, for every family it runs: the last position's logits of a prompt, then of each decode step after it,
through a plain cache; transformers builds its own causal and sliding-window masks from the whole sequence,
so the only things shared are the weights. Token-level parity with PEFT through the engine, both paths, is
``test_architectures.py``'s."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from adapterd.common.tiny_model import build_tiny_model
from adapterd.server.architecture import check_config
from adapterd.server.engine.decoder import OWN_FAMILIES, Decoder, model_forward
from adapterd.server.engine.kv_pool import causal_mask
from adapterd.server.engine.step_context import StepContext, step_context
from tests.helpers import TEST_DEVICE
from tests.server.engine.test_architectures import FAMILIES

OWN = [name for name, (model_type, _) in FAMILIES.items() if model_type in OWN_FAMILIES]
TOLERANCE = 1e-4  # fp32 logits: the same ops in another order (fused attention against transformers' sdpa)


def test_every_family_the_decoder_runs_is_in_the_parity_matrix():
    assert {FAMILIES[name][0] for name in OWN} == set(OWN_FAMILIES)


@pytest.fixture(scope="module", params=OWN)
def model(request, tmp_path_factory):
    model_type, fields = FAMILIES[request.param]
    path = build_tiny_model(tmp_path_factory.mktemp(request.param) / "m", model_type=model_type, **fields)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


PROMPT, LENGTH = 12, 20  # prompt tokens, then one token a decode step up to LENGTH: past every sliding window


def step_logits(decoder: Decoder, model, ids: torch.Tensor) -> list[torch.Tensor]:
    """The decoder's last-position logits for a prefill of ``ids``' first PROMPT tokens, then for each decode
    step after it (one token a step, each seeing every earlier one within a window), through a plain cache."""
    layout = check_config(model.config)
    rows, cache = ids.shape[0], DynamicCache()
    live = torch.ones(rows, PROMPT, dtype=torch.bool, device=ids.device)
    mask = layout.masks(lambda window: causal_mask(live, PROMPT, torch.float32, window))
    positions = torch.arange(PROMPT, device=ids.device)[None].expand(rows, -1)
    logits = [decoder.forward(ids[:, :PROMPT], positions, mask, cache)]
    for t in range(PROMPT, ids.shape[1]):
        live = torch.ones(rows, t + 1, dtype=torch.bool, device=ids.device)
        mask = layout.masks(lambda window, live=live: causal_mask(live, 1, torch.float32, window))
        logits.append(decoder.forward(ids[:, t:t + 1], torch.full((rows, 1), t, device=ids.device), mask, cache))
    return logits


@torch.no_grad()
def test_prefill_and_decode_logits_equal_transformers(model):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, LENGTH), generator=generator)
    for t, got in enumerate(step_logits(Decoder(model), model, ids), start=PROMPT):
        want = model(ids[:, :t]).logits[:, -1]
        assert torch.allclose(got, want, atol=TOLERANCE, rtol=0), (t, (got - want).abs().max())


def test_model_forward_picks_ours_only_where_it_is_asked_for_and_known(model, tmp_path):
    def ours(model, own):
        return isinstance(model_forward(SimpleNamespace(model=model, cache_kwarg="cache"), own), Decoder)

    assert ours(model, True) and not ours(model, False)
    gemma = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "g", model_type="gemma",
                                                                  **FAMILIES["gemma"][1]))
    assert not ours(gemma, True)  # scaled embeddings: not a family the decoder runs


# (targets, the shrinks a layer makes: their group sizes in call order)
LORA_TARGETS = {
    "q-k-v-o": (("q_proj", "k_proj", "v_proj", "o_proj"), [3, 1]),  # q, k, v as one group; o alone
    # q alone (its delta added to its part of the fused q/k/v output), then gate and up as one group (each delta
    # added to its part of the fused gate/up output), then down; GLM has no gate_proj / up_proj: q and down only
    "q-mlp": (("q_proj", "gate_proj", "up_proj", "down_proj"), [1, 2, 1]),
}


@pytest.mark.parametrize("targets", list(LORA_TARGETS))
@torch.no_grad()
def test_lora_deltas_through_the_fused_projections_give_transformers_logits(model, targets, monkeypatch):
    """LoRA on q, k and v (and o, alone), or on q and the MLP's three, for two adapters of different ranks,
    plus a base row: the own decoder takes the base outputs from its fused matmuls and adds each wrapped
    layer's delta (q, k, v through their group: one shrink a layer for the three; gate and up likewise),
    transformers' forward calls
    each layer; the logits agree."""
    import adapterd.server.adapters.lora as lora
    from adapterd.server.adapters.lora_slots import LoraSlotTable
    from adapterd.server.adapters.lora_weights import LoraModule, LoraWeights

    model = copy.deepcopy(model)  # the fixture's model is shared: wrap a copy
    layout = check_config(model.config)
    target_names, groups = LORA_TARGETS[targets]
    names = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in target_names
             and isinstance(m, torch.nn.Linear)]
    generator = torch.Generator().manual_seed(1)

    def adapter(rank: int, scaling: float) -> LoraWeights:
        shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if n in names}
        modules = {n: LoraModule(torch.randn(rank, i, generator=generator) * 0.1,
                                 torch.randn(o, rank, generator=generator) * 0.1, scaling)
                   for n, (i, o) in shapes.items()}
        return LoraWeights(modules=modules, rank=rank, target_modules=sorted({n.rsplit(".", 1)[1] for n in names}))

    table = LoraSlotTable(model, num_slots=3, max_rank=8, dtype=torch.float32, device=torch.device("cpu"),
                          use_kernel=False)
    slots = [table.acquire("a", adapter(4, 2.0)), 0, table.acquire("b", adapter(8, 0.5))]
    shrinks: list[int] = []
    real = lora.shrink
    monkeypatch.setattr(lora, "shrink", lambda a, x, rows: shrinks.append(a.shape[0]) or real(a, x, rows))
    ids = torch.randint(3, model.config.vocab_size, (3, 10), generator=generator)
    live = torch.ones(3, 10, dtype=torch.bool)
    mask = layout.masks(lambda window: causal_mask(live, 10, torch.float32, window))
    positions = torch.arange(10)[None].expand(3, -1)
    with step_context(StepContext("prefill", table.rows_of(slots, "prefill"))):
        got = Decoder(model).forward(ids, positions, mask, DynamicCache())
        layers = model.config.num_hidden_layers
        gated = any(n.endswith("gate_proj") for n in names)
        assert shrinks == (groups if gated or targets != "q-mlp" else [1] * (len(names) // layers)) * layers
        want = model(ids).logits[:, -1]
    table.release(slots[0]), table.release(slots[2])
    assert torch.allclose(got, want, atol=TOLERANCE, rtol=0), (got - want).abs().max()
    with step_context(StepContext("prefill")):
        base = model(ids).logits[:, -1]
    assert not torch.allclose(got[0], base[0], atol=1e-2) and torch.allclose(got[1], base[1], atol=TOLERANCE)


@torch.no_grad()
def test_one_row_float_matmuls_go_through_the_gemv_kernel(model, monkeypatch):
    """A bf16 model, one row, the kernels on (Triton's interpreter here): the fused q/k/v and gate/up matmuls,
    o_proj, down_proj (where the decoder calls it) and lm_head run through ``dense_gemv`` at every step, and the
    logits stay within bf16 noise of the same decoder with the kernel off (``F.linear``)."""
    pytest.importorskip("triton")
    if model.config.model_type not in ("llama", "qwen2", "glm"):  # both MLP forms, biases on q/k/v (Qwen2)
        pytest.skip("the same wiring as Llama's; the interpreter is slow")
    from adapterd.server.kernels import dense_gemv, dense_splitk

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # The GEMV alone against F.linear: the prefill's few rows would take the split-K kernel in the "on" run only
    # (test_dense_splitk.py and test_lora_group.py judge that path)
    monkeypatch.setattr(dense_splitk, "IN_DECODE", False)
    half = copy.deepcopy(model).to(torch.bfloat16)
    ids = torch.randint(3, half.config.vocab_size, (1, LENGTH), generator=torch.Generator().manual_seed(2))
    decoder = Decoder(half)
    assert decoder.gemv
    shapes: list[tuple[int, int]] = []
    real = dense_gemv.gemv
    monkeypatch.setattr(dense_gemv, "gemv", lambda x, w, b=None, config=None: shapes.append(tuple(w.shape))
                        or real(x, w, b, config))
    got = step_logits(decoder, half, ids)
    decoder.gemv = False
    calls = len(shapes)
    want = step_logits(decoder, half, ids)
    assert len(shapes) == calls  # off: none
    steps, layers = LENGTH - PROMPT, half.config.num_hidden_layers  # decode steps: one row (the prefill: lm_head)
    attn = half.model.layers[0].self_attn
    must = {tuple(attn.o_proj.weight.shape), tuple(half.lm_head.weight.shape),
            tuple(decoder.fused[0].qkv.matmul.weight.shape)}
    assert must <= set(shapes) and calls >= steps * (2 * layers + 1), (set(shapes), calls)
    for t, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.allclose(a.float(), b.float(), atol=0.05, rtol=0.02), (t, (a.float() - b.float()).abs().max())


@torch.no_grad()
def test_one_row_silu_product_runs_in_the_gate_up_epilogue_unless_lora_adds_to_gate_or_up(model, monkeypatch):
    """A bf16 Llama, one row, the kernels on (Triton's interpreter): each decode step's MLP takes ``silu(gate) *
    up`` from the fused gate/up GEMV's epilogue (``dense_gemv.silu_glu``, once a layer), and the logits are those
    of the same decoder with the epilogue off (the GEMV, then ``silu_mul``), bit for bit. A one-row step whose
    LoRA rows add to gate and up keeps the two steps (the deltas go in before the SiLU) and gives transformers'
    logits; the same wrapped model in a step without LoRA rows takes the epilogue again."""
    pytest.importorskip("triton")
    if model.config.model_type != "llama":
        pytest.skip("Llama's MLP is the one fused (Mistral's and Qwen's are the same forward); the interpreter is slow")
    from adapterd.server.adapters.lora_slots import LoraSlotTable
    from adapterd.server.adapters.lora_weights import LoraModule, LoraWeights
    from adapterd.server.engine.fused_projections import FusedLinear
    from adapterd.server.kernels import dense_gemv

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    half = copy.deepcopy(model).to(torch.bfloat16)
    ids = torch.randint(3, half.config.vocab_size, (1, LENGTH), generator=torch.Generator().manual_seed(3))
    decoder = Decoder(half)
    calls: list[tuple[int, int]] = []
    real = dense_gemv.silu_glu
    monkeypatch.setattr(dense_gemv, "silu_glu", lambda x, w, b=None, config=None: calls.append(tuple(w.shape))
                        or real(x, w, b, config))
    got = step_logits(decoder, half, ids)
    layers, steps = half.config.num_hidden_layers, LENGTH - PROMPT
    assert calls == [tuple(decoder.fused[0].gate_up.matmul.weight.shape)] * (layers * steps)
    with monkeypatch.context() as off:
        off.setattr(FusedLinear, "silu_glu", lambda self, x, gemv=False: None)
        want = step_logits(decoder, half, ids)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)

    names = [n for n, m in half.named_modules() if n.rsplit(".", 1)[-1] in ("gate_proj", "up_proj")]
    generator = torch.Generator().manual_seed(4)
    modules = {n: LoraModule((torch.randn(4, m.in_features, generator=generator) * 0.1).to(torch.bfloat16),
                             (torch.randn(m.out_features, 4, generator=generator) * 0.1).to(torch.bfloat16), 2.0)
               for n, m in half.named_modules() if n in names}
    table = LoraSlotTable(half, num_slots=2, max_rank=4, dtype=torch.bfloat16, device=torch.device("cpu"),
                          use_kernel=False)
    slot = table.acquire("mlp", LoraWeights(modules=modules, rank=4, target_modules=["gate_proj", "up_proj"]))
    token, position = ids[:, :1], torch.zeros(1, 1, dtype=torch.long)
    mask = causal_mask(torch.ones(1, 1, dtype=torch.bool), 1, torch.bfloat16, None)
    calls.clear()
    with step_context(StepContext("decode", table.rows_of([slot], "decode"))):
        adapted = Decoder(half).forward(token, position, mask, DynamicCache())
        reference = half(token).logits[:, -1]
    assert calls == []
    assert torch.allclose(adapted.float(), reference.float(), atol=0.05, rtol=0.02)
    with step_context(StepContext("decode")):
        base = Decoder(half).forward(token, position, mask, DynamicCache())
    assert len(calls) == layers and not torch.allclose(base.float(), adapted.float(), atol=1e-2)


def _pool_steps(decoder: Decoder, model, ids: torch.Tensor, context: StepContext | None = None):
    """One row decoded a token a step from an empty pool through ``DecodeView`` (the engine's decode path: the
    rotary kernels run there): each step's logits, and the pool's storage after the last."""
    from adapterd.server.engine.kv_pool import DecodeView, KvPool, decode_mask

    config, dtype = model.config, model.dtype
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    pool = KvPool(config.num_hidden_layers, config.num_key_value_heads, head_dim, dtype, ids.device,
                  max_rows=1, max_capacity=ids.shape[1], rows=1, capacity=ids.shape[1])
    logits = []
    for t in range(ids.shape[1]):
        write_pos = torch.tensor([t], device=ids.device)
        mask = decode_mask(write_pos, t + 1, dtype)
        with step_context(context or StepContext("decode")):
            logits.append(decoder.forward(ids[:, t:t + 1], write_pos[:, None], mask, DecodeView(pool, 1, t + 1,
                                                                                                  write_pos)))
    return logits, pool.storage.clone()


def _int8_weight_only(model):
    """``model`` with every projection of its layers swapped for the engine's int8 weight-only layer (absmax
    per row, as bitsandbytes quantizes; the activations stay in the model's dtype)."""
    from adapterd.server.kernels.int8_linear import Int8WeightOnlyLinear

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    w = child.weight.detach().float()
                    scb = w.abs().amax(dim=1).clamp_min(1e-8)
                    cb = torch.round(w / scb[:, None] * 127).to(torch.int8)
                    setattr(parent, name, Int8WeightOnlyLinear(cb, scb, child.bias))
    return model


@torch.no_grad()
def test_one_row_qkv_projection_rotates_and_appends_in_its_epilogue_unless_lora_adds_to_q_k_or_v(model, monkeypatch):
    """A bf16 Llama on int8 weights, one row, the kernels on (Triton's interpreter), decode steps through the
    pool: each layer's fused q/k/v GEMV rotates q and k and appends k and v in its epilogue
    (``int8_epilogues.rope_append``, once a layer a step), and the logits and every pool entry are those of the
    same decoder with the epilogue off (the GEMV with the same tiles, then ``kernels/rope_append.py``), bit for
    bit. A step whose LoRA rows add to q and v keeps the two steps (the deltas go in before the rotation) and
    matches the eager decoder (transformers' rotation, the pool's writes) within bf16's roundings."""
    pytest.importorskip("triton")
    if model.config.model_type != "llama":
        pytest.skip("one family is enough for the epilogue's wiring (the interpreter is slow); the GPU suite runs all")
    if TEST_DEVICE != "cpu":  # the GPU runs the compiled kernels: tests/server/kernels/test_rope_epilogue.py
        pytest.skip("the wiring is checked in Triton's interpreter, on CPU tensors")
    from adapterd.server.adapters.lora_slots import LoraSlotTable
    from adapterd.server.adapters.lora_weights import LoraModule, LoraWeights
    from adapterd.server.engine.fused_projections import FusedLinear
    from adapterd.server.kernels import int8_epilogues, int8_matmul

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # the plain one-row matmul on the epilogue's tiles, so that on and off differ only by the epilogue
    tiles = {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 1}  # few programs: the interpreter is slow
    monkeypatch.setattr(int8_epilogues, "_INTERPRET_TILES", tiles)
    monkeypatch.setattr(int8_matmul, "_INTERPRET_SMALL", tiles)
    half = _int8_weight_only(copy.deepcopy(model).to(torch.bfloat16))
    ids = torch.randint(3, half.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(5))
    decoder = Decoder(half)
    assert decoder.rope_kernel
    calls: list[tuple[int, ...]] = []
    real = int8_epilogues.rope_append
    monkeypatch.setattr(int8_epilogues, "rope_append",
                        lambda x, cb, *a, **k: calls.append(tuple(cb.shape)) or real(x, cb, *a, **k))
    got, got_pool = _pool_steps(decoder, half, ids)
    assert calls == [tuple(decoder.fused[0].qkv.matmul.weight.shape)] * (half.config.num_hidden_layers * ids.shape[1])
    with monkeypatch.context() as off:
        off.setattr(FusedLinear, "rope_append", lambda *a, **k: None)
        want, want_pool = _pool_steps(decoder, half, ids)
    assert torch.equal(got_pool, want_pool) and got_pool.abs().sum() > 0
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)

    generator = torch.Generator().manual_seed(6)
    modules = {n: LoraModule((torch.randn(4, m.in_features, generator=generator) * 0.1).to(torch.bfloat16),
                             (torch.randn(m.out_features, 4, generator=generator) * 0.1).to(torch.bfloat16), 2.0)
               for n, m in half.named_modules() if n.rsplit(".", 1)[-1] in ("q_proj", "v_proj")}
    table = LoraSlotTable(half, num_slots=2, max_rank=4, dtype=torch.bfloat16, device=torch.device("cpu"),
                          use_kernel=False)
    slot = table.acquire("qv", LoraWeights(modules=modules, rank=4, target_modules=["q_proj", "v_proj"]))
    calls.clear()
    context = StepContext("decode", table.rows_of([slot], "decode"))
    adapted, _ = _pool_steps(Decoder(half), half, ids[:, :3], context)
    eager, _ = _pool_steps(Decoder(half, rope_kernel=False), half, ids[:, :3], context)
    assert calls == []
    base, _ = _pool_steps(Decoder(half), half, ids[:, :3])
    assert len(calls) == half.config.num_hidden_layers * 3  # the base rows' steps only
    for a, b, c in zip(adapted, eager, base, strict=True):  # kernels against eager: a few bf16 roundings apart,
        # while the adapter moves the logits ten times as far
        assert (a.float() - b.float()).abs().max() < 0.1 * (a.float() - c.float()).abs().max()


def test_gemv_weights_judge_the_gate_up_with_its_silu_epilogue(model, monkeypatch):
    """The GEMV's warm-up judges a fused gate/up with the SiLU product a one-row step folds into it (where the
    kernels run and the MLP's activation is a SiLU), every other weight alone; without the kernels, none."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the kernels "run" on CPU tensors: their switches are on
    half = copy.deepcopy(model).to(torch.bfloat16)
    decoder = Decoder(half)
    gate_ups = {id(f.gate_up.matmul.weight) for f in decoder.fused if f.gate_up is not None}
    weights = decoder.gemv_weights()
    assert [glu for w, _, glu in weights if id(w) in gate_ups] == [True] * len(gate_ups)
    assert not any(glu for w, _, glu in weights if id(w) not in gate_ups)
    assert len(gate_ups) == (half.config.num_hidden_layers if half.config.model_type != "glm" else 0)
    assert not any(glu for _, _, glu in Decoder(half, rope_kernel=False).gemv_weights())


@torch.no_grad()
@pytest.mark.parametrize("fused", [False, True])
def test_a_pending_lora_delta_is_added_before_the_residual_add_whichever_norm(fused, monkeypatch):
    """``_add_norm`` with o_proj's or down_proj's pending LoRA delta (``OutputDelta``): the fused norm's kernel adds
    it (Triton's interpreter here), any other norm gets it from the expand's own launch first; either way the
    residual stream is ``h + (out + delta)`` and the norm is of that, rows on slot 0 without a delta."""
    pytest.importorskip("triton")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from adapterd.server.engine import decoder
    from adapterd.server.kernels.lora_bgmv import LoraPartials
    from adapterd.server.kernels.rms_norm import FusedRMSNorm, OutputDelta

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(3)
    norm = LlamaRMSNorm(64)
    norm.weight.normal_(1.0, 0.1, generator=g)
    if fused:
        norm = FusedRMSNorm.from_module(norm)
    h, out = torch.randn(3, 1, 64, generator=g), torch.randn(3, 1, 64, generator=g)
    lora_b = torch.randn(16, 3, 64, generator=g)
    lora_b[:, 0] = 0
    p = torch.randn(1, 4, 3, 16, generator=g)
    slots = torch.tensor([2, 0, 1])
    delta = OutputDelta(LoraPartials(p, slots, 5), lora_b)
    want_out = out.clone()
    for i, slot in enumerate(slots.tolist()):
        if slot:
            want_out[i] += p[0, :, i, :5].sum(0) @ lora_b[:5, slot]
    summed, normed = decoder._add_norm(h, out.clone(), norm, delta)
    torch.testing.assert_close(summed, h + want_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(summed[1], h[1] + out[1])  # the base row
    torch.testing.assert_close(normed, norm(summed), rtol=1e-5, atol=1e-6)
