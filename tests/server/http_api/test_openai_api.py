"""The OpenAI-compatible HTTP front end, driven by the official ``openai`` package: the same tokens as gRPC for
the same request (chat and completions, streaming and not, an adapter as ``model``), OpenAI's error shape
with the matching status, the models listing, tokens, metrics, and a client that leaves."""

from __future__ import annotations

import time

import openai
import pytest
from transformers import AutoTokenizer

from adapterd.clients import AdapterdClient
from tests.server.conftest import ENGINE_IN_TEST_PROCESS, engine_stats, start_daemon

MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "你是谁？"}]


@pytest.fixture(scope="module")
def served(tiny_model_dir, served_root):
    d = start_daemon(tiny_model_dir, served_root, http_port=0, metrics_port=0, max_new_tokens=64)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def api(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{served.daemon.http.port}/v1", api_key="none",
                         max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def grpc_client(served):
    with AdapterdClient(f"127.0.0.1:{served.port}", timeout=60) as c:
        yield c


@pytest.mark.parametrize("adapter_id", ["lora-qv", "prefix", ""])
def test_chat_greedy_tokens_equal_grpc(api, grpc_client, tiny_model_dir, adapter_id):
    model = adapter_id or tiny_model_dir.name
    want = grpc_client.chat(MESSAGES, adapter_id, max_new_tokens=10)
    got = api.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=10)
    assert got.choices[0].message.content == want.text and got.choices[0].message.role == "assistant"
    assert got.model == model and got.object == "chat.completion"
    assert got.usage.prompt_tokens == want.input_token_count
    assert got.usage.completion_tokens == want.generated_token_count
    assert got.choices[0].finish_reason == ("length" if want.generated_token_count == 10 else "stop")
    chunks = list(api.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=10,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] \
        == [got.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.generated_token_count


def test_completions_send_the_prompt_as_is(api, grpc_client):
    want = grpc_client.generate("Tell me a story", "team/lora-all", max_new_tokens=8)
    got = api.completions.create(model="team/lora-all", prompt="Tell me a story", temperature=0, max_tokens=8)
    assert got.choices[0].text == want.text and got.usage.prompt_tokens == want.input_token_count
    stream = api.completions.create(model="team/lora-all", prompt="Tell me a story", temperature=0, max_tokens=8,
                                    stream=True)
    assert "".join(c.choices[0].text for c in stream) == want.text


def test_completions_take_token_ids_as_grpc_does(api, grpc_client, tiny_model_dir):
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)("Tell me a story").input_ids
    want = grpc_client.generate(prompt_token_ids=ids, adapter_id="team/lora-all", max_new_tokens=8)
    for prompt in (ids, [ids]):  # OpenAI's two forms of one prompt's tokens
        got = api.completions.create(model="team/lora-all", prompt=prompt, temperature=0, max_tokens=8)
        assert got.choices[0].text == want.text and got.usage.prompt_tokens == len(ids)
    for bad, param in ((["a", "b"], "prompt"), ([[1, 2], [3]], "prompt"), ([1, 10**9], "prompt_token_ids[1]")):
        with pytest.raises(openai.BadRequestError) as err:
            api.completions.create(model="team/lora-all", prompt=bad, max_tokens=2)
        assert err.value.body["param"] == param


def test_sampling_parameters_mean_what_they_mean_over_grpc(api, grpc_client):
    """temperature, top_p, seed and stop reach the engine as gRPC's fields do: the same seeded sample."""
    want = grpc_client.chat(MESSAGES, "lora-qv", max_new_tokens=12, temperature=0.9, top_p=0.8, seed=7,
                            stop_sequences=["。"])
    got = api.chat.completions.create(model="lora-qv", messages=MESSAGES, max_tokens=12, temperature=0.9,
                                      top_p=0.8, seed=7, stop="。")
    assert got.choices[0].message.content == want.text


def test_models_lists_the_base_and_every_adapter(api, tiny_model_dir):
    listed = {m.id: m for m in api.models.list()}
    assert {tiny_model_dir.name, "lora-qv", "team/lora-all", "prefix", "prefix-proj"} <= set(listed)
    assert listed["lora-qv"].owned_by == "adapterd"
    assert api.models.retrieve("team/lora-all").id == "team/lora-all"
    assert api.models.retrieve(tiny_model_dir.name).id == tiny_model_dir.name
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("team/none")


def test_an_unknown_model_is_404_in_openais_shape(api):
    with pytest.raises(openai.NotFoundError) as err:
        api.chat.completions.create(model="no-such-adapter", messages=MESSAGES)
    assert err.value.status_code == 404
    body = err.value.body
    assert body["param"] == "model" and body["code"] == "model_not_found" and "no-such-adapter" in body["message"]
    assert set(body) == {"message", "type", "param", "code"}
    assert "/" not in body["message"].replace("<adapter root>", "")  # no server path


@pytest.mark.parametrize("params, param", [
    ({"temperature": -1}, "temperature"), ({"max_tokens": 65}, "max_tokens"), ({"n": 2}, "n"),
    ({"top_p": 1.5, "temperature": 0.5}, "top_p"), ({"stop": ["x"] * 7}, "stop"), ({"seed": -1}, "seed"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"model": "../escape"}, "model"),
])
def test_a_bad_parameter_is_400_naming_it(api, params, param):
    kwargs = {"model": "lora-qv", "messages": MESSAGES, **params}
    with pytest.raises(openai.BadRequestError) as err:
        api.chat.completions.create(**kwargs)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param and err.value.body["message"].startswith(param)
    assert err.value.body["type"] == "invalid_request_error"


def test_http_requests_are_counted_in_the_rpc_metrics(api, served):
    api.chat.completions.create(model="lora-qv", messages=MESSAGES, temperature=0, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="missing", prompt="x")
    text = served.daemon.metrics.exposition().decode()
    assert 'adapterd_rpc_requests_total{adapter="lora-qv",code="OK",method="ChatCompletions",service="openai.v1"}' \
        in text
    assert 'code="NOT_FOUND",method="Completions",service="openai.v1"' in text


def test_a_client_that_leaves_a_stream_frees_its_row(api, served):
    stream = api.completions.create(model="lora-qv", prompt="hello", temperature=0, max_tokens=64, stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 10
    while sum(engine_stats(served).values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine_stats(served)["running"] == 0
    assert served.daemon.budgets.callers.in_use == 0


def test_a_client_that_leaves_before_the_whole_answer_cancels_it(tiny_model_dir, served_root):
    """Not streaming: the client's timeout closes the connection, and the daemon cancels the row rather than
    generating the rest for nobody (as a cancelled RPC)."""
    d = start_daemon(tiny_model_dir, served_root, http_port=0, metrics_port=0, max_new_tokens=1000)
    try:
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{d.daemon.http.port}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.APITimeoutError):
            api.with_options(timeout=0.15).completions.create(model="prefix", prompt="hello", temperature=0,
                                                             max_tokens=1000, extra_body={"min_tokens": 1000})
        reason = 'adapterd_generation_requests_total{adapter="prefix",finished_reason="cancelled"} 1.0'
        deadline = time.monotonic() + 10
        while reason not in d.daemon.metrics.exposition().decode() and time.monotonic() < deadline:
            time.sleep(0.05)
        text = d.daemon.metrics.exposition().decode()
        assert reason in text
        assert 'adapterd_rpc_requests_total{adapter="prefix",code="CANCELLED",method="Completions"' in text
        assert d.daemon.budgets.callers.in_use == 0
    finally:
        d.stop()


def test_tokens_and_roles_as_over_grpc(tiny_model_dir, served_root, tmp_path):
    (tmp_path / "tokens").write_text("user:u-token\n")
    d = start_daemon(tiny_model_dir, served_root, http_port=0, tokens_file=tmp_path / "tokens",
                     **ENGINE_IN_TEST_PROCESS)
    try:
        url = f"http://127.0.0.1:{d.daemon.http.port}/v1"
        with pytest.raises(openai.AuthenticationError) as err:
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        assert err.value.status_code == 401 and err.value.body["type"] == "authentication_error"
        user = openai.OpenAI(base_url=url, api_key="u-token", max_retries=0)
        assert user.chat.completions.create(model="lora-qv", messages=MESSAGES, max_tokens=2).choices
    finally:
        d.stop()


def test_the_sigterm_drain_waits_for_http_streams(tiny_model_dir, served_root):
    """An HTTP stream holds a slot of the callers' budget: the drain lets it finish before the engine stops,
    and the HTTP port closes after it."""
    import threading

    d = start_daemon(tiny_model_dir, served_root, http_port=0)
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{d.daemon.http.port}/v1", api_key="none", max_retries=0,
                        timeout=60)
    stream = api.completions.create(model="lora-qv", prompt="hello", temperature=0, max_tokens=100, stream=True,
                                    stream_options={"include_usage": True}, extra_body={"min_tokens": 100})
    chunks = iter(stream)
    next(chunks)
    stopping = threading.Thread(target=d.stop, kwargs={"grace": 30})
    stopping.start()
    rest = list(chunks)
    stopping.join(60)
    assert rest[-1].usage.completion_tokens == 100
    assert [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason] == ["length"]
    with pytest.raises(openai.APIConnectionError):
        api.models.list()


def test_http_and_grpc_share_one_concurrent_call_budget(tiny_model_dir, served_root):
    """--max-concurrent-rpcs counts HTTP requests with RPCs: over it, 429 in OpenAI's shape."""
    d = start_daemon(tiny_model_dir, served_root, http_port=0, max_concurrent_rpcs=1, max_new_tokens=500,
                     **ENGINE_IN_TEST_PROCESS)
    try:
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{d.daemon.http.port}/v1", api_key="none", max_retries=0)
        with AdapterdClient(f"127.0.0.1:{d.port}", timeout=60) as c:
            holding = c.generate_stream("hi", max_new_tokens=500, min_new_tokens=500)
            next(holding)
            try:
                with pytest.raises(openai.RateLimitError) as err:
                    api.models.list()
                assert err.value.body["code"] == "resource_exhausted"
                assert "--max-concurrent-rpcs" in err.value.body["message"]
            finally:
                holding.cancel()
    finally:
        d.stop()
