"""Issue 12, the gRPC layer: tokenless health/reflection streams cannot use up the authenticated callers'
RPC budget, and one tenant's large text is tokenized off the event loop, so that other calls stay prompt."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from adapterd.clients import AdapterdClient
from adapterd.server.validation import MAX_PROMPT_CHARS
from adapterd.v1 import adapterd_pb2 as pb
from tests.server.conftest import ENGINE_IN_TEST_PROCESS, start_daemon

# The module's ``daemon`` is the session's shared one (tests/server/conftest.py): its tests only send requests,
# and the one that wraps the front end's tokenizer puts it back.
READS_ONLY = True

TOKEN = "u-" + "7" * 30


def _wait_for(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def budgeted(tiny_model_dir, served_root, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("budget") / "tokens"
    tokens.write_text(f"user:{TOKEN}\n")
    tokens.chmod(0o600)
    d = start_daemon(tiny_model_dir, served_root, tokens_file=tokens, max_concurrent_rpcs=50, max_open_rpcs=8)
    yield d
    d.stop()


def _open_reflection_stream(channel: grpc.Channel, release: threading.Event):
    """A reflection stream that stays open: one request, then a request iterator that waits."""
    def requests():
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        release.wait(60)
    return reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(requests())


def test_tokenless_health_and_reflection_streams_cannot_lock_out_callers(budgeted):
    target = f"127.0.0.1:{budgeted.port}"
    budgets = budgeted.daemon.budgets
    release = threading.Event()
    channel = grpc.insecure_channel(target)
    health = health_pb2_grpc.HealthStub(channel)
    opened, refused = [], []
    try:
        for i in range(60):  # more than --max-concurrent-rpcs, all without a token
            stream = (health.Watch(health_pb2.HealthCheckRequest()) if i % 3 else
                      _open_reflection_stream(channel, release))
            try:
                next(stream)  # the first message: the stream is being served
                opened.append(stream)
            except grpc.RpcError as exc:
                refused.append(exc.code())
        assert len(opened) == 8 and budgets.open_calls.in_use == 8  # their own budget, full
        assert set(refused) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        with AdapterdClient(target, token=TOKEN, timeout=60) as client:
            assert client.generate("hello", max_new_tokens=3).generated_token_count == 3
            streams = [client.generate_stream("hello", max_new_tokens=200, min_new_tokens=200) for _ in range(3)]
            for s in streams:
                next(s)
            assert budgets.callers.in_use == 3  # authenticated calls in flight are counted...
            for s in streams:
                s.cancel()
            _wait_for(lambda: budgets.callers.in_use == 0)  # ...and come back when they end
            with AdapterdClient(target, timeout=60) as anonymous:  # a refused call holds nothing
                with pytest.raises(grpc.RpcError) as err:
                    anonymous.generate("hello", max_new_tokens=2)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and budgets.callers.in_use == 0
    finally:
        release.set()
        for stream in opened:
            stream.cancel()
        channel.close()
    _wait_for(lambda: budgets.open_calls.in_use == 0)  # the open budget comes back as streams end
    with grpc.insecure_channel(target) as fresh:
        stream = health_pb2_grpc.HealthStub(fresh).Watch(health_pb2.HealthCheckRequest())
        assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
        stream.cancel()


def test_anonymous_calls_that_never_send_their_request_hold_nothing(budgeted):
    """Calls whose headers arrive but whose request message never does: refused at once without a token,
    counted against the open budget for health. More of them than grpc's hard cap lock nobody out."""
    target = f"127.0.0.1:{budgeted.port}"
    budgets = budgeted.daemon.budgets
    release = threading.Event()

    def never():
        release.wait(60)
        return
        yield  # pragma: no cover - a request iterator that sends nothing until released

    channel = grpc.insecure_channel(target)
    try:
        generate = channel.stream_unary("/adapterd.v1.Adapterd/Generate",
                                        response_deserializer=pb.GenerateResponse.FromString)
        check = channel.stream_unary("/grpc.health.v1.Health/Check",
                                     response_deserializer=health_pb2.HealthCheckResponse.FromString)
        anonymous = [generate.future(never(), timeout=60) for _ in range(150)]
        probes = [check.future(never(), timeout=60) for _ in range(60)]  # 210 > 2 * (50 + 8) + 64
        for call in anonymous:  # refused from the headers alone: no token
            assert call.exception(30).code() == grpc.StatusCode.UNAUTHENTICATED
        _wait_for(lambda: sum(p.done() for p in probes) == 60 - 8)
        assert {p.exception().code() for p in probes if p.done()} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert budgets.open_calls.in_use == 8 and budgets.callers.in_use == 0
        with AdapterdClient(target, token=TOKEN, timeout=60) as client:
            assert client.generate("hello", max_new_tokens=2).generated_token_count == 2
    finally:
        release.set()
        channel.close()
    _wait_for(lambda: budgets.open_calls.in_use == 0)


def test_the_callers_budget_refuses_past_its_limit_naming_the_flag(tiny_model_dir, served_root):
    d = start_daemon(tiny_model_dir, served_root, max_concurrent_rpcs=1, **ENGINE_IN_TEST_PROCESS)
    try:
        with AdapterdClient(f"127.0.0.1:{d.port}", timeout=60) as client:
            stream = client.generate_stream("hello", max_new_tokens=300, min_new_tokens=300)
            next(stream)
            with pytest.raises(grpc.RpcError) as err:
                client.model_info()
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-concurrent-rpcs" in err.value.details()
            stream.cancel()
            _wait_for(lambda: d.daemon.budgets.callers.in_use == 0)
            assert client.model_info().version
    finally:
        d.stop()


# ---------------------------------------------------------------------------------------- tokenization


def _small_calls_during_a_big_one(target: str, text: str) -> tuple[list[float], float, int]:
    """Tokenize ``text`` on one connection while another tokenizes "hello" again and again: the seconds of each
    small call that finished while the big one ran, the big one's seconds, and its token count."""
    big: dict[str, float] = {}

    def tokenize_big():
        with AdapterdClient(target, timeout=120) as c:
            started = time.perf_counter()
            big["count"] = c.tokenize(text).token_count
            big["seconds"] = time.perf_counter() - started

    with AdapterdClient(target, timeout=60) as small:
        small.tokenize("warm up")
        thread = threading.Thread(target=tokenize_big)
        thread.start()
        time.sleep(0.2)  # the big request has arrived and is being tokenized
        finished_during: list[float] = []
        while thread.is_alive():
            started = time.perf_counter()
            assert small.tokenize("hello").token_count > 0
            if thread.is_alive():
                finished_during.append(time.perf_counter() - started)
        thread.join()
    return finished_during, big["seconds"], int(big["count"])


def test_a_huge_tokenize_does_not_stall_other_calls(daemon):
    """Small calls keep finishing, each in a fraction of the big call's time, while a text just under the limit is
    tokenized (~1 s here). Tokenized on the event loop, at most one small call would finish during it, in every
    attempt. Up to three attempts: a stall of the whole test process (the 2-core CI machine, the other worker's
    processes) once held one small call for the big call's whole 0.8 s, which is not what this checks."""
    target = f"127.0.0.1:{daemon.port}"
    text = "hello world 你是谁 " * (MAX_PROMPT_CHARS // 17)  # just under the limit
    attempts = []
    for _ in range(3):
        finished_during, big_seconds, count = _small_calls_during_a_big_one(target, text)
        assert count > 100_000
        attempts.append((len(finished_during), max(finished_during, default=None), big_seconds))
        if len(finished_during) >= 3 and max(finished_during) < big_seconds / 3:
            break
    else:
        pytest.fail(f"small calls stalled behind the big one in every attempt (count, slowest s, big s): {attempts}")


def test_a_prompt_too_long_for_any_tokenization_is_refused_before_tokenizing(daemon, client):
    prompts = daemon.daemon.state.runtime.prompts  # the front end's tokenizing: only token ids reach the engine
    limit = daemon.daemon.state.limits.max_input_tokens
    too_long = "x" * (limit * prompts.tokenization.max_token_bytes + 1)
    calls: list[str] = []
    real = prompts.tokenize
    prompts.tokenize = lambda text, *rest: calls.append(text) or real(text, *rest)
    try:
        with pytest.raises(grpc.RpcError) as err:
            client.generate(too_long, max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "characters" in err.value.details()
        assert calls == []  # refused on its length alone
        # asked for truncation, the same prompt is tokenized and its last tokens are served
        reply = client.generate(too_long, max_new_tokens=2, truncate_input_tokens=8)
        assert reply.input_token_count == 8 and reply.generated_token_count == 2
        assert calls == [too_long]
    finally:
        prompts.tokenize = real
    with pytest.raises(grpc.RpcError) as err:
        client.tokenize("x" * (MAX_PROMPT_CHARS + 1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "text" in err.value.details()


def test_tokenize_answers_are_unchanged(client, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "你是谁？hello " * 2000  # the large lane
    reply = client.tokenize(text, return_tokens=True)
    ids = tok(text).input_ids
    assert list(reply.token_ids) == ids and list(reply.tokens) == tok.convert_ids_to_tokens(ids)
    assert client.generate("hello", max_new_tokens=2, truncate_input_tokens=1).input_token_count == 1
