"""q, k and v as one LoRA group (``LoraGroup``, ``project_qkv``): one shrink for the three projections of an
attention's input, each row still getting exactly its own adapter's delta on exactly the modules it targets.
The decode kernel's grouped launch is tested in tests/server/kernels/test_lora_bgmv.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adapterd.server.adapters.lora as lora
from adapterd.server.adapters.lora import project_qkv
from adapterd.server.adapters.lora_slots import LoraSlotTable
from adapterd.server.adapters.lora_weights import LoraModule, LoraWeights
from adapterd.server.engine.step_context import StepContext, step_context

IN, OUT = 12, {"q_proj": 10, "k_proj": 4, "v_proj": 4}  # grouped key/value heads: k and v narrower than q


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for name, out in OUT.items():
            self.add_module(name, nn.Linear(IN, out))


def attention_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.add_module("attn", Attention())
    return model


def adapter(ranks: dict[str, int], scalings: dict[str, float], seed: int) -> LoraWeights:
    """LoRA on the modules of ``ranks`` (a rank each, as rank_pattern gives; a scaling each, as alpha_pattern
    and rsLoRA give)."""
    g = torch.Generator().manual_seed(seed)
    modules = {f"attn.{n}": LoraModule(a=torch.randn(r, IN, generator=g), b=torch.randn(OUT[n], r, generator=g),
                                       scaling=scalings[n]) for n, r in ranks.items()}
    return LoraWeights(modules=modules, rank=max(ranks.values()), target_modules=list(modules))


QV = adapter({"q_proj": 8, "v_proj": 2}, {"q_proj": 2.0, "v_proj": 0.5}, 1)  # q and v only, ranks differ
ALL = adapter({"q_proj": 4, "k_proj": 4, "v_proj": 4}, {"q_proj": 1.0, "k_proj": 3.0, "v_proj": 1.0}, 2)
K = adapter({"k_proj": 16}, {"k_proj": 0.25}, 3)  # k only, the largest rank


def expected(model: nn.Module, row_adapters: list[LoraWeights | None], x: torch.Tensor) -> list[torch.Tensor]:
    """q, k, v by hand: the base layers' outputs plus, for each row, its adapter's ``scaling * x A^T B^T`` on
    the modules that adapter targets."""
    outs = []
    for name in OUT:
        layer = getattr(model.attn, name)
        y = getattr(layer, "base_layer", layer)(x).clone()
        for i, weights in enumerate(row_adapters):
            m = weights.modules.get(f"attn.{name}") if weights else None
            if m is not None:
                y[i] += (x[i] @ m.a.T @ m.b.T) * m.scaling
        outs.append(y)
    return outs


def run(model: nn.Module, table: LoraSlotTable, slots: list[int], x: torch.Tensor, phase: str = "prefill"):
    with step_context(StepContext(phase, table.rows_of(slots, phase))):
        return project_qkv(model.attn, x)


def separately(model: nn.Module, table: LoraSlotTable, slots: list[int], x: torch.Tensor, phase: str = "prefill"):
    """Each projection's own forward, as transformers' path calls them."""
    with step_context(StepContext(phase, table.rows_of(slots, phase))):
        return [getattr(model.attn, name)(x) for name in OUT]


# 4 slots for 4 rows: the dense path; 20 slots: the gathered one
@pytest.mark.parametrize("num_slots", [3, 19])
@pytest.mark.parametrize("shape", [(4, 5, IN), (4, 1, IN)])  # a prefill's rows, a decode step's
def test_rows_get_their_own_adapter_on_the_modules_it_targets(num_slots, shape):
    model = attention_model()
    table = LoraSlotTable(model, num_slots=num_slots, max_rank=16, dtype=torch.float32, device=torch.device("cpu"),
                          use_kernel=False)
    slots = [table.acquire("qv", QV), table.acquire("all", ALL), 0, table.acquire("k", K)]
    group = model.attn.q_proj.group
    assert group is not None and group.members == (model.attn.q_proj, model.attn.k_proj, model.attn.v_proj)
    assert group.lora_a.shape == (3, 16, num_slots + 1, IN)
    x = torch.randn(*shape)
    with torch.no_grad():
        got = run(model, table, slots, x)
        want = expected(model, [QV, ALL, None, K], x)
        alone = separately(model, table, slots, x)
    for name, g, w, a in zip(OUT, got, want, alone, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(g, a, rtol=1e-6, atol=1e-6, msg=name)  # as each layer gives alone
        assert torch.equal(g[2], getattr(model.attn, name).base_layer(x)[2])  # the base row: exactly the base


def test_a_module_no_adapter_targets_stays_out_of_the_group():
    """Adapters on q and v only: k is not wrapped (no zeros read for it), its output is the base's exactly;
    an adapter on k later joins it to the group, and what earlier adapters wrote into their slots stays."""
    model = attention_model()
    table = LoraSlotTable(model, num_slots=4, max_rank=16, dtype=torch.float32, device=torch.device("cpu"),
                          use_kernel=False)
    qv = table.acquire("qv", QV)
    group = model.attn.q_proj.group
    assert group.members == (model.attn.q_proj, model.attn.v_proj)
    assert isinstance(model.attn.k_proj, nn.Linear) and group.lora_a.shape[0] == 2
    x = torch.randn(2, 3, IN)
    with torch.no_grad():
        got = run(model, table, [qv, 0], x)
        for g, w in zip(got, expected(model, [QV, None], x), strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        assert torch.equal(got[1], model.attn.k_proj(x))
        wraps = table.wraps
        k = table.acquire("k", K)
        assert table.wraps == wraps + 1  # the model changed: graphs captured before must go
        regrouped = model.attn.q_proj.group
        assert regrouped is not group and regrouped.members == (model.attn.q_proj, model.attn.k_proj,
                                                                model.attn.v_proj)
        assert model.attn.v_proj.lora_a.data_ptr() == regrouped.lora_a[2].data_ptr()  # a view: one copy of A
        got = run(model, table, [qv, k], x)
        for g, w in zip(got, expected(model, [QV, K], x), strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_one_shrink_for_the_three_and_an_evicted_slot_is_zeros(monkeypatch):
    model = attention_model()
    table = LoraSlotTable(model, num_slots=2, max_rank=16, dtype=torch.float32, device=torch.device("cpu"),
                          use_kernel=False)
    s = table.acquire("all", ALL)
    shrinks = []
    real = lora.shrink
    monkeypatch.setattr(lora, "shrink", lambda a, x, rows: shrinks.append(a.shape[0]) or real(a, x, rows))
    x = torch.randn(2, 1, IN)
    with torch.no_grad():
        run(model, table, [s, s], x)
        assert shrinks == [3]  # one shrink, over the three tables
        separately(model, table, [s, s], x)
        assert shrinks == [3, 1, 1, 1]  # transformers' path: one a projection
        table.release(s)
        assert table.evict("all")
        assert not model.attn.q_proj.group.lora_a[:, :, s].any()  # the freed slot holds nothing


def test_engine_decode_steps_launch_one_group_kernel_a_layer_and_keep_pefts_tokens(tiny_model_dir, adapter_root,
                                                                                   monkeypatch):
    """The engine's own decoder with the BGMV kernels (Triton's interpreter on the CPU, compiled on a GPU):
    q, k and v of every layer go to one grouped launch in each decode step, for adapters on q and v (a group
    of two), on every linear (three), on q and o (rsLoRA: q alone, no group), and gate and up to another (every
    linear), mixed with base and prefix rows in one batch; every row's greedy tokens equal PEFT's for it alone.
    Every shrink launch goes through the decoder's ``beside`` with its layer's base matmul (``engine/side_stream.py``:
    after it, or on a second stream where switched on). The float matmuls stay cuBLAS's (``dense_splitk`` off,
    whatever a GPU run switches on: its shrinks in their launches are the next test's)."""
    pytest.importorskip("triton")
    from adapterd.server.engine import EngineConfig, GenerationParams, decoder
    from adapterd.server.kernels import dense_splitk, lora_bgmv
    from adapterd.server.model import load_base_model
    from adapterd.server.runtime import Runtime
    from tests.helpers import TEST_DEVICE, reference_greedy
    from tests.server.engine.test_parity import run_together

    if TEST_DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dense_splitk, "IN_DECODE", False)
    members, expands = [], []  # the members of each shrink launch; the outputs of each expand launch
    real, real_expand = lora_bgmv.lora_shrink, lora_bgmv.lora_expand_  # looked up at each call
    monkeypatch.setattr(lora_bgmv, "lora_shrink", lambda x, a, *r: members.append(a.shape[0]) or real(x, a, *r))
    monkeypatch.setattr(lora_bgmv, "lora_expand_", lambda ys, *a: expands.append(len(ys)) or real_expand(ys, *a))
    beside_shrinks = []  # for each call of the decoder's beside: the shrinks its side call launched

    def beside(x, side, main, real_beside=decoder.beside):
        launched = len(members)
        got = real_beside(x, side, main)
        beside_shrinks.append(len(members) - launched)
        return got

    monkeypatch.setattr(decoder, "beside", beside)
    jobs = [("hello world", "lora-qv"), ("hello world", None), ("你是谁？", "team/lora-all"),
            ("你是谁？", "lora-rs"), ("hello world", "prefix")]
    refs = [reference_greedy(tiny_model_dir, p, adapter_root / a if a else None, 5) for p, a in jobs]
    base = load_base_model(tiny_model_dir, "none", TEST_DEVICE, "float32")
    runtime = Runtime(base, adapter_root, EngineConfig(max_batch_size=8, fused_kernels=True, cuda_graphs=False))
    try:
        results = run_together(runtime, jobs, GenerationParams(max_new_tokens=5))
    finally:
        runtime.close()
    assert [events[-1].token_ids for events in results] == refs
    # q, k, v grouped (lora-all wrapped k too; lora-rs's q rides in the group), and gate and up (lora-all); down_proj
    # is a group of one (lora_delta_)
    assert set(members) == {1, 2, 3}
    assert members.count(3) and members.count(3) % base.num_layers == 0  # one grouped launch a layer a decode step
    # a layer: the q/k/v shrink, the gate/up shrink, down's alone, and o_proj's alone where SDPA attends (grouped
    # heads at more rows than the kernel takes on a GPU); otherwise o_proj's shrink is the attention's merge's
    from adapterd.server.kernels.decode_attention import faster_than_sdpa

    config = base.model.config
    group = config.num_attention_heads // config.num_key_value_heads
    alone = 1 if faster_than_sdpa(len(jobs), group, base.device) else 2
    assert members.count(3) == members.count(2) and members.count(1) == alone * members.count(3)
    # q, k and v's deltas added by the rotary kernel, gate and up's by the SiLU product's, o_proj's and down_proj's
    # by the add + norms after them (no expand of their own): the one expand left a step is the last layer's
    # down_proj (the final norm takes no delta)
    assert expands and set(expands) == {1} and len(expands) == members.count(3) // base.num_layers
    # each shrink was launched by the side call of a beside, one a call
    assert set(beside_shrinks) == {0, 1} and sum(beside_shrinks) == len(members)


def _count_shrinks(monkeypatch, int8: bool) -> tuple[list[int], list[int]]:
    """Two lists the engine's steps then fill: the members of each LoRA shrink run as extra programs of a split-K
    matmul's launch (an int8 weight's, or with ``int8`` False a float weight's), and of each launched alone."""
    from adapterd.server.kernels import int8_shrink, lora_bgmv

    in_matmul, alone = [], []
    real_in_matmul, real_alone = int8_shrink.matmul_and_shrink, lora_bgmv.lora_shrink

    def matmul_and_shrink(x, w, scb, bias, lora_a, *rest):
        done = real_in_matmul(x, w, scb, bias, lora_a, *rest)
        if done is not None and (scb is not None) == int8:
            in_matmul.append(lora_a.shape[0])
        return done

    monkeypatch.setattr(int8_shrink, "matmul_and_shrink", matmul_and_shrink)
    monkeypatch.setattr(lora_bgmv, "lora_shrink", lambda x, a, *r: alone.append(a.shape[0]) or real_alone(x, a, *r))
    return in_matmul, alone


# Rows served together: adapters on q and v, on every linear, on q and o (rsLoRA), a base row and a prefix row
MIXED_JOBS = [("hello world", "lora-qv"), ("hello world", None), ("你是谁？", "team/lora-all"), ("你是谁？", "lora-rs"),
              ("hello world", "prefix")]


def _serve_jobs_against_peft(tiny_model_dir, adapter_root, quantization: str, monkeypatch):
    """``MIXED_JOBS`` served together by the engine over the tiny base (``quantization``; fp32 activations; Triton's
    interpreter on the CPU), 4 greedy tokens each: asserts that every row's tokens equal PEFT's for it alone over
    the same base, and returns the base."""
    from adapterd.server.engine import EngineConfig, GenerationParams
    from adapterd.server.model import load_base_model
    from adapterd.server.runtime import Runtime
    from tests.helpers import TEST_DEVICE, reference_greedy
    from tests.server.engine.test_parity import run_together

    if TEST_DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    refs = [reference_greedy(tiny_model_dir, prompt, adapter_root / a if a else None, 4, quantization)
            for prompt, a in MIXED_JOBS]
    base = load_base_model(tiny_model_dir, quantization, TEST_DEVICE, "float32")
    runtime = Runtime(base, adapter_root, EngineConfig(max_batch_size=8, fused_kernels=True, cuda_graphs=False))
    assert quantization != "int8" or runtime.engine.runner.int8_kernel_layers > 0
    try:
        results = run_together(runtime, MIXED_JOBS, GenerationParams(max_new_tokens=4))
    finally:
        runtime.close()
    assert [events[-1].token_ids for events in results] == refs
    return base


@pytest.mark.parametrize("attention", ["kernel", "sdpa"])  # sdpa: no merge to take o_proj's shrink (a GPU at 4 rows)
def test_int8_decode_steps_run_each_shrink_in_its_matmuls_launch_and_keep_pefts_tokens(attention, tiny_model_dir,
                                                                                       adapter_root, monkeypatch):
    """An int8 base (the engine's int8 kernel layer; Triton's interpreter on the CPU) with ``int8_shrink.IN_MATMUL``
    on: at each decode step every layer's q/k/v, gate/up and down_proj shrinks run as extra programs of their int8
    matmul's launch (``kernels/int8_shrink.py``), none in a launch of its own (o_proj's is the attention merge's, or
    o_proj's matmul's where SDPA attends), and every row's greedy tokens equal PEFT's for it alone over the same
    int8 layers, adapters on q and v, on every linear, on q and o, mixed with base and prefix rows."""
    pytest.importorskip("triton")
    from adapterd.server.adapters import lora_folds
    from adapterd.server.kernels import decode_attention, int8_shrink
    from tests.helpers import TEST_DEVICE

    monkeypatch.setattr(int8_shrink, "IN_MATMUL", True)
    monkeypatch.setattr(lora_folds, "O_PROJ_IN_MATMUL", False)  # o_proj's in the merge (the float test runs both)
    if attention == "sdpa":
        monkeypatch.setattr(decode_attention, "faster_than_sdpa", lambda *_: False)
    in_matmul, alone = _count_shrinks(monkeypatch, int8=True)
    base = _serve_jobs_against_peft(tiny_model_dir, adapter_root, "int8", monkeypatch)
    # a layer a decode step: q/k/v's (three members), gate/up's (two) and down_proj's (one) in their matmuls
    layers, config = base.num_layers, base.model.config
    steps = in_matmul.count(3) // layers
    merge = decode_attention.faster_than_sdpa(len(MIXED_JOBS), config.num_attention_heads // config.num_key_value_heads,
                                              base.device)
    assert merge == (attention == "kernel") or TEST_DEVICE != "cpu"  # the CPU runs both ways
    assert steps >= 3 and in_matmul.count(3) == in_matmul.count(2) == steps * layers
    # down_proj's; and o_proj's where SDPA attends (no merge to take it: the GPU at these 4 rows)
    assert in_matmul.count(1) == (1 if merge else 2) * steps * layers
    assert alone == []  # no shrink in a launch of its own


@pytest.mark.parametrize("o_proj_in_matmul", [False, True], ids=["o-shrink-in-merge", "o-shrink-in-matmul"])
def test_float_decode_steps_through_the_split_k_kernel_shrink_in_its_launch_and_keep_pefts_tokens(
        o_proj_in_matmul, tiny_model_dir, adapter_root, monkeypatch):
    """A float base with ``dense_splitk.IN_DECODE`` and ``int8_shrink.IN_MATMUL`` on (Triton's interpreter on the
    CPU): at each decode step of two rows or more every layer's q/k/v, gate/up and down_proj matmuls run through
    the split-K kernel with their LoRA shrinks as extra programs of its launch (``kernels/dense_splitk.py``), none
    in a launch of its own; o_proj's shrink is the attention merge's, or with ``lora_folds.O_PROJ_IN_MATMUL`` (or
    where SDPA attends) its own matmul's launch's too. Every row's greedy tokens equal PEFT's for it alone,
    adapters on q and v, on every linear, on q and o, mixed with base and prefix rows."""
    pytest.importorskip("triton")
    from adapterd.server.adapters import lora_folds
    from adapterd.server.kernels import dense_splitk, int8_shrink
    from adapterd.server.kernels.decode_attention import faster_than_sdpa
    from tests.helpers import TEST_DEVICE

    monkeypatch.setattr(dense_splitk, "IN_DECODE", True)
    monkeypatch.setattr(int8_shrink, "IN_MATMUL", True)
    monkeypatch.setattr(lora_folds, "O_PROJ_IN_MATMUL", o_proj_in_matmul)
    in_matmul, alone = _count_shrinks(monkeypatch, int8=False)
    plain, real_linear = [], dense_splitk.splitk_linear  # (tokens a row, weight shape) of each call with no shrink
    monkeypatch.setattr(dense_splitk, "splitk_linear",
                        lambda x, w, *r: plain.append((x.shape[1], tuple(w.shape))) or real_linear(x, w, *r))
    base = _serve_jobs_against_peft(tiny_model_dir, adapter_root, "none", monkeypatch)
    layers, config = base.num_layers, base.model.config
    steps = in_matmul.count(3) // layers  # a layer a step: q/k/v's (three members) and gate/up's (two)
    merge = not o_proj_in_matmul and faster_than_sdpa(
        len(MIXED_JOBS), config.num_attention_heads // config.num_key_value_heads, base.device)
    assert steps >= 3 and in_matmul.count(3) == in_matmul.count(2) == steps * layers
    assert in_matmul.count(1) == (1 if merge else 2) * steps * layers  # down_proj's, and o_proj's unless the merge's
    assert alone == []  # no shrink in a launch of its own
    # with no shrink to host, the kernel ran (in the interpreter; on a GPU where the bucket was tuned and timed no
    # slower than cuBLAS) at the prefill (10 tokens: 2-64 rows of x too), for lm_head, and at decode steps for
    # o_proj alone where the merge took its shrink
    o_proj = (config.hidden_size, config.num_attention_heads * config.head_dim)
    lm_head = tuple(base.model.lm_head.weight.shape)
    decode = [shape for tokens, shape in plain if tokens == 1]
    if TEST_DEVICE == "cpu":
        # lm_head: at every decode step and the prefill (one token a row there too: the last)
        assert decode.count(o_proj) == (steps * layers if merge else 0) and decode.count(lm_head) == steps + 1
        assert any(tokens > 1 for tokens, _ in plain)
    assert set(decode) <= {o_proj, lm_head}


@pytest.mark.parametrize("quantization", ["int8", "none"])
def test_o_projs_expand_in_its_matmuls_launch_keeps_pefts_tokens(quantization, tiny_model_dir, adapter_root,
                                                                 monkeypatch):
    """With ``int8_expand.IN_MATMUL`` and ``FLOAT_IN_MATMUL`` on (and a float base's matmuls through the split-K
    kernel, as ``dense_splitk.IN_DECODE`` sends them): at each decode step every layer's o_proj, its shrink done in the
    attention merge, computes its LoRA delta's sums as extra programs of its own matmul's launch, and the
    post-attention add + norm adds those sums (``OutputDelta.done``) instead of folding the delta itself; every
    row's greedy tokens equal PEFT's for it alone over the same base (int8 layers, or fp32), adapters on q and v,
    on every linear, on q and o, mixed with base and prefix rows."""
    pytest.importorskip("triton")
    from adapterd.server.kernels import decode_attention, dense_splitk, int8_expand, int8_shrink, rms_norm

    monkeypatch.setattr(int8_expand, "IN_MATMUL", True)
    monkeypatch.setattr(int8_expand, "FLOAT_IN_MATMUL", True)
    monkeypatch.setattr(dense_splitk, "IN_DECODE", True)
    monkeypatch.setattr(int8_shrink, "IN_MATMUL", True)
    monkeypatch.setattr(decode_attention, "faster_than_sdpa", lambda *_: True)  # the merge takes o_proj's shrink
    expands, done_norms = [], []
    real_expand, real_norm = int8_expand.matmul_and_expand, rms_norm.fused_add_rms_norm

    def matmul_and_expand(x, w, scb, *rest):
        result = real_expand(x, w, scb, *rest)
        expands.append((result is not None, scb is not None))
        return result

    monkeypatch.setattr(int8_expand, "matmul_and_expand", matmul_and_expand)
    monkeypatch.setattr(rms_norm, "fused_add_rms_norm", lambda x, r, w, eps, delta=None: (
        done_norms.append(delta.done is not None) if delta is not None else None) or real_norm(x, r, w, eps, delta))
    base = _serve_jobs_against_peft(tiny_model_dir, adapter_root, quantization, monkeypatch)
    steps = len(expands) // base.num_layers
    assert steps >= 3 and len(expands) == steps * base.num_layers  # o_proj's, a layer a decode step
    assert set(expands) == {(True, quantization == "int8")}  # each in its matmul's launch, the int8 kernel's or not
    assert done_norms.count(True) == len(expands)  # and each post-attention norm added those sums


@pytest.mark.parametrize("decode", ["exact", "bucketed"])  # bucketed: padding rows (slot 0) and a rank bucket
def test_engine_decode_steps_add_o_and_down_projs_deltas_in_the_norm_after_them_and_keep_pefts_tokens(
        decode, tiny_model_dir, adapter_root, monkeypatch):
    """At decode steps of ``NORM_FOLD_MIN_ROWS`` rows or more (set to 1 here, whatever the default),
    o_proj's LoRA delta goes to the post-attention add + norm kernel (``rms_norm.OutputDelta``) and down_proj's to
    the next layer's input add + norm, instead of the expands' own launches: every such norm takes one at each
    decode step, and every row's greedy tokens still equal PEFT's for it alone, adapters on o_proj (lora-rs,
    lora-all) and down_proj (lora-all) mixed with ones without them, base and prefix rows."""
    pytest.importorskip("triton")
    from adapterd.server.engine import EngineConfig, GenerationParams, decoder
    from adapterd.server.kernels import rms_norm
    from adapterd.server.model import load_base_model
    from adapterd.server.runtime import Runtime
    from tests.helpers import TEST_DEVICE, reference_greedy
    from tests.server.engine.test_parity import run_together

    if TEST_DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(decoder, "NORM_FOLD_MIN_ROWS", 1)
    folded = []  # the rows of each add + norm launch that took a delta
    real = rms_norm.fused_add_rms_norm
    monkeypatch.setattr(rms_norm, "fused_add_rms_norm", lambda x, r, w, eps, delta=None: (
        folded.append(r.shape[0]) if delta is not None else None) or real(x, r, w, eps, delta))
    jobs = [("hello world", "lora-rs"), ("hello world", None), ("你是谁？", "team/lora-all"),
            ("你是谁？", "lora-qv"), ("hello world", "prefix")]
    new = 5
    refs = [reference_greedy(tiny_model_dir, p, adapter_root / a if a else None, new) for p, a in jobs]
    base = load_base_model(tiny_model_dir, "none", TEST_DEVICE, "float32")
    runtime = Runtime(base, adapter_root, EngineConfig(max_batch_size=8, fused_kernels=True, cuda_graphs=False))
    runtime.engine.runner.decoder.bucketed = runtime.engine.runner.prefiller.bucketed = decode == "bucketed"
    try:
        results = run_together(runtime, jobs, GenerationParams(max_new_tokens=new))
    finally:
        runtime.close()
    assert [events[-1].token_ids for events in results] == refs
    # at every decode step: each layer's post-attention norm (o_proj's delta) and each next layer's input norm
    # (down_proj's: lora-all targets it; the last layer's is added by the expand's own launch)
    per_step = 2 * base.num_layers - 1
    assert folded and len(folded) % per_step == 0 and len(folded) // per_step >= (new - 1) // 2


@pytest.mark.parametrize("use_kernel", [False, True])
def test_base_outputs_given_as_one_fused_output_get_the_same_deltas(use_kernel, monkeypatch):
    """The own decoder's fused q/k/v matmul (engine/fused_projections.py) hands ``project_qkv`` the three base
    outputs as column slices of one output: each gets its own rows' deltas (grouped members and a member
    alone), as the layers give alone. The decode kernel (Triton's interpreter here) adds them in place into
    the slices, strided rows and all, without a copy."""
    if use_kernel:
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = attention_model()
    table = LoraSlotTable(model, num_slots=3, max_rank=16, dtype=torch.float32, device=torch.device("cpu"),
                          use_kernel=use_kernel)
    slots = [table.acquire("qv", QV), 0, table.acquire("k", K)]  # k wrapped too: one group of three
    x = torch.randn(3, 1, IN)  # a decode step
    with torch.no_grad():
        fused = torch.cat([getattr(model.attn, n).base_layer(x) for n in OUT], dim=-1)  # [3, 1, q + k + v]
        base = list(fused.split(list(OUT.values()), dim=-1))
        with step_context(StepContext("decode", table.rows_of(slots, "decode"))):
            got = project_qkv(model.attn, x, base)
        alone = separately(model, table, slots, x, "decode")
        want = expected(model, [QV, None, K], x)
    for name, g, a, w, b in zip(OUT, got, alone, want, base, strict=True):
        torch.testing.assert_close(g, a, rtol=1e-6, atol=1e-6, msg=name)
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)
        assert (g.data_ptr() == b.data_ptr()) == use_kernel, name  # the kernel: in place, in the fused output
