"""Adapter ids are confined to the adapter root."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterd.server.adapters.ids import discover_adapter_ids, resolve_adapter_dir, validate_adapter_id
from adapterd.server.errors import InvalidArgument, NotFound


@pytest.fixture()
def root(tmp_path):
    for name in ("a", "team/b", "team/c.v2"):
        (tmp_path / "root" / name).mkdir(parents=True)
        (tmp_path / "root" / name / "adapter_config.json").write_text("{}")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "adapter_config.json").write_text("{}")
    return tmp_path / "root"


def test_resolves_nested_ids(root):
    assert resolve_adapter_dir(root, "team/b") == (root / "team" / "b").resolve()
    assert discover_adapter_ids(root) == ["a", "team/b", "team/c.v2"]


@pytest.mark.parametrize("bad", ["", "..", "../secret", "team/../../secret", "/etc", "a//b", "a/", "./a",
                                 "a b", "a\\b", "a\x00", "é", "x" * 300])
def test_malformed_ids_are_invalid(root, bad):
    with pytest.raises(InvalidArgument) as err:
        resolve_adapter_dir(root, bad, field="adapters[1].adapter_id")
    assert err.value.field == "adapters[1].adapter_id"


def test_missing_is_not_found(root):
    with pytest.raises(NotFound):
        resolve_adapter_dir(root, "team")  # a folder, but no adapter_config.json


def test_symlinks_may_not_leave_the_root(root):
    os.symlink(root.parent / "secret", root / "escape")
    os.symlink(root / "a", root / "alias")
    with pytest.raises(InvalidArgument):
        resolve_adapter_dir(root, "escape")
    assert resolve_adapter_dir(root, "alias") == (root / "a").resolve()
    assert "escape" not in discover_adapter_ids(root)
    assert "alias" in discover_adapter_ids(root)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_any_text_resolves_inside_the_root_or_is_refused(tmp_path_factory, text):
    root = tmp_path_factory.getbasetemp() / "prop-root"
    root.mkdir(exist_ok=True)
    try:
        path = resolve_adapter_dir(root, text)
    except (InvalidArgument, NotFound):
        return
    assert root.resolve() in path.parents
    validate_adapter_id(text)
