"""Security and limits over real loopback daemons: bearer tokens with two roles, TLS, mutual TLS, the
concurrent-RPC limit and the message-size limit, each with its status code."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from adapterd.cli import main as cli_main
from adapterd.clients import AdapterdClient
from adapterd.server import auth
from adapterd.server.app import DaemonThread
from adapterd.server.config import ServerConfig
from adapterd.v1 import adapterd_pb2 as pb
from tests.helpers import TEST_DEVICE
from tests.server.conftest import ENGINE_IN_TEST_PROCESS, start_daemon

USER_TOKEN, ADMIN_TOKEN = "u-" + "1" * 30, "a-" + "2" * 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- tokens, unit


def test_tokens_file_formats(tmp_path):
    lines = tmp_path / "tokens"
    lines.write_text(f"# comment\n\nuser:{USER_TOKEN}\nadmin : {ADMIN_TOKEN}\n")
    as_dict = tmp_path / "tokens.json"
    as_dict.write_text(f'{{"user": ["{USER_TOKEN}"], "admin": ["{ADMIN_TOKEN}"]}}')
    as_list = tmp_path / "list.json"
    as_list.write_text(f'[{{"role": "user", "token": "{USER_TOKEN}"}}, {{"role": "admin", "token": "{ADMIN_TOKEN}"}}]')
    for path in (lines, as_dict, as_list):
        table = auth.load_tokens(path)
        assert table.role_of(USER_TOKEN) == "user" and table.role_of(ADMIN_TOKEN) == "admin"
        assert table.role_of("nope") is None and table.role_of(USER_TOKEN[:-1]) is None


@pytest.mark.parametrize("text,message", [
    ("root:abc", "unknown role 'root'"), ("user abc", "line 1: expected role:token"), ("user:", "empty"),
    ("user:x\nadmin:x", "appears twice"), ("# nothing", "no tokens"), ('{"user": "abc"}', "list of token"),
    ("{broken", "not valid JSON")])
def test_bad_tokens_files_are_refused_naming_the_problem(tmp_path, text, message):
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        auth.load_tokens(path)
    assert str(path) in str(err.value)


def test_every_token_is_compared_whatever_matches(monkeypatch):
    table = auth.TokenTable.from_pairs([("user", f"tok{i}") for i in range(5)] + [("admin", "boss")])
    calls: list[int] = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    assert table.role_of("tok0") == "user" and len(calls) == 6  # a match on the first entry: still 6
    calls.clear()
    assert table.role_of("guess") is None and len(calls) == 6


def test_every_rpc_of_the_service_has_a_role():
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["Adapterd"].methods}
    assert methods == set(auth.METHOD_ROLES), "classify new RPCs in server/auth.py METHOD_ROLES"
    assert auth.required_role("/grpc.health.v1.Health/Check") is None
    assert auth.required_role("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is None
    assert auth.required_role("/adapterd.v1.Adapterd/SomethingNew") == "admin"  # fails closed
    assert auth.bearer_token([("authorization", "bearer  xyz ")]) == "xyz"
    assert auth.bearer_token([("authorization", "Basic xyz")]) is None


# ------------------------------------------------------------------------------------------- tokens, daemon


@pytest.fixture(scope="module")
def secured(tiny_model_dir, served_root, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text(f"user:{USER_TOKEN}\nadmin:{ADMIN_TOKEN}\n")
    tokens.chmod(0o600)
    d = start_daemon(tiny_model_dir, served_root, tokens_file=tokens, metrics_port=_free_port())
    yield d
    d.stop()


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        result = call()
        if hasattr(result, "__next__"):
            list(result)  # a stream: its status comes with the first read
    return err.value.code()


def test_roles_over_grpc(secured):
    target = f"127.0.0.1:{secured.port}"
    with AdapterdClient(target, timeout=60) as anon, AdapterdClient(target, token="wrong", timeout=60) as bad, \
            AdapterdClient(target, token=USER_TOKEN, timeout=60) as user, \
            AdapterdClient(target, token=ADMIN_TOKEN, timeout=60) as admin:
        for client in (anon, bad):
            assert _code(lambda c=client: c.generate("hi", max_new_tokens=2)) == grpc.StatusCode.UNAUTHENTICATED
            assert _code(lambda c=client: c.generate_stream("hi")) == grpc.StatusCode.UNAUTHENTICATED
            assert _code(lambda c=client: c.list_adapters()) == grpc.StatusCode.UNAUTHENTICATED
        # user: generate, stream, tokenize, list, model info, training status (no --runs here: not a refusal)
        assert user.generate("hi", "lora-qv", max_new_tokens=3).generated_token_count == 3
        assert list(user.generate_stream("hi", max_new_tokens=2))[-1].generated_token_count == 2
        assert user.tokenize("hello").token_count > 0 and user.list_adapters() and user.model_info().version
        assert _code(lambda: user.train_status()) == grpc.StatusCode.FAILED_PRECONDITION
        for call in (lambda: user.load_adapter("prefix"), lambda: user.unload_adapter("prefix"),
                     lambda: user.stop_training("r1"),
                     lambda: user.start_training(pb.StartTrainingRequest(run_id="r1")),
                     lambda: user.merge(pb.MergeAdapterRequest(adapters=[pb.WeightedAdapter(adapter_id="lora-qv")],
                                                               output_adapter_id="m"))):
            assert _code(call) == grpc.StatusCode.PERMISSION_DENIED
        assert admin.load_adapter("prefix").adapter_id == "prefix"
        assert admin.unload_adapter("prefix").adapter_id == "prefix"
        assert admin.generate("hi", max_new_tokens=1).generated_token_count == 1
    with grpc.insecure_channel(target) as channel:  # health and reflection need no token
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        assert "adapterd.v1.Adapterd" in set(ProtoReflectionDescriptorDatabase(channel).get_services())
    samples = [s for family in secured.daemon.metrics.registry.collect() for s in family.samples
               if s.name == "adapterd_rpc_requests_total"]

    def count(method: str, code: str) -> float:  # summed over the adapter label
        return sum(s.value for s in samples if s.labels["method"] == method and s.labels["code"] == code)

    assert count("ListAdapters", "UNAUTHENTICATED") == 2  # refusals are counted with their code
    assert count("LoadAdapter", "PERMISSION_DENIED") == 1


def test_cli_takes_the_token_from_the_environment(secured, monkeypatch, capsys):
    argv = ["adapters", "list", "--target", f"127.0.0.1:{secured.port}"]
    monkeypatch.delenv("ADAPTERD_TOKEN", raising=False)
    assert cli_main(argv) == 1 and "UNAUTHENTICATED" in capsys.readouterr().err
    monkeypatch.setenv("ADAPTERD_TOKEN", USER_TOKEN)
    assert cli_main(argv) == 0 and "lora-qv" in capsys.readouterr().out
    assert cli_main(["adapters", "load", "prefix", "--target", f"127.0.0.1:{secured.port}"]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    assert cli_main(["adapters", "load", "prefix", "--token", ADMIN_TOKEN, "--target",
                     f"127.0.0.1:{secured.port}"]) == 0  # --token wins over the environment


def test_a_bad_tokens_file_stops_start_up(tiny_model_dir, served_root, tmp_path):
    bad = tmp_path / "tokens"
    bad.write_text("superuser:abc\n")
    with pytest.raises(ValueError, match="unknown role"):
        start_daemon(tiny_model_dir, served_root, tokens_file=bad)


# ------------------------------------------------------------------------------------------------------ TLS


def _make_pki(directory: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost, a client certificate from the same CA,
    and a client certificate from another CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    paths: dict[str, Path] = {}

    def write(name: str, cert, key) -> None:
        paths[f"{name}.crt"] = directory / f"{name}.crt"
        paths[f"{name}.crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{name}.key"] = directory / f"{name}.key"
        paths[f"{name}.key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))

    def issue(common_name: str, issuer=None, issuer_key=None, *, ca=False, usage=None, san=None):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = (x509.CertificateBuilder().subject_name(subject)
                   .issuer_name(issuer.subject if issuer else subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key or key, hashes.SHA256()), key

    ca, ca_key = issue("adapterd test CA", ca=True)
    write("ca", ca, ca_key)
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    write("server", *issue("localhost", ca, ca_key, usage=ExtendedKeyUsageOID.SERVER_AUTH, san=san))
    write("client", *issue("client", ca, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH))
    other, other_key = issue("another CA", ca=True)
    write("stranger", *issue("stranger", other, other_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH))
    return paths


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return _make_pki(tmp_path_factory.mktemp("pki"))


def _credentials(pki, client: str | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki["ca.crt"].read_bytes(),
        private_key=pki[f"{client}.key"].read_bytes() if client else None,
        certificate_chain=pki[f"{client}.crt"].read_bytes() if client else None)


def _refused(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    with AdapterdClient(target, credentials=credentials, timeout=10) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.list_adapters()
    return err.value.code()


def test_tls_with_tokens(tiny_model_dir, served_root, pki, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"user:{USER_TOKEN}\n")
    d = start_daemon(tiny_model_dir, served_root, tls_cert=pki["server.crt"], tls_key=pki["server.key"],
                     tokens_file=tokens, **ENGINE_IN_TEST_PROCESS)
    target = f"127.0.0.1:{d.port}"
    try:
        with AdapterdClient(target, credentials=_credentials(pki), token=USER_TOKEN, timeout=60) as c:
            assert c.generate("hi", "prefix", max_new_tokens=2).generated_token_count == 2
        assert _refused(target, None) == grpc.StatusCode.UNAVAILABLE  # plaintext to a TLS port
        assert _refused(target, _credentials(pki)) == grpc.StatusCode.UNAUTHENTICATED  # TLS, no token
    finally:
        d.stop()


def test_mutual_tls_requires_a_client_certificate_from_the_ca(tiny_model_dir, served_root, pki, capsys):
    d = start_daemon(tiny_model_dir, served_root, tls_cert=pki["server.crt"], tls_key=pki["server.key"],
                     tls_client_ca=pki["ca.crt"], **ENGINE_IN_TEST_PROCESS)
    target = f"127.0.0.1:{d.port}"
    try:
        with AdapterdClient(target, credentials=_credentials(pki, "client"), timeout=60) as c:
            assert c.generate("hi", "lora-qv", max_new_tokens=2).generated_token_count == 2
        assert _refused(target, _credentials(pki)) == grpc.StatusCode.UNAVAILABLE  # no client certificate
        assert _refused(target, _credentials(pki, "stranger")) == grpc.StatusCode.UNAVAILABLE  # other CA
        assert _refused(target, None) == grpc.StatusCode.UNAVAILABLE
        common = ["--target", f"localhost:{d.port}", "--tls-ca", str(pki["ca.crt"])]
        assert cli_main(["adapters", "list", *common]) == 1
        assert cli_main(["adapters", "list", *common, "--tls-cert", str(pki["client.crt"]),
                         "--tls-key", str(pki["client.key"])]) == 0
        assert "prefix-proj" in capsys.readouterr().out
    finally:
        d.stop()


def test_tls_misconfiguration_stops_start_up(tiny_model_dir, served_root, pki, tmp_path):
    with pytest.raises(ValueError, match="go together"):
        ServerConfig(base=tiny_model_dir, adapters=served_root, tls_cert=pki["server.crt"])
    (tmp_path / "empty.pem").write_text("")
    config = ServerConfig(base=tiny_model_dir, adapters=served_root, quantization="none", port=0,
                          device=TEST_DEVICE, tls_cert=pki["server.crt"], tls_key=tmp_path / "empty.pem")
    with pytest.raises(ValueError, match="--tls-key .*not a PEM file"):
        DaemonThread(config).start(load=False)


# --------------------------------------------------------------------------------------------------- limits


def test_concurrent_rpc_limit_and_message_size(tiny_model_dir, served_root):
    d = start_daemon(tiny_model_dir, served_root, max_concurrent_rpcs=2, max_message_bytes=64 * 1024,
                     **ENGINE_IN_TEST_PROCESS)
    target = f"127.0.0.1:{d.port}"
    try:
        with AdapterdClient(target, timeout=120) as c:
            # an oversized message is refused by grpc itself; the daemon goes on serving
            with pytest.raises(grpc.RpcError) as err:
                c.generate("x " * 40_000, max_new_tokens=2)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in err.value.details()
            assert c.generate("hi", max_new_tokens=2).generated_token_count == 2
            streams = [c.generate_stream("hello", max_new_tokens=500, min_new_tokens=500) for _ in range(2)]
            for s in streams:
                next(s)  # both in flight: the limit is reached
            with pytest.raises(grpc.RpcError) as err:
                c.generate("hi", max_new_tokens=2)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "concurrent rpc limit" in err.value.details().lower()
            for s in streams:
                s.cancel()
            deadline = time.monotonic() + 30
            while True:  # the slots free as the cancellations land
                try:
                    assert c.generate("hi", max_new_tokens=2).generated_token_count == 2
                    break
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                    time.sleep(0.05)
    finally:
        d.stop()
