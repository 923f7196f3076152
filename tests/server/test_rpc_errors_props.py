"""Issue 12, one error mapping: random request fields (and random bytes) at every RPC of a running daemon.
Every answer is OK or a documented status code, never UNKNOWN or INTERNAL, and no message carries a
traceback or a server path; afterwards the daemon still answers with PEFT's tokens."""

from __future__ import annotations

import logging
import sys

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from adapterd.server import rpc_errors
from adapterd.server.errors import AdapterdError, DataLoss
from adapterd.v1 import adapterd_pb2 as pb
from adapterd.v1 import adapterd_pb2_grpc as pb_grpc
from tests.helpers import reference_greedy
from tests.server.conftest import start_daemon
from tests.server.test_validation_props import any_request

DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DATA_LOSS,
              grpc.StatusCode.UNAVAILABLE}  # UNAVAILABLE: a step the device could not run (another part of #12)
FLOATS = st.floats(width=32, allow_nan=True, allow_infinity=True)
TEXT = st.text(max_size=40)
IDS = st.one_of(st.sampled_from(["lora-qv", "prefix", "team/lora-all", "nope", "a/b/c", "../escape", "/etc",
                                 "a//b", ".hidden", "x" * 300, "", "a\x00b", "team/../lora-qv", "lora-qv/"]),
                st.from_regex(r"[A-Za-z0-9_.\-/]{1,24}", fullmatch=True), TEXT)
RUN_IDS = st.one_of(st.sampled_from(["", "run-1", "../x", "-x", "a" * 200, ".", "a\x00"]), TEXT)
OPTION_NAMES = st.one_of(st.sampled_from(["lora_alpha", "weight_decay", "max_steps", "learning_rate", "lora_r",
                                          "epochs", "max-steps", "nope", ""]), TEXT)
OPTION_VALUES = st.one_of(st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e309", "abc", "", "2**70", "1"]),
                          st.text(max_size=12))


@pytest.fixture(scope="module")
def hostile(tiny_model_dir, served_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("hostile")
    (work / "merged").mkdir()
    d = start_daemon(tiny_model_dir, served_root, runs=work / "runs", merge_output_root=work / "merged",
                     max_new_tokens=16, default_max_new_tokens=4)
    channel = grpc.insecure_channel(f"127.0.0.1:{d.port}")
    private = [str(tiny_model_dir), str(served_root), str(work), sys.prefix, "site-packages"]
    yield d, channel, pb_grpc.AdapterdStub(channel), private, work
    channel.close()
    d.stop()


def paths(work) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(["", "/", "/etc/passwd", "relative/out", "/tmp/" + "x" * 5000, "a\x00b",
                                      str(work / "merged" / "out"), "/tmp/adapterd-elsewhere/x"]), TEXT)


@st.composite
def merge_requests(draw, work) -> pb.MergeAdapterRequest:
    """Merge requests with at least one bad field, so that each is answered without starting a merge process
    (a few seconds each); ``test_a_merge_reaching_the_worker_keeps_its_domain_code`` covers the worker."""
    inputs = [pb.WeightedAdapter(adapter_id=draw(IDS), weight=draw(FLOATS)) for _ in range(draw(st.integers(0, 3)))]
    request = pb.MergeAdapterRequest(
        adapters=inputs,
        strategy=draw(st.integers(0, 9)), density=draw(FLOATS), majority_sign_method=draw(TEXT),
        rank=draw(st.integers(0, 2**32 - 1)), overwrite=draw(st.booleans()))
    output = draw(st.sampled_from(["none", "dir", "adapter"]))
    if output == "dir":
        request.output_model_dir = draw(paths(work))
    elif output == "adapter":
        request.output_adapter_id = draw(IDS)
    request.adapters.add(adapter_id=draw(st.sampled_from(["../escape", "", "a\x00b"])), weight=1.0)
    return request


def calls(work) -> st.SearchStrategy:
    """(method, request) pairs over every RPC of adapterd.v1.Adapterd."""
    return st.one_of(
        st.tuples(st.sampled_from(["Generate", "GenerateStream"]), any_request()),
        st.tuples(st.just("Tokenize"), st.builds(pb.TokenizeRequest, text=st.text(max_size=200),
                                                  return_tokens=st.booleans())),
        st.tuples(st.just("ListAdapters"), st.just(pb.ListAdaptersRequest())),
        st.tuples(st.just("ModelInfo"), st.just(pb.ModelInfoRequest())),
        st.tuples(st.just("LoadAdapter"), st.builds(pb.LoadAdapterRequest, adapter_id=IDS)),
        st.tuples(st.just("UnloadAdapter"), st.builds(pb.UnloadAdapterRequest, adapter_id=IDS)),
        st.tuples(st.just("MergeAdapter"), merge_requests(work)),
        st.tuples(st.just("StartTraining"), st.builds(
            pb.StartTrainingRequest, data_path=paths(work), method=st.sampled_from(["lora", "ptuning-v2", "x", ""]),
            run_id=RUN_IDS, options=st.dictionaries(OPTION_NAMES, OPTION_VALUES, max_size=4), export_adapter_id=IDS)),
        st.tuples(st.just("StopTraining"), st.builds(pb.StopTrainingRequest, run_id=RUN_IDS)),
        st.tuples(st.sampled_from(["TrainStatus", "WatchTraining"]), st.builds(pb.TrainStatusRequest, run_id=RUN_IDS)),
    )


STREAMING = {"GenerateStream", "MergeAdapter", "WatchTraining"}


def _status(stub_or_channel, method: str, request) -> tuple[grpc.StatusCode, str]:
    try:
        if isinstance(request, bytes):  # raw bytes, not necessarily a valid message
            path = f"/adapterd.v1.Adapterd/{method}"
            if method in STREAMING:
                list(stub_or_channel.unary_stream(path)(request, timeout=60))
            else:
                stub_or_channel.unary_unary(path)(request, timeout=60)
        elif method in STREAMING:
            list(getattr(stub_or_channel, method)(request, timeout=60))
        else:
            getattr(stub_or_channel, method)(request, timeout=60)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _check(code: grpc.StatusCode, message: str, private: list[str], what) -> None:
    assert code in DOCUMENTED, (code, message, what)
    assert "Traceback" not in message and 'File "' not in message, (message, what)
    assert not any(p in message for p in private), (message, what)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data())
def test_random_requests_get_documented_codes_and_clean_messages(hostile, data):
    daemon, channel, stub, private, work = hostile
    method, request = data.draw(calls(work))
    code, message = _status(stub, method, request)
    _check(code, message, private, (method, request))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(sorted(m.name for m in pb.DESCRIPTOR.services_by_name["Adapterd"].methods)),
       raw=st.binary(max_size=64))
def test_random_bytes_get_documented_codes_and_clean_messages(hostile, method, raw):
    daemon, channel, stub, private, work = hostile
    if method in ("MergeAdapter", "StartTraining"):
        raw = b"\xff" + raw  # never a valid message: no merge process or trainer is started by chance
    code, message = _status(channel, method, raw)
    _check(code, message, private, (method, raw))


def test_malformed_bytes_are_invalid_argument(hostile):
    daemon, channel, stub, private, work = hostile
    code, message = _status(channel, "Tokenize", b"\xff\xff\xff")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "request" in message


def test_a_bug_is_internal_with_an_error_id_and_logged(hostile, monkeypatch, caplog):
    daemon, channel, stub, private, work = hostile
    runtime = daemon.daemon.state.runtime

    def broken(*args, **kwargs):
        raise RuntimeError(f"cannot open {work}/secret.json")

    monkeypatch.setattr(runtime, "list_adapters", broken)
    with caplog.at_level(logging.ERROR, logger="adapterd.server.rpc_errors"):
        code, message = _status(stub, "ListAdapters", pb.ListAdaptersRequest())
    assert code == grpc.StatusCode.INTERNAL and "error id" in message and str(work) not in message
    ident = message.split("error id ")[1].split(")")[0]
    assert any(ident in r.getMessage() and r.exc_info and "secret.json" in str(r.exc_info[1]) for r in caplog.records)


def test_an_engine_failure_event_is_unavailable_without_its_text(hostile, monkeypatch):
    from adapterd.server.engine import GenerationEvent, StopReason

    daemon, channel, stub, private, work = hostile
    runtime = daemon.daemon.state.runtime

    async def failing(*args, **kwargs):
        yield GenerationEvent("end", stop_reason=StopReason.ERROR,
                              error=RuntimeError(f"CUDA error at {work}/kernel.cu:12"))

    monkeypatch.setattr(runtime, "generate", failing)
    for method in ("Generate", "GenerateStream"):
        code, message = _status(stub, method, pb.GenerateRequest(prompt="hello"))
        assert code == grpc.StatusCode.UNAVAILABLE and "error id" in message, message
        assert "CUDA" not in message and str(work) not in message


def test_domain_messages_do_not_show_server_directories(hostile):
    daemon, channel, stub, private, work = hostile
    code, message = _status(stub, "TrainStatus", pb.TrainStatusRequest(run_id="no-such-run"))
    assert code == grpc.StatusCode.NOT_FOUND and "<runs root>" in message and str(work) not in message
    assert rpc_errors.redact(f"{work}/runs/x") == "<runs root>/x"
    assert not rpc_errors.is_domain_error(AdapterdError("the merge process failed: Traceback ..."))
    assert rpc_errors.is_domain_error(DataLoss("corrupt"))


def test_a_merge_reaching_the_worker_keeps_its_domain_code(hostile):
    daemon, channel, stub, private, work = hostile
    code, message = _status(stub, "MergeAdapter", pb.MergeAdapterRequest(
        adapters=[pb.WeightedAdapter(adapter_id="nope")], output_adapter_id="merged-out"))
    assert code == grpc.StatusCode.NOT_FOUND, message  # a domain error from the worker keeps its code


def test_the_daemon_still_serves_peft_tokens_afterwards(hostile, tiny_model_dir, served_root):
    daemon, channel, stub, private, work = hostile
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for adapter_id in ("", "lora-qv", "prefix"):
        reply = stub.Generate(pb.GenerateRequest(prompt="hello world", adapter_id=adapter_id,
                                                 stopping=pb.StoppingCriteria(max_new_tokens=8)), timeout=60)
        ref = reference_greedy(tiny_model_dir, "hello world", served_root / adapter_id if adapter_id else None, 8)
        assert reply.text == tok.decode(ref, skip_special_tokens=True), adapter_id
