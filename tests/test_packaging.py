"""The package's shape: stubs in step with the proto, one import root, every sub-package listed."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_fresh():
    result = subprocess.run([sys.executable, "-m", "adapterd.protogen", "--check"], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_package_folder_is_listed_under_the_adapterd_root():
    conf = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, dirs = set(conf["packages"]), conf["package-dir"]
    assert all(name == "adapterd" or name.startswith("adapterd.") for name in listed)
    found = set()
    for package, folder in dirs.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([package, *rel.parts]))
    assert found == listed
