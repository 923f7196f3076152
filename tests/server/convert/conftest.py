"""A tiny ChatGLM3 checkpoint (safetensors, two shards) and its conversion, shared by the module's tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.server.convert.chatglm3_fixture import Tiny, random_weights, write_checkpoint


@dataclass(frozen=True)
class Converted:
    tiny: Tiny
    weights: dict[str, torch.Tensor]
    src: Path
    dst: Path


@pytest.fixture(scope="session")
def chatglm3(tmp_path_factory) -> Converted:
    from adapterd.server.convert.chatglm3 import convert_chatglm3

    work = tmp_path_factory.mktemp("chatglm3")
    tiny = Tiny()
    src = write_checkpoint(work / "chatglm3-tiny", tiny, {})  # the tokenizer first: it sizes the vocabulary
    weights = random_weights(tiny)
    write_checkpoint(src, tiny, weights)
    convert_chatglm3(src, work / "glm")
    return Converted(tiny, weights, src, work / "glm")
