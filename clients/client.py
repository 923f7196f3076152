"""Python clients for adapterd: blocking (``AdapterdClient``) and asyncio (``AsyncAdapterdClient``).

Only grpcio and the generated stubs: importing this never imports torch.

    with AdapterdClient("localhost:50051") as client:
        print(client.generate("Hello", adapter_id="support/v2", max_new_tokens=32).text)
        for piece in client.generate_stream("Hello"):
            print(piece.text, end="", flush=True)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any
from urllib.parse import quote

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..v1 import adapterd_pb2 as pb
from ..v1 import adapterd_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:50051"

# Routing metadata for a balancer in front of several daemons (deploy/SCALING.md): Envoy hashes this header
# onto its ring, so that one adapter's requests reach one replica, where its weights are already resident.
# The daemon itself ignores it; the request body's adapter_id is what it serves.
ADAPTER_ID_HEADER = "x-adapter-id"


Messages = Sequence["pb.ChatMessage | dict[str, str]"]


def chat_messages(messages: Messages) -> list[pb.ChatMessage]:
    """``[{"role": "user", "content": "Hi"}, ...]`` (or ChatMessages) as the request's messages."""
    return [m if isinstance(m, pb.ChatMessage) else pb.ChatMessage(role=m["role"], content=m["content"])
            for m in messages]


def generate_request(prompt: str = "", adapter_id: str = "", *, messages: Messages = (), max_new_tokens: int = 0,
                     min_new_tokens: int = 0, temperature: float = 0.0, top_k: int = 0, top_p: float = 0.0,
                     seed: int | None = None, repetition_penalty: float = 0.0, stop_sequences: Sequence[str] = (),
                     include_stop_sequence: bool = False, time_limit_ms: int = 0,
                     truncate_input_tokens: int = 0, prompt_token_ids: Sequence[int] = ()) -> pb.GenerateRequest:
    """A GenerateRequest from keyword arguments; 0 means the server's default (greedy, no filters). One of
    ``prompt`` (sent as is), ``messages`` (rendered with the adapter's chat template by the daemon) and
    ``prompt_token_ids`` (the base's token ids, no special tokens added)."""
    sampling = pb.SamplingParameters(temperature=temperature, top_k=top_k, top_p=top_p,
                                     repetition_penalty=repetition_penalty)
    if seed is not None:
        sampling.seed = seed
    stopping = pb.StoppingCriteria(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                   stop_sequences=list(stop_sequences), include_stop_sequence=include_stop_sequence,
                                   time_limit_ms=time_limit_ms)
    return pb.GenerateRequest(prompt=prompt, adapter_id=adapter_id, sampling=sampling, stopping=stopping,
                              truncate_input_tokens=truncate_input_tokens, messages=chat_messages(messages),
                              prompt_token_ids=list(prompt_token_ids))


def tokenize_request(text: str = "", return_tokens: bool = False, messages: Messages = (),
                     adapter_id: str = "") -> pb.TokenizeRequest:
    return pb.TokenizeRequest(text=text, return_tokens=return_tokens, messages=chat_messages(messages),
                              adapter_id=adapter_id)


def adapter_id_header(adapter_id: str) -> list[tuple[str, str]]:
    """``[("x-adapter-id", id)]`` for an adapter, nothing for the base. gRPC metadata values must be printable
    ASCII, and an id is a path that may hold any character: it is percent-encoded (RFC 3986, ``/`` kept), so
    plain ASCII ids travel unchanged and every client of a balancer hashes the same id to the same key."""
    return [(ADAPTER_ID_HEADER, quote(adapter_id, safe="/"))] if adapter_id else []


class _Base:
    def __init__(self, target: str, token: str | None, credentials: grpc.ChannelCredentials | None,
                 metadata: Sequence[tuple[str, str]], timeout: float | None) -> None:
        self.target = target
        self.timeout = timeout
        self.credentials = credentials
        self.metadata = list(metadata) + ([("authorization", f"Bearer {token}")] if token else [])

    def _kw(self, adapter_id: str = "") -> dict:
        """Each call's metadata (token, the caller's own, the adapter's routing header) and deadline."""
        return {"metadata": self.metadata + adapter_id_header(adapter_id), "timeout": self.timeout}


class AdapterdClient(_Base):
    """Blocking client. ``timeout`` (seconds) becomes each call's deadline; ``options``: gRPC channel options
    (e.g. ``("grpc.use_local_subchannel_pool", 1)`` for a connection of its own, not shared with other
    clients of the same target in this process)."""

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None, metadata: Sequence[tuple[str, str]] = (),
                 timeout: float | None = None, options: Sequence[tuple[str, Any]] = ()) -> None:
        super().__init__(target, token, credentials, metadata, timeout)
        self.channel = (grpc.secure_channel(target, credentials, options) if credentials
                        else grpc.insecure_channel(target, options))
        self.stub = pb_grpc.AdapterdStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> AdapterdClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the daemon's health check says SERVING (the model is loaded)."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            try:
                status = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"adapterd at {self.target} not serving after {timeout} s")
            time.sleep(0.1)

    def generate(self, prompt: str = "", adapter_id: str = "", **params) -> pb.GenerateResponse:
        return self.stub.Generate(generate_request(prompt, adapter_id, **params), **self._kw(adapter_id))

    def generate_stream(self, prompt: str = "", adapter_id: str = "", **params) -> Iterator[pb.GenerateResponse]:
        return self.stub.GenerateStream(generate_request(prompt, adapter_id, **params), **self._kw(adapter_id))

    def chat(self, messages: Messages, adapter_id: str = "", **params) -> pb.GenerateResponse:
        """The assistant's answer to ``messages`` (``[{"role": "user", "content": "Hi"}]``)."""
        return self.generate("", adapter_id, messages=messages, **params)

    def chat_stream(self, messages: Messages, adapter_id: str = "", **params) -> Iterator[pb.GenerateResponse]:
        return self.generate_stream("", adapter_id, messages=messages, **params)

    def tokenize(self, text: str = "", return_tokens: bool = False, messages: Messages = (),
                 adapter_id: str = "") -> pb.TokenizeResponse:
        return self.stub.Tokenize(tokenize_request(text, return_tokens, messages, adapter_id),
                                 **self._kw(adapter_id))

    def list_adapters(self) -> list[pb.AdapterInfo]:
        return list(self.stub.ListAdapters(pb.ListAdaptersRequest(), **self._kw()).adapters)

    def load_adapter(self, adapter_id: str) -> pb.AdapterInfo:
        return self.stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id=adapter_id), **self._kw(adapter_id))

    def unload_adapter(self, adapter_id: str) -> pb.AdapterInfo:
        return self.stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id=adapter_id), **self._kw(adapter_id))

    def model_info(self) -> pb.ModelInfoResponse:
        return self.stub.ModelInfo(pb.ModelInfoRequest(), **self._kw())

    def merge(self, request: pb.MergeAdapterRequest) -> Iterator[pb.MergeProgress]:
        return self.stub.MergeAdapter(request, **self._kw())

    def start_training(self, request: pb.StartTrainingRequest) -> pb.TrainingRun:
        return self.stub.StartTraining(request, **self._kw())

    def stop_training(self, run_id: str) -> pb.TrainingRun:
        return self.stub.StopTraining(pb.StopTrainingRequest(run_id=run_id), **self._kw())

    def train_status(self, run_id: str = "") -> list[pb.TrainingRun]:
        return list(self.stub.TrainStatus(pb.TrainStatusRequest(run_id=run_id), **self._kw()).runs)

    def watch_training(self, run_id: str = "") -> Iterator[pb.TrainStatusResponse]:
        return self.stub.WatchTraining(pb.TrainStatusRequest(run_id=run_id), metadata=self.metadata)


class AsyncAdapterdClient(_Base):
    """asyncio client over ``grpc.aio``; use inside a running event loop."""

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None, metadata: Sequence[tuple[str, str]] = (),
                 timeout: float | None = None, options: Sequence[tuple[str, Any]] = ()) -> None:
        super().__init__(target, token, credentials, metadata, timeout)
        self.channel = (grpc.aio.secure_channel(target, credentials, options) if credentials
                        else grpc.aio.insecure_channel(target, options))
        self.stub = pb_grpc.AdapterdStub(self.channel)

    async def __aenter__(self) -> AsyncAdapterdClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def generate(self, prompt: str = "", adapter_id: str = "", **params) -> pb.GenerateResponse:
        return await self.stub.Generate(generate_request(prompt, adapter_id, **params), **self._kw(adapter_id))

    async def generate_stream(self, prompt: str = "", adapter_id: str = "",
                              **params) -> AsyncIterator[pb.GenerateResponse]:
        call = self.stub.GenerateStream(generate_request(prompt, adapter_id, **params), **self._kw(adapter_id))
        async for message in call:
            yield message

    async def list_adapters(self) -> list[pb.AdapterInfo]:
        return list((await self.stub.ListAdapters(pb.ListAdaptersRequest(), **self._kw())).adapters)

    async def load_adapter(self, adapter_id: str) -> pb.AdapterInfo:
        return await self.stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id=adapter_id), **self._kw(adapter_id))

    async def unload_adapter(self, adapter_id: str) -> pb.AdapterInfo:
        return await self.stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id=adapter_id), **self._kw(adapter_id))

    async def model_info(self) -> pb.ModelInfoResponse:
        return await self.stub.ModelInfo(pb.ModelInfoRequest(), **self._kw())

    async def chat(self, messages: Messages, adapter_id: str = "", **params) -> pb.GenerateResponse:
        return await self.generate("", adapter_id, messages=messages, **params)

    async def tokenize(self, text: str = "", return_tokens: bool = False, messages: Messages = (),
                       adapter_id: str = "") -> pb.TokenizeResponse:
        return await self.stub.Tokenize(tokenize_request(text, return_tokens, messages, adapter_id),
                                        **self._kw(adapter_id))
