"""An adapter's chat template is read like its other files: confined to the root, a regular file, bounded,
and damage named (never a server path)."""

from __future__ import annotations

import json
import os

import pytest

from adapterd.server.adapters.files import MAX_TEMPLATE_BYTES, read_chat_template
from adapterd.server.errors import DataLoss, FailedPrecondition


@pytest.fixture
def adapter(tmp_path):
    path = tmp_path / "root" / "a"
    path.mkdir(parents=True)
    return tmp_path / "root", path


def test_jinja_file_first_then_tokenizer_config_then_none(adapter):
    root, path = adapter
    assert read_chat_template(root, path) is None
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from config"}))
    assert read_chat_template(root, path) == "from config"
    (path / "chat_template.jinja").write_text("from jinja", encoding="utf-8")
    assert read_chat_template(root, path) == "from jinja"


def test_bad_template_files_are_refused_by_name(adapter, tmp_path):
    root, path = adapter
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": 3}))
    with pytest.raises(FailedPrecondition, match="tokenizer_config.json: chat_template must be a string"):
        read_chat_template(root, path)
    (path / "chat_template.jinja").write_bytes(b"\xff\xfe")
    with pytest.raises(DataLoss, match="chat_template.jinja is not UTF-8"):
        read_chat_template(root, path)
    (path / "chat_template.jinja").write_text("x" * (MAX_TEMPLATE_BYTES + 1))
    with pytest.raises(FailedPrecondition, match="larger than"):
        read_chat_template(root, path)
    (path / "chat_template.jinja").unlink()
    outside = tmp_path / "secret.jinja"
    outside.write_text("{{ 1 }}")
    os.symlink(outside, path / "chat_template.jinja")
    with pytest.raises(FailedPrecondition, match="resolves outside the adapter root") as err:
        read_chat_template(root, path)
    assert str(tmp_path) not in str(err.value)
    (path / "chat_template.jinja").unlink()
    os.mkfifo(path / "chat_template.jinja")  # opening a FIFO would block: refused unopened
    with pytest.raises(FailedPrecondition):
        read_chat_template(root, path)
