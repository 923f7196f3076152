"""The switches a GPU run turns on for the whole suite (``ADAPTERD_TEST_SWITCHES``, tests/conftest.py) are on in
every test, and a name that is not a switch of the server fails the run instead of being ignored."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SWITCHES

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not SWITCHES, reason="no ADAPTERD_TEST_SWITCHES named")
def test_each_named_switch_is_on(named_switches_on):
    for name in named_switches_on:
        module, attribute = name.rsplit(".", 1)
        assert getattr(importlib.import_module(f"adapterd.server.{module}"), attribute) is True, name


def test_a_run_with_a_switch_named_turns_it_on_and_a_wrong_name_fails(subprocess_env):
    pytest.importorskip("triton")
    run = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-o", "addopts=",
           "tests/test_switches.py::test_each_named_switch_is_on"]
    on = subprocess.run(run, cwd=ROOT, capture_output=True, text=True,
                        env={**subprocess_env, "ADAPTERD_TEST_SWITCHES": "adapters.lora_folds.O_PROJ_IN_MATMUL"})
    assert on.returncode == 0 and "1 passed" in on.stdout, on.stdout[-2000:]
    wrong = subprocess.run(run, cwd=ROOT, capture_output=True, text=True,
                           env={**subprocess_env, "ADAPTERD_TEST_SWITCHES": "kernels.int8_shrink.NO_SUCH_SWITCH"})
    assert wrong.returncode != 0 and "NO_SUCH_SWITCH" in wrong.stdout, wrong.stdout[-2000:]
