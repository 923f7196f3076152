"""The stub generator's check: it names the stale file and shows the change, and the generator it needs is the one
that made the committed stubs (a patch release of grpcio-tools rewrites their version line)."""

from __future__ import annotations

import re
import shutil
import tomllib
from pathlib import Path

from adapterd.common import protogen

REPO = Path(__file__).resolve().parents[2]


def test_check_names_a_stale_stub_and_prints_the_changed_line(tmp_path, monkeypatch, capsys):
    shutil.copytree(REPO / "proto", tmp_path / "proto")
    stub = tmp_path / "proto" / "adapterd" / "v1" / "adapterd_pb2_grpc.py"
    stub.write_text(stub.read_text().replace("GRPC_GENERATED_VERSION = '", "GRPC_GENERATED_VERSION = '0.0.0+", 1))
    monkeypatch.setattr(protogen, "REPO", tmp_path)
    monkeypatch.setattr(protogen, "PROTO_ROOT", tmp_path / "proto")

    assert protogen.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert "proto/adapterd/v1/adapterd_pb2_grpc.py" in out
    assert re.search(r"^-GRPC_GENERATED_VERSION = '0\.0\.0\+", out, re.M)
    assert re.search(r"^\+GRPC_GENERATED_VERSION = '\d", out, re.M)

    assert protogen.main([]) == 0  # regenerating repairs it
    assert protogen.main(["--check"]) == 0


def test_the_pinned_generator_is_the_one_that_made_the_committed_stubs():
    dev = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    pins = [d for d in dev if d.startswith("grpcio-tools")]
    assert len(pins) == 1 and "==" in pins[0], f"grpcio-tools must be pinned exactly, found {pins}"
    stub = (REPO / "proto" / "adapterd" / "v1" / "adapterd_pb2_grpc.py").read_text()
    generated = re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'", stub, re.M).group(1)
    assert pins[0].split("==")[1].strip() == generated
