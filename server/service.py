"""The ``adapterd.v1.Adapterd`` handlers: thin. Each validates its request, delegates to the runtime (or the
merger, or the training manager), and turns the result into a response. No model logic lives here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from ..common import __version__
from ..v1 import adapterd_pb2 as pb
from ..v1 import adapterd_pb2_grpc as pb_grpc
from .adapters.ids import validate_adapter_id
from .adapters.store import AdapterRecord
from .core.protocol import AdapterRef
from .engine import GenerationEvent, StopReason
from .errors import InvalidArgument, Unavailable
from .merge import Merger
from .ops import merge_stream, require_training
from .request_checks import check_merge, check_run_id, check_start_training
from .rpc_errors import correlation_id, is_domain_error, log_unexpected, streaming, unary
from .runtime import PreparedPrompt, Runtime
from .training import TrainingManager
from .validation import MAX_PROMPT_CHARS, Limits, check_text_or_messages, validate_generate

log = logging.getLogger(__name__)


def adapter_info(rec: AdapterRecord) -> pb.AdapterInfo:
    return pb.AdapterInfo(
        adapter_id=rec.adapter_id, type=pb.AdapterType.Value(rec.type) if rec.type in pb.AdapterType.keys() else 0,
        rank=rec.rank, num_virtual_tokens=rec.num_virtual_tokens, target_modules=rec.target_modules,
        size_bytes=rec.size_bytes, state=pb.AdapterState.Value(rec.state), last_used_unix=rec.last_used,
        base_model=rec.base_model, error=rec.error)


class ServingState:
    """What the handlers share: the runtime once the model is loaded, the merger and the training manager,
    and whether new work is accepted."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.runtime: Runtime | None = None
        self.limits = limits
        self.merger: Merger | None = None
        self.training: TrainingManager | None = None
        self.draining = False

    def ready(self) -> Runtime:
        if self.draining:
            raise Unavailable("the daemon is shutting down")
        if self.runtime is None or self.limits is None:
            raise Unavailable("the base model is still loading; retry shortly")
        return self.runtime


def chat_messages(messages) -> list[dict[str, str]]:
    """The request's ChatMessages as a chat template takes them (checked by ``validate_generate``)."""
    return [{"role": m.role, "content": m.content} for m in messages]


async def prompt_of(runtime: Runtime, request: pb.GenerateRequest, adapter: AdapterRef | None,
                    limits: Limits) -> PreparedPrompt:
    """The request's prompt tokens: ``prompt`` as it is, ``messages`` rendered with the chat template, or
    ``prompt_token_ids`` as they were sent."""
    virtual = adapter.num_virtual_tokens if adapter else 0
    if request.prompt_token_ids:
        return runtime.sent_ids(request.prompt_token_ids, request.truncate_input_tokens, limits.max_input_tokens,
                                virtual)
    if not request.messages:
        return await runtime.prompt_ids(request.prompt, request.truncate_input_tokens, limits.max_input_tokens,
                                        virtual)
    text = await runtime.render_messages(chat_messages(request.messages), adapter)
    return await runtime.prompt_ids(text, request.truncate_input_tokens, limits.max_input_tokens, virtual,
                                    special_tokens=False, field="messages")


async def generation_events(state: ServingState, request: pb.GenerateRequest,
                            request_id: str | None) -> AsyncIterator[tuple[GenerationEvent, int]]:
    """One generation request's events with its prompt's token count: the one path of every front end (gRPC
    here, HTTP in ``server/http_api``). Errors are domain errors, for each front end to map."""
    runtime = state.ready()
    params = validate_generate(request, state.limits)
    adapter = await runtime.adapter(request.adapter_id)
    prompt = await prompt_of(runtime, request, adapter, state.limits)
    async for event in runtime.generate(prompt.ids, params, adapter, request_id):
        if event.error is not None:
            if is_domain_error(event.error):
                raise event.error
            # The engine could not run the step (the device failed): retryable, but its text stays here.
            ident = log_unexpected(event.error, "generation", request_id)
            raise Unavailable(f"generation failed (error id {ident}); retry shortly")
        yield event, len(prompt.ids)


class AdapterdService(pb_grpc.AdapterdServicer):
    def __init__(self, state: ServingState) -> None:
        self.state = state

    def _events(self, request: pb.GenerateRequest, context) -> AsyncIterator[tuple[GenerationEvent, int]]:
        return generation_events(self.state, request, correlation_id(context))

    @unary
    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        parts: list[str] = []
        response = pb.GenerateResponse(adapter_id=request.adapter_id)
        async for event, input_count in self._events(request, context):
            parts.append(event.text)
            response.input_token_count = input_count
            response.generated_token_count = event.generated_token_count
            if event.kind == "start":
                response.seed = event.seed
            if event.kind == "end":
                response.stop_reason = int(event.stop_reason)
                response.stop_sequence = event.stop_sequence
        response.text = "".join(parts)
        return response

    @streaming
    async def GenerateStream(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        # The engine emits "start" right after the prefill, just before the first token's event, so the first
        # message carries both (one gRPC message less before the first token reaches the client).
        start: pb.GenerateResponse | None = None
        async for event, input_count in self._events(request, context):
            if event.kind == "start":
                start = pb.GenerateResponse(adapter_id=request.adapter_id, input_token_count=input_count,
                                            seed=event.seed)
                continue
            if event.kind == "delta":
                if not (event.text or start):
                    continue
                response = pb.GenerateResponse(text=event.text, generated_token_count=event.generated_token_count)
            else:
                response = pb.GenerateResponse(text=event.text, generated_token_count=event.generated_token_count,
                                               stop_reason=int(event.stop_reason) or int(StopReason.ERROR),
                                               stop_sequence=event.stop_sequence)
            if start is not None:
                start.MergeFrom(response)
                response, start = start, None
            yield response

    @unary
    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        runtime = self.state.ready()
        if request.messages or request.adapter_id:
            check_text_or_messages(request.text, request.messages, "text")
        elif len(request.text) > MAX_PROMPT_CHARS:
            raise InvalidArgument(f"longer than {MAX_PROMPT_CHARS} characters", field="text")
        if request.adapter_id:
            validate_adapter_id(request.adapter_id)
        text, rendered = request.text, ""
        if request.messages:
            adapter = await runtime.adapter(request.adapter_id)
            text = rendered = await runtime.render_messages(chat_messages(request.messages), adapter)
        ids, pieces = await runtime.tokenize_text(text, request.return_tokens, special_tokens=not rendered)
        response = pb.TokenizeResponse(token_count=len(ids), rendered_prompt=rendered)
        if request.return_tokens:
            response.token_ids.extend(ids)
            response.tokens.extend(pieces)
        return response

    @unary
    async def ListAdapters(self, request: pb.ListAdaptersRequest, context) -> pb.ListAdaptersResponse:
        runtime = self.state.ready()
        records = await runtime.list_adapters()
        return pb.ListAdaptersResponse(adapters=[adapter_info(r) for r in records])

    @unary
    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context) -> pb.AdapterInfo:
        runtime = self.state.ready()
        validate_adapter_id(request.adapter_id)
        return adapter_info(await runtime.load_adapter(request.adapter_id))

    @unary
    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context) -> pb.AdapterInfo:
        runtime = self.state.ready()
        validate_adapter_id(request.adapter_id)
        return adapter_info(await runtime.unload_adapter(request.adapter_id))

    @unary
    async def ModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfoResponse:
        runtime = self.state.ready()
        info = runtime.model_info()
        return pb.ModelInfoResponse(
            base_model=info.base_model, model_type=info.model_type, quantization=info.quantization, dtype=info.dtype,
            device=info.device, max_sequence_length=info.max_sequence_length,
            max_new_tokens=self.state.limits.max_new_tokens, max_batch_size=info.max_batch_size,
            max_lora_rank=info.max_lora_rank, adapter_slots=info.adapter_slots, version=__version__,
            vocab_size=info.vocab_size)

    @streaming
    async def MergeAdapter(self, request: pb.MergeAdapterRequest, context) -> AsyncIterator[pb.MergeProgress]:
        runtime = self.state.ready()
        check_merge(request)
        async for message in merge_stream(self.state.merger, runtime.unload_adapter, request):
            yield message

    @unary
    async def StartTraining(self, request: pb.StartTrainingRequest, context) -> pb.TrainingRun:
        self.state.ready()
        check_start_training(request)
        return await asyncio.to_thread(require_training(self.state.training).start, request)

    @unary
    async def StopTraining(self, request: pb.StopTrainingRequest, context) -> pb.TrainingRun:
        check_run_id(request.run_id, required=True)
        return await asyncio.to_thread(require_training(self.state.training).stop, request.run_id)

    @unary
    async def TrainStatus(self, request: pb.TrainStatusRequest, context) -> pb.TrainStatusResponse:
        manager = require_training(self.state.training)
        check_run_id(request.run_id)
        return pb.TrainStatusResponse(runs=await asyncio.to_thread(manager.status, request.run_id))

    @streaming
    async def WatchTraining(self, request: pb.TrainStatusRequest, context) -> AsyncIterator[pb.TrainStatusResponse]:
        manager = require_training(self.state.training)
        check_run_id(request.run_id)
        async for runs in manager.watch(request.run_id):
            yield pb.TrainStatusResponse(runs=runs)
