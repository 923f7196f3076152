"""The batched sampler against independent oracles: transformers' own logits processors, and distributions
computed here with plain torch. Synthetic logits, no model: each test runs in well under a second.
Runs on TEST_DEVICE (ADAPTERD_TEST_DEVICE=cuda on a GPU)."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from adapterd.server.engine import GenerationParams
from adapterd.server.engine.sampling import BatchSampler, RowSampler
from adapterd.server.engine.sampling_ops import filter_top_k_top_p
from tests.helpers import TEST_DEVICE

DEVICE = torch.device(TEST_DEVICE)
VOCAB = 32
EOS = 2


def make(params: list[GenerationParams], prompts: list[list[int]] | None = None, max_rows: int = 16,
         vocab: int = VOCAB) -> BatchSampler:
    sampler = BatchSampler(max_rows, vocab, {EOS}, DEVICE)
    sampler.place(0, [RowSampler(p, DEVICE) for p in params], prompts or [[0, 1]] * len(params))
    return sampler


def sampled(seed: int, **kwargs) -> GenerationParams:
    return GenerationParams(max_new_tokens=64, temperature=kwargs.pop("temperature", 1.0), seed=seed, **kwargs)


def random_logits(rows: int, seed: int = 0, vocab: int = VOCAB, scale: float = 2.0) -> torch.Tensor:
    return (torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE)


def frequencies(tokens: list[int], vocab: int = VOCAB) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).double() / len(tokens)


def draws(params: list[GenerationParams], row_logits: torch.Tensor, steps: int) -> list[int]:
    """Every token drawn by rows with ``params``, all given ``row_logits`` ([vocab]) at every step."""
    sampler = make(params, max_rows=len(params))
    tokens: list[int] = []
    for _ in range(steps):
        chosen, _ = sampler.sample(0, row_logits.expand(len(params), -1).clone())
        tokens += chosen
    return tokens


def test_top_k_draws_only_among_the_k_best_with_their_probabilities():
    logits = random_logits(1, seed=1)[0]
    tokens = draws([sampled(seed, temperature=1.5, top_k=5) for seed in range(256)], logits, 8)
    best = set(torch.topk(logits, 5).indices.tolist())
    assert set(tokens) <= best
    expected = torch.zeros(VOCAB, dtype=torch.float64)
    expected[list(best)] = torch.softmax(logits[list(best)].double().cpu() / 1.5, -1)
    # 2048 draws: the total variation from the true distribution is about 0.03 at most
    assert (frequencies(tokens) - expected).abs().sum() / 2 < 0.06


def test_top_p_draws_only_within_the_nucleus_with_its_probabilities():
    logits = random_logits(1, seed=2, scale=1.0)[0]
    probs = torch.softmax(logits.double().cpu() / 0.8, -1)
    ordered, order = probs.sort(descending=True)
    before = ordered.cumsum(0) - ordered  # mass of the tokens more likely than each
    nucleus = order[before < 0.8]  # the smallest set of most likely tokens holding at least 0.8
    assert 2 < len(nucleus) < VOCAB // 2
    tokens = draws([sampled(seed, temperature=0.8, top_p=0.8) for seed in range(256)], logits, 8)
    assert set(tokens) <= set(nucleus.tolist())
    expected = torch.zeros(VOCAB, dtype=torch.float64)
    expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
    assert (frequencies(tokens) - expected).abs().sum() / 2 < 0.06


def test_plain_temperature_draws_the_softmax_distribution():
    logits = random_logits(1, seed=3, scale=1.0)[0]
    tokens = draws([sampled(seed, temperature=1.0) for seed in range(256)], logits, 8)
    expected = torch.softmax(logits.double().cpu(), -1)
    assert (frequencies(tokens) - expected).abs().sum() / 2 < 0.08


# (top_k, top_p) per row. "sorted": a row without top-k orders the whole vocabulary (with a tie at the top of
# row 1); "candidates": every row has a top-k, so only the best max(k) of each row are ordered.
FILTERS = {"sorted": [(5, 0.9), (1, 0.5), (30, 1.0), (VOCAB, 0.3), (3, 0.99), (VOCAB, 1.0)],
           "candidates": [(5, 0.9), (2, 0.5), (30, 1.0), (12, 0.3), (3, 0.99), (31, 0.8)]}


@pytest.mark.parametrize("case", sorted(FILTERS))
def test_top_k_and_top_p_filters_equal_transformers_warpers_row_by_row(case):
    scores = random_logits(6, seed=4)
    if case == "sorted":
        scores[1, 3] = scores[1, 4] = scores[1].max() + 1  # a tie at the top
    scores[2, 5:] = float("-inf")
    ks, ps = zip(*FILTERS[case], strict=True)
    largest_k = max(ks) if case == "candidates" else None
    filtered = filter_top_k_top_p(scores, torch.tensor(ks, device=DEVICE), torch.tensor(ps, device=DEVICE),
                                  largest_k)
    for i, (k, p) in enumerate(FILTERS[case]):
        expected = TopKLogitsWarper(k)(None, scores[i:i + 1].clone())
        if p < 1.0:
            expected = TopPLogitsWarper(p)(None, expected)
        assert torch.equal(torch.isinf(filtered[i]), torch.isinf(expected[0])), i
        assert torch.equal(filtered[i][~torch.isinf(filtered[i])], expected[0][~torch.isinf(expected[0])]), i


def test_a_tiny_temperature_is_the_argmax():
    logits = random_logits(12, seed=5)
    for temperature in (1e-4, 1e-45):
        sampler = make([sampled(seed, temperature=temperature) for seed in range(12)])
        tokens, _ = sampler.sample(0, logits.clone())
        assert tokens == logits.argmax(-1).tolist()


def test_repetition_penalty_equals_transformers_processor_on_the_same_logits():
    penalties = [1.3, 0.5, 10.0, 0.01, 1.0, 2.0]
    prompts = [[0, 1, 5], [7, 7, 9], [3], list(range(0, VOCAB, 3)), [4, 6], [11, 12, 13, 14]]
    params = [GenerationParams(max_new_tokens=8, repetition_penalty=p) for p in penalties[:4]]
    params += [GenerationParams(max_new_tokens=8), sampled(3, temperature=0.9, repetition_penalty=2.0)]
    sampler = make(params, prompts)
    history = [list(p) for p in prompts]
    for step in range(4):
        logits = random_logits(len(params), seed=10 + step)
        scores = sampler.processed_scores(0, logits)
        for i, penalty in enumerate(penalties):
            oracle = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([history[i]], device=DEVICE),
                                                              logits[i:i + 1].clone())
            torch.testing.assert_close(scores[i:i + 1], oracle, rtol=1e-6, atol=1e-6)  # an fp32 ulp or two
        tokens, _ = sampler.sample(0, logits)
        for i, token in enumerate(tokens):
            history[i].append(token)


def test_eos_is_never_chosen_under_the_minimum_length():
    logits = torch.zeros(3, VOCAB, device=DEVICE)
    logits[:, EOS] = 50.0  # EOS is everyone's overwhelming favourite
    sampler = make([GenerationParams(max_new_tokens=8, min_new_tokens=3), sampled(1, min_new_tokens=3),
                    GenerationParams(max_new_tokens=8)])
    chosen = [sampler.sample(0, logits.clone())[0] for _ in range(4)]
    assert all(EOS not in step[:2] for step in chosen[:3])
    assert chosen[3][:2] == [EOS, EOS] and all(step[2] == EOS for step in chosen)


class Batch:
    """Drives a sampler as the engine does: rows join by a prefill sampled at their own positions (after the
    running rows), then every step samples all rows; rows leave by ``keep``. Each row is fed the logits the
    test gives for its own step count, and its tokens are recorded."""

    def __init__(self, logits_of) -> None:
        self.sampler = BatchSampler(8, VOCAB, {EOS}, DEVICE)
        self.logits_of = logits_of  # (row's params, its step) -> [vocab]
        self.tokens: dict[int, list[int]] = {}

    def _sample(self, first: int, rows: list[RowSampler]) -> None:
        logits = torch.stack([self.logits_of(r.params, len(self.tokens.setdefault(id(r), []))) for r in rows])
        for row, token in zip(rows, self.sampler.sample(first, logits)[0], strict=True):
            self.tokens[id(row)].append(token)

    def running(self) -> list[RowSampler]:
        return [r for r in self.sampler.rows if r is not None]

    def join(self, params: list[GenerationParams]) -> list[RowSampler]:
        rows, first = [RowSampler(p, DEVICE) for p in params], len(self.running())
        self.sampler.place(first, rows, [[1, 2, 3]] * len(rows))
        self._sample(first, rows)
        return rows

    def step(self) -> None:
        self._sample(0, self.running())

    def move_target_last(self, leaving: int) -> None:
        """``leaving`` rows other than the target leave; the others reverse their order, the target last."""
        running = self.running()
        target = next(i for i, r in enumerate(running) if r.params is TARGET)
        rest = [i for i in range(len(running)) if i != target]
        self.sampler.keep(rest[leaving:][::-1] + [target])

    def target_tokens(self) -> list[int]:
        return next(self.tokens[id(r)] for r in self.running() if r.params is TARGET)


TARGET = sampled(7, temperature=3.0, top_k=12, top_p=0.9, repetition_penalty=1.2)
OTHERS = [GenerationParams(max_new_tokens=8), sampled(1, temperature=0.05), sampled(2, top_p=0.5),
          GenerationParams(max_new_tokens=8, repetition_penalty=3.0), sampled(3, top_k=2, min_new_tokens=5),
          sampled(4, temperature=0.05, repetition_penalty=0.5), sampled(5)]


@pytest.mark.parametrize("target_joins", ["first", "later"])
def test_a_row_sampled_beside_others_draws_what_it_draws_alone(target_joins):
    """One seeded row draws the tokens it draws alone, whether it is in the first prefill or joins a running
    batch later (sampled at a position past 0), and as its position moves when rows leave; the others have
    other temperatures, filters, seeds, penalties and minimum lengths."""
    def logits_of(params, step):
        return random_logits(1, seed=(100 if params is TARGET else 200 + OTHERS.index(params)) + step)[0]

    alone = Batch(logits_of)
    alone.join([TARGET])
    for _ in range(7):
        alone.step()
    together = Batch(logits_of)
    early = [TARGET] if target_joins == "first" else []
    together.join(OTHERS[:3] + early)
    together.step()
    together.join(OTHERS[3:6] + ([] if early else [TARGET]))
    for leaving in (2, 1, 0):
        together.step()
        together.move_target_last(leaving)
    while len(together.target_tokens()) < 8:
        together.step()
    assert together.target_tokens() == alone.target_tokens()


def test_rows_sampled_past_position_0_use_their_own_parameters():
    """A prefill beside a running batch samples its rows at positions after the batch's: they choose with
    their own temperature, filters, penalty and seen tokens, as they would at position 0."""
    running = [GenerationParams(max_new_tokens=8), sampled(1, temperature=0.05),
               GenerationParams(max_new_tokens=8, repetition_penalty=5.0)]
    joining = [sampled(11, temperature=3.0, repetition_penalty=1.5),
               GenerationParams(max_new_tokens=8, repetition_penalty=0.3), sampled(12, temperature=2.0, top_k=3)]
    prompts = [[7, 8], [9], [10, 11]]

    def tokens(sampler: BatchSampler, first: int) -> list[list[int]]:
        sampler.place(first, [RowSampler(p, DEVICE) for p in joining], prompts)
        return [sampler.sample(first, random_logits(3, seed=300 + t))[0] for t in range(12)]

    beside = make(running, [list(range(6))] * 3)
    assert tokens(beside, 3) == tokens(BatchSampler(16, VOCAB, {EOS}, DEVICE), 0)


def test_extreme_values_in_one_row_change_no_other_row():
    """NaN, inf and all -inf logits, with temperatures of 1e-45 to 100 and penalties of 1e-45 to 10, in one
    row: it still gets a token in range, nothing raises, and the rows beside it choose what they choose alone."""
    extreme = [sampled(1, temperature=1e-45, repetition_penalty=1e-45), sampled(2, temperature=100.0, top_p=1e-30),
               GenerationParams(max_new_tokens=8, repetition_penalty=1e-45),
               sampled(3, temperature=1e-2, repetition_penalty=0.01), sampled(4, repetition_penalty=10.0, top_k=2)]
    bad_logits = [torch.full((VOCAB,), float("nan")), torch.full((VOCAB,), float("-inf")),
                  torch.where(torch.arange(VOCAB) % 2 == 0, float("inf"), 1.0), torch.linspace(-3e38, 3e38, VOCAB)]
    neighbours = [GenerationParams(max_new_tokens=8), sampled(9, top_k=8), sampled(10, repetition_penalty=1.5)]
    logits = random_logits(3, seed=6)
    alone = [[make([p]).sample(0, logits[i:i + 1].clone())[0][0] for i, p in enumerate(neighbours)]]
    for params in extreme:
        for bad in bad_logits:
            sampler = make([neighbours[0], params, *neighbours[1:]])
            tokens, finite = sampler.sample(0, torch.cat([logits[:1], bad[None].to(DEVICE), logits[1:]]))
            assert 0 <= tokens[1] < VOCAB
            assert [tokens[0], *tokens[2:]] == alone[0]
            assert finite == [True, bool(torch.isfinite(bad).all()), True, True]


def test_one_step_fetches_the_batch_tokens_once(monkeypatch):
    """No host sync per row: a step of 8 rows of every kind converts tensors to Python exactly once."""
    sampler = make([GenerationParams(max_new_tokens=8), sampled(1), sampled(2, top_k=4), sampled(3, top_p=0.7),
                    GenerationParams(max_new_tokens=8, repetition_penalty=1.3), sampled(4, min_new_tokens=3),
                    sampled(5, temperature=0.3, top_k=3, top_p=0.9, repetition_penalty=0.8),
                    GenerationParams(max_new_tokens=8, min_new_tokens=2)])
    logits = random_logits(8, seed=7)
    conversions: list[str] = []

    def counted(name):
        real = getattr(torch.Tensor, name)

        def convert(self, *args, **kwargs):
            conversions.append(name)
            return real(self, *args, **kwargs)
        return convert

    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    sampler.sample(0, logits)
    monkeypatch.undo()
    assert conversions == ["tolist"]


@pytest.mark.gpu
def test_choosing_the_tokens_never_syncs_with_the_host():
    sampler = BatchSampler(8, VOCAB, {EOS}, torch.device("cuda"))
    params = [GenerationParams(max_new_tokens=8), sampled(1, top_k=4, top_p=0.7, repetition_penalty=1.3),
              sampled(2, min_new_tokens=3)]
    sampler.place(0, [RowSampler(p, torch.device("cuda")) for p in params], [[1, 2]] * 3)
    logits = torch.randn(3, VOCAB, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sampler.choose(0, logits)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_greedy_rows_take_the_steps_greedy_picks_and_launch_nothing(monkeypatch):
    """``launch(..., greedy)``: where every row is greedy without a penalty, the step's own picks (``greedy_pick``
    with ``eos_bans``, as the decode step computes them) are the tokens and finite flags, the same as the
    sampler's own choice, with no op of the sampler's run (no argmax, no check), a minimum length included. One
    row with a penalty or sampling and the sampler chooses as before, from the logits."""
    from adapterd.server.engine.sampling_ops import greedy_pick

    logits = random_logits(3, seed=9)
    logits[1, 5] = float("nan")
    logits[2, EOS] = 99.0  # the third row's favourite is EOS: banned under its minimum length
    eos = torch.tensor([EOS], device=DEVICE)
    for rows in ([GenerationParams(max_new_tokens=8)] * 3,
                 [GenerationParams(max_new_tokens=8)] * 2 + [GenerationParams(max_new_tokens=8, min_new_tokens=2)]):
        want = make(rows).sample(0, logits.clone())
        sampler = make(rows)
        bans = sampler.eos_bans(0, 3)
        assert bans == [0, 0, int(rows[2].min_new_tokens > 0)]
        picks = greedy_pick(logits, torch.tensor(bans, device=DEVICE), eos)
        monkeypatch.setattr(sampler, "choose", lambda *a: pytest.fail("chose again"))
        monkeypatch.setattr(torch, "isfinite", lambda *a: pytest.fail("checked again"))
        got = sampler.launch(0, logits, picks)
        monkeypatch.undo()
        assert got.result() == want and want[1] == [True, False, True]
        assert torch.equal(got.tokens, picks[:, 0]) and (want[0][2] == EOS) == (not bans[2])
        assert [r.chosen for r in sampler.rows[:3]] == [1, 1, 1]
    plain = GenerationParams(max_new_tokens=8)
    for odd in (GenerationParams(max_new_tokens=8, repetition_penalty=1.3), sampled(4)):
        rows = [plain, odd, plain]
        mixed = make(rows)
        expected = make(rows).sample(0, logits.clone())
        assert mixed.launch(0, logits.clone(), greedy_pick(logits)).result() == expected
        assert [r.chosen for r in mixed.rows[:3]] == [1, 1, 1]  # chosen by the sampler: counted


def test_eos_bans_follow_each_rows_count_of_chosen_tokens():
    """A row is banned from EOS until it has ``min_new_tokens`` tokens, counted at each launch (before the
    device has them: the engine launches a step ahead), whichever path chose them: the step's pick or the
    sampler's own, in a batch or row by row."""
    sampler = make([GenerationParams(max_new_tokens=8, min_new_tokens=2), GenerationParams(max_new_tokens=8),
                    GenerationParams(max_new_tokens=8, min_new_tokens=3, repetition_penalty=1.2)])
    logits = random_logits(3, seed=2)
    assert sampler.eos_bans(0, 3) == [1, 0, 1] and sampler.eos_bans(1, 4) == [0, 1, 0, 0]
    sampler.sample(0, logits)  # the sampler's path (a penalty)
    assert sampler.eos_bans(0, 3) == [1, 0, 1]
    sampler._one_by_one(0, logits)  # a batch retried row by row counts each row once
    assert sampler.eos_bans(0, 3) == [0, 0, 1]
    sampler.keep([2, 0])  # rows move with their counts
    assert sampler.eos_bans(0, 2) == [1, 0]
    sampler.sample(0, logits[:2])
    assert sampler.eos_bans(0, 2) == [0, 0]
