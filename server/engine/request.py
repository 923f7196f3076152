"""What a generation request is to the engine, and what the engine says back about it.

Plain data, no gRPC: the RPC layer turns a GenerateRequest into ``GenerationParams`` (after validation) and
turns each ``GenerationEvent`` into a GenerateResponse.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class StopReason(enum.IntEnum):
    """Mirrors the proto's StopReason values."""

    NOT_FINISHED = 0
    MAX_TOKENS = 1
    EOS_TOKEN = 2
    STOP_SEQUENCE = 3
    TIME_LIMIT = 4
    CANCELLED = 5
    TOKEN_LIMIT = 6
    ERROR = 7


@dataclass(frozen=True)
class GenerationParams:
    """Validated sampling and stopping parameters of one request."""

    max_new_tokens: int
    min_new_tokens: int = 0
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off
    seed: int | None = None
    stop_sequences: tuple[str, ...] = ()
    include_stop_sequence: bool = False
    time_limit_s: float | None = None  # from admission to the engine

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenerationEvent:
    """One message for the request's own stream.

    ``kind`` is "start" (input_token_count known), "delta" (new text; running generated count) or "end"
    (stop reason set; text carries any last piece).
    """

    kind: str
    text: str = ""
    input_token_count: int = 0
    generated_token_count: int = 0
    stop_reason: StopReason = StopReason.NOT_FINISHED
    stop_sequence: str = ""
    seed: int = 0
    error: Exception | None = None
    # "delta": the new token's id; "end": every generated id (the EOS token is never counted).
    token_ids: list[int] = field(default_factory=list)

    def followed_by(self, later: GenerationEvent) -> GenerationEvent:
        """One delta event saying what this one and a ``later`` delta say."""
        return GenerationEvent("delta", text=self.text + later.text,
                               generated_token_count=later.generated_token_count,
                               token_ids=self.token_ids + later.token_ids)
