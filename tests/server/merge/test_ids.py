"""Adapter id checks: malformed ids and ids that escape the root are refused, naming the field."""

from __future__ import annotations

import os

import pytest

from adapterd.server.adapters.ids import resolve_adapter_dir
from adapterd.server.errors import InvalidArgument, NotFound


@pytest.fixture
def root(tmp_path):
    (tmp_path / "root" / "team" / "a").mkdir(parents=True)
    (tmp_path / "root" / "team" / "a" / "adapter_config.json").write_text("{}")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "adapter_config.json").write_text("{}")
    os.symlink(tmp_path / "outside", tmp_path / "root" / "escape")
    return tmp_path / "root"


def test_valid_nested_id(root):
    assert resolve_adapter_dir(root, "team/a", "adapters[0].adapter_id") == (root / "team" / "a").resolve()


@pytest.mark.parametrize("bad", ["", "/etc", "../outside", "team/../../outside", "team//a", "./team/a",
                                 ".hidden", "team/a/", "a b", "a:b", "x" * 300])
def test_malformed_ids_are_invalid_argument(root, bad):
    with pytest.raises(InvalidArgument) as err:
        resolve_adapter_dir(root, bad, "adapters[2].adapter_id")
    assert err.value.field == "adapters[2].adapter_id"


def test_symlink_out_of_root_is_refused(root):
    with pytest.raises(InvalidArgument, match="outside the adapter root"):
        resolve_adapter_dir(root, "escape", "adapters[0].adapter_id")


def test_missing_adapter_is_not_found(root):
    with pytest.raises(NotFound) as err:
        resolve_adapter_dir(root, "team/b", "adapters[1].adapter_id")
    assert err.value.field == "adapters[1].adapter_id"
    with pytest.raises(NotFound):  # a directory that holds no adapter
        resolve_adapter_dir(root, "team", "adapters[0].adapter_id")


def test_output_id_may_be_absent(root):
    path = resolve_adapter_dir(root, "new/one", "output_adapter_id", must_exist=False)
    assert path == (root / "new" / "one").resolve()
