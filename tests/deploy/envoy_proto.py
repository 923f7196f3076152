"""deploy/envoy/envoy.yaml read as Envoy reads it, with Envoy's own API protos (PyPI's ``xds-protos``, generated
from envoyproxy/data-plane-api): the YAML parsed into the v3 ``Bootstrap`` message by protobuf's JSON mapping,
strictly (an unknown or misspelt field, a wrong type, an unknown enum name or an ``@type`` no proto defines
fails), then walked for what the parse lets through and Envoy refuses or warns about: fields and enum values
its protos mark deprecated, and message fields its protoc-gen-validate rules mark required.

What this does not check (only the envoy binary's ``--mode validate`` would): the other protoc-gen-validate
rules (lengths, ranges, patterns: PyPI's protoc-gen-validate runtime does not run on protobuf 7), rules that
live in Envoy's C++ code (a route naming a cluster that exists, extension names, regex syntax), and whether
the DNS name resolves."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from typing import Any

from envoy.config.bootstrap.v3 import bootstrap_pb2
from google.protobuf import any_pb2, json_format, message, symbol_database
from google.protobuf.descriptor import FieldDescriptor
from validate import validate_pb2


def _type_urls(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from ([value] if key == "@type" else _type_urls(value))
    elif isinstance(node, list):
        for value in node:
            yield from _type_urls(value)


def import_types(config: dict) -> None:
    """Register every ``@type`` the config names: each lives in a module of the package its full name starts
    with (``envoy.extensions.filters.http.router.v3.Router`` in ``envoy/extensions/filters/http/router/v3/``)."""
    for url in _type_urls(config):
        package = url.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        try:
            module = importlib.import_module(package)
        except ModuleNotFoundError:
            continue  # no such package: the parse then fails naming the type URL
        for info in pkgutil.iter_modules(module.__path__):
            if info.name.endswith("_pb2"):
                importlib.import_module(f"{package}.{info.name}")


def parse_bootstrap(config: dict) -> bootstrap_pb2.Bootstrap:
    """The config as Envoy's Bootstrap; raises ``json_format.ParseError`` naming what does not fit."""
    import_types(config)
    return json_format.ParseDict(config, bootstrap_pb2.Bootstrap(), ignore_unknown_fields=False)


def _unpacked(value: any_pb2.Any) -> message.Message:
    name = value.TypeName()
    inner = symbol_database.Default().GetSymbol(name)()
    value.Unpack(inner)
    return inner


def _children(msg: message.Message, path: str) -> Iterator[tuple[FieldDescriptor, Any, str]]:
    for field, value in msg.ListFields():
        where = f"{path}.{field.name}"
        if field.is_repeated and not (field.message_type and field.message_type.GetOptions().map_entry):
            for index, item in enumerate(value):
                yield field, item, f"{where}[{index}]"
        else:
            yield field, value, where


def problems(msg: message.Message, path: str = "bootstrap") -> list[str]:
    """Deprecated fields or enum values set, required message fields missing, anywhere in ``msg`` (typed
    configs included)."""
    found = []
    for field in msg.DESCRIPTOR.fields:
        rules = field.GetOptions().Extensions[validate_pb2.rules]
        # A member of a oneof is required only as the member chosen (a route's match is a path, a prefix
        # or a regex); whether one must be chosen is the oneof's own rule, below.
        if rules.message.required and field.containing_oneof is None and not msg.HasField(field.name):
            found.append(f"{path}.{field.name}: required")
    for oneof in msg.DESCRIPTOR.oneofs:
        if oneof.GetOptions().Extensions[validate_pb2.required] and msg.WhichOneof(oneof.name) is None:
            found.append(f"{path}.{oneof.name}: one of {', '.join(f.name for f in oneof.fields)} required")
    for field, value, where in _children(msg, path):
        if field.GetOptions().deprecated:
            found.append(f"{where}: deprecated field")
        if field.enum_type is not None and field.enum_type.values_by_number[value].GetOptions().deprecated:
            found.append(f"{where}: deprecated value {field.enum_type.values_by_number[value].name}")
        if isinstance(value, any_pb2.Any):
            found += problems(_unpacked(value), where)
        elif isinstance(value, message.Message):
            found += problems(value, where)
    return found
