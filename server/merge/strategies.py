"""Combination strategies for merging LoRA adapters into a new adapter, one small class each (LoRAX style).

Each reproduces PEFT's ``LoraModel.add_weighted_adapter`` (peft 0.21) for one ``combination_type``, on
adapter state dicts instead of an injected model:

- linear / ties / dare_linear / dare_ties combine the A factors and the B factors separately, each weighted
  by ``sqrt(|w * scaling|)`` (the sign goes on A only); all adapters must share one rank.
- cat stacks ``A * w * scaling`` and B along the rank; the new rank is the sum of the input ranks.
- svd sums the full deltas ``w * scaling * B @ A`` and keeps the top ``rank`` singular directions.

The new adapter has ``lora_alpha == r``, so its scaling is 1: the input scalings are folded into the factors.
PEFT's ``peft.utils.merge_utils`` functions are imported where used: importing peft costs seconds (it pulls
in transformers and bitsandbytes), which a merge into full weights never needs.

DARE draws its random masks from a private ``torch.Generator`` seeded by the request, never from the global
RNG that serving threads sample with; the draws are made in PEFT's order (modules in model order, A then B,
adapters in request order), so the same seed gives the same masks as ``torch.manual_seed(seed)`` + PEFT.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..adapters.peft_format import LoraModule
from ..errors import FailedPrecondition, InvalidArgument

Factors = tuple[torch.Tensor, torch.Tensor]  # (lora_A (r, in), lora_B (out, r))


@dataclass(frozen=True)
class CombineOptions:
    """Strategy parameters, already validated: density in (0, 1], method "total" or "frequency"."""

    density: float | None = None
    majority_sign_method: str = "total"
    generator: torch.Generator | None = None  # DARE only


class Strategy(ABC):
    """One combination type. ``new_rank`` applies PEFT's rank rule; ``combine`` merges one module."""

    name: ClassVar[str]
    needs_density: ClassVar[bool] = False
    uses_rng: ClassVar[bool] = False

    @abstractmethod
    def new_rank(self, ranks: list[int], requested: int) -> int:
        """The new adapter's rank from the inputs' PEFT ranks; ``requested`` 0 means the default."""

    @abstractmethod
    def combine(self, name: str, modules: list[LoraModule], weights: list[float], rank: int,
                opts: CombineOptions) -> Factors:
        """The new (A, B) of module ``name`` from the adapters that target it (in request order)."""


STRATEGIES: dict[str, Strategy] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: add one instance of the strategy to ``STRATEGIES`` under its name."""
    STRATEGIES[cls.name] = cls()
    return cls


def get_strategy(name: str) -> Strategy:
    """The registered strategy called ``name``; InvalidArgument (field ``strategy``) if there is none."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise InvalidArgument(f"unknown strategy {name!r}; one of {', '.join(STRATEGIES)}",
                              field="strategy") from None


def dare_prune(tensor: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """PEFT's ``prune(method="random", rescale=True)`` with an explicit generator: keep each entry with
    probability ``density`` and divide the kept ones by it. ``density >= 1`` keeps all and draws nothing."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


class _EqualRank(Strategy):
    """Strategies that combine A with A and B with B: every input must have the same rank."""

    def new_rank(self, ranks: list[int], requested: int) -> int:
        if len(set(ranks)) != 1:
            raise FailedPrecondition(
                f"strategy {self.name} needs adapters of one rank, got ranks {ranks}; use cat or svd to "
                "combine adapters of different ranks", field="adapters")
        if requested not in (0, ranks[0]):
            raise InvalidArgument(f"strategy {self.name} keeps the inputs' rank {ranks[0]}; rank must be 0 or "
                                  f"{ranks[0]}", field="rank")
        return ranks[0]

    def combine(self, name: str, modules: list[LoraModule], weights: list[float], rank: int,
                opts: CombineOptions) -> Factors:
        if len({m.rank for m in modules}) != 1:
            raise FailedPrecondition(f"{name}: the adapters' ranks differ there "
                                     f"({[m.rank for m in modules]}); use cat or svd", field="adapters")
        signed, unsigned = [], []
        for module, weight in zip(modules, weights, strict=True):
            ws = weight * module.scaling
            signed.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))
            unsigned.append(math.sqrt(abs(ws)))
        dtype = modules[0].a.dtype
        a = self.merge_factor([m.a for m in modules], torch.tensor(signed), opts)
        b = self.merge_factor([m.b for m in modules], torch.tensor(unsigned), opts)
        return a.to(dtype), b.to(dtype)

    @abstractmethod
    def merge_factor(self, tensors: list[torch.Tensor], weights: torch.Tensor,
                     opts: CombineOptions) -> torch.Tensor:
        """Merge one factor (all A's or all B's) of one module."""


@register
class Linear(_EqualRank):
    name = "linear"

    def merge_factor(self, tensors: list[torch.Tensor], weights: torch.Tensor,
                     opts: CombineOptions) -> torch.Tensor:
        from peft.utils.merge_utils import task_arithmetic

        return task_arithmetic(tensors, weights)


@register
class Ties(_EqualRank):
    name = "ties"
    needs_density = True

    def merge_factor(self, tensors: list[torch.Tensor], weights: torch.Tensor,
                     opts: CombineOptions) -> torch.Tensor:
        from peft.utils.merge_utils import ties

        assert opts.density is not None
        return ties(tensors, weights, opts.density, opts.majority_sign_method)  # type: ignore[arg-type]


@register
class DareLinear(_EqualRank):
    name = "dare_linear"
    needs_density = True
    uses_rng = True

    def merge_factor(self, tensors: list[torch.Tensor], weights: torch.Tensor,
                     opts: CombineOptions) -> torch.Tensor:
        from peft.utils.merge_utils import task_arithmetic

        assert opts.density is not None
        pruned = [dare_prune(t, opts.density, opts.generator) for t in tensors]
        return task_arithmetic(pruned, weights)


@register
class DareTies(_EqualRank):
    name = "dare_ties"
    needs_density = True
    uses_rng = True

    def merge_factor(self, tensors: list[torch.Tensor], weights: torch.Tensor,
                     opts: CombineOptions) -> torch.Tensor:
        from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge, reshape_weight_task_tensors

        assert opts.density is not None
        stacked = torch.stack([dare_prune(t, opts.density, opts.generator) for t in tensors], dim=0)
        mask = calculate_majority_sign_mask(stacked, method=opts.majority_sign_method)  # type: ignore[arg-type]
        weighted = stacked * reshape_weight_task_tensors(stacked, weights)
        return disjoint_merge(weighted, mask)


@register
class Cat(Strategy):
    name = "cat"

    def new_rank(self, ranks: list[int], requested: int) -> int:
        total = sum(ranks)
        if requested not in (0, total):
            raise InvalidArgument(f"cat makes an adapter of the summed rank {total}; rank must be 0 or {total}",
                                  field="rank")
        return total

    def combine(self, name: str, modules: list[LoraModule], weights: list[float], rank: int,
                opts: CombineOptions) -> Factors:
        """Stack the factors, then zero-pad to ``rank`` as PEFT does for modules some adapters skip."""
        dtype = modules[0].a.dtype
        a = torch.cat([m.a * w * m.scaling for m, w in zip(modules, weights, strict=True)], dim=0)
        b = torch.cat([m.b for m in modules], dim=1)
        out_a = torch.zeros(rank, a.shape[1], dtype=dtype)
        out_b = torch.zeros(b.shape[0], rank, dtype=dtype)
        out_a[: a.shape[0]] = a
        out_b[:, : b.shape[1]] = b
        return out_a, out_b


@register
class Svd(Strategy):
    name = "svd"

    def new_rank(self, ranks: list[int], requested: int) -> int:
        return requested or max(ranks)

    def combine(self, name: str, modules: list[LoraModule], weights: list[float], rank: int,
                opts: CombineOptions) -> Factors:
        """Truncated SVD of the weighted sum of deltas (fp32, shape (out, in)): A = Vh_r, B = U_r diag(S_r).

        PEFT calls ``torch.linalg.svd(full_matrices=True)``; the reduced SVD has the same leading
        singular triplets and, for a 4096 x 11008 delta, does not build an 11008 x 11008 matrix.
        """
        out_f, in_f = modules[0].b.shape[0], modules[0].a.shape[1]
        if rank > min(out_f, in_f):
            raise InvalidArgument(f"rank {rank} exceeds {name}'s smaller side {min(out_f, in_f)}",
                                  field="rank")
        from peft.utils.merge_utils import task_arithmetic

        deltas = [torch.mm(m.b.float(), m.a.float()) * m.scaling for m in modules]
        delta = task_arithmetic(deltas, torch.tensor(weights, dtype=torch.float32))
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        dtype = modules[0].a.dtype
        return vh[:rank].to(dtype).contiguous(), (u[:, :rank] @ torch.diag(s[:rank])).to(dtype).contiguous()


# proto enum MergeStrategy -> registry name; UNSPECIFIED (0) means linear for adapters.
PROTO_STRATEGY_NAMES: dict[int, str] = {0: "linear", 1: "linear", 2: "cat", 3: "svd", 4: "ties",
                                        5: "dare_linear", 6: "dare_ties"}


def strategy_name_from_proto(value: int) -> str:
    """Map ``adapterd.v1.MergeStrategy`` to a registry name; InvalidArgument for unknown values."""
    try:
        return PROTO_STRATEGY_NAMES[int(value)]
    except KeyError:
        raise InvalidArgument(f"unknown merge strategy {value}", field="strategy") from None
