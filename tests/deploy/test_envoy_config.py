"""deploy/envoy/envoy.yaml: a valid v3 Bootstrap by Envoy's own API protos (tests/deploy/envoy_proto.py says
what that covers and what only the envoy binary would), and the routing the design rests on: consistent
hashing on the header adapterd's client sends, retries only on idempotent RPCs and only when the replica did
not serve, no timeout that would cut a generation."""

from __future__ import annotations

import copy
import re

import pytest
from google.protobuf import json_format

from adapterd.clients import ADAPTER_ID_HEADER
from adapterd.v1 import adapterd_pb2 as pb
from tests.deploy.envoy_proto import parse_bootstrap, problems

SERVICE = pb.DESCRIPTOR.services_by_name["Adapterd"]
# RPCs that write (a merge's output, a training run): run twice, they do the work twice.
NOT_IDEMPOTENT = {"MergeAdapter", "StartTraining", "StopTraining"}


def _routes(config: dict) -> list[dict]:
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return manager["route_config"]["virtual_hosts"][0]["routes"]


def test_the_config_is_a_valid_bootstrap(envoy_config):
    bootstrap = parse_bootstrap(envoy_config)
    assert problems(bootstrap) == []
    assert [cluster.name for cluster in bootstrap.static_resources.clusters] == ["adapterd"]


@pytest.mark.parametrize("mistake", ["misspelt field", "unknown type", "unknown package", "wrong enum"])
def test_the_parse_is_strict(envoy_config, mistake):
    config = copy.deepcopy(envoy_config)
    cluster = config["static_resources"]["clusters"][0]
    if mistake == "misspelt field":
        cluster["outlier_detection"]["consecutive_gateway_failures"] = 5
    elif mistake == "unknown type":
        cluster["cluster_type"]["typed_config"]["@type"] = "type.googleapis.com/envoy.extensions.clusters.dns.v3.Dns"
    elif mistake == "unknown package":
        cluster["cluster_type"]["typed_config"]["@type"] = "type.googleapis.com/envoy.extensions.dns.v9.DnsCluster"
    else:
        cluster["lb_policy"] = "RINGHASH"
    with pytest.raises(json_format.ParseError):
        parse_bootstrap(config)


def test_missing_required_fields_and_deprecated_ones_are_reported(envoy_config):
    config = copy.deepcopy(envoy_config)
    del _routes(config)[0]["match"]
    cluster = config["static_resources"]["clusters"][0]
    cluster["dns_refresh_rate"] = "5s"  # Envoy's protos moved it into the DNS cluster extension
    found = problems(parse_bootstrap(config))
    assert any(p.endswith("routes[0].match: required") for p in found), found
    assert any(p.endswith("clusters[0].dns_refresh_rate: deprecated field") for p in found), found


def test_every_route_hashes_on_the_clients_adapter_header(envoy_config):
    assert envoy_config["static_resources"]["clusters"][0]["lb_policy"] == "RING_HASH"
    for route in _routes(envoy_config):
        if "hash_policy" in route["route"]:
            assert route["route"]["hash_policy"] == [{"header": {"header_name": ADAPTER_ID_HEADER}}]
        else:  # a training run's watch names no adapter
            assert route["match"] == {"path": f"/{SERVICE.full_name}/WatchTraining"}


def test_no_route_times_a_generation_out(envoy_config):
    for route in _routes(envoy_config):
        assert route["route"]["timeout"] == "0s"
        assert route["route"]["max_stream_duration"] == {"grpc_timeout_header_max": "0s"}


def test_only_idempotent_rpcs_are_retried_and_only_when_not_served(envoy_config):
    retried = [route for route in _routes(envoy_config) if "retry_policy" in route["route"]]
    assert len(retried) == 1
    regex = retried[0]["match"]["safe_regex"]["regex"]
    methods = set(re.fullmatch(r"\^/adapterd\\\.v1\\\.Adapterd/\((.+)\)\$", regex).group(1).split("|"))
    assert methods <= set(SERVICE.methods_by_name), methods - set(SERVICE.methods_by_name)
    assert not methods & NOT_IDEMPOTENT
    assert {"Generate", "GenerateStream"} <= methods
    assert all(re.fullmatch(regex, f"/{SERVICE.full_name}/{name}") for name in methods)
    assert not re.fullmatch(regex, f"/{SERVICE.full_name}/GenerateStreamX")
    # UNAVAILABLE (draining, loading, an engine restart) or no connection: the replica did not serve it
    conditions = set(retried[0]["route"]["retry_policy"]["retry_on"].split(","))
    assert conditions == {"unavailable", "connect-failure", "refused-stream"}
