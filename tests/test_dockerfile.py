"""The Dockerfile and its lock (no Docker engine runs here): the image installs every package from
deploy/requirements-gpu.lock, which pins every pyproject dependency inside its range at the versions the GPU
tests ran on, each with hashes; the base image's CUDA is the one the locked torch is built for; the image has
what Triton compiles its launcher with; it runs as a non-root user, and its HEALTHCHECK command works."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from adapterd.server.app import DaemonThread
from adapterd.server.config import ServerConfig
from tests.helpers import TEST_DEVICE

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = (REPO / "Dockerfile").read_text()
LOCK = (REPO / "deploy" / "requirements-gpu.lock").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# What each Ubuntu base ships: its python3 (the lock's --python-version) and glibc (its manylinux tag).
UBUNTU = {"24.04": ("3.12", "2_39"), "22.04": ("3.10", "2_35")}


def _locked() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, sha256 hashes) for every package in the lock."""
    entries = {}
    for block in re.split(r"\n(?=[a-z0-9])", LOCK):
        pin = re.match(r"([a-z0-9][a-z0-9._-]*)==(\S+)", block)
        if pin:
            entries[pin[1]] = (pin[2], re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return entries


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "deploy" / "constraints-gpu.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def _base_image() -> re.Match:
    match = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.(\d+)-(?:cudnn-)?runtime-ubuntu(\d+\.\d+)\s*$",
                      DOCKERFILE, re.M)
    assert match, "the image must start from an nvidia/cuda runtime tag"
    return match


def test_every_entry_is_pinned_with_hashes():
    locked = _locked()
    assert len(locked) > 40, "the lock holds the whole tree (torch alone brings ~20 packages)"
    pins = [line for line in LOCK.splitlines() if line[:1].isalnum()]
    assert len(pins) == len(locked), "every line that is not a hash or a comment is one exact pin"
    for name, (version, hashes) in locked.items():
        Version(version)  # an exact version, not a range
        assert hashes, f"{name} has no hash"


def test_every_dependency_is_locked_inside_its_range_at_the_tested_version():
    """pyproject's dependencies, the server extra and the build requirements are all locked, inside their
    ranges; the versions the GPU tests ran on (deploy/constraints-gpu.txt) are the locked ones."""
    locked = _locked()
    project = PYPROJECT["project"]
    specs = project["dependencies"] + project["optional-dependencies"]["server"] + PYPROJECT["build-system"]["requires"]
    for spec in specs:
        req = Requirement(spec)
        name = re.sub(r"[-_.]+", "-", req.name.lower())
        assert name in locked, f"{req.name} is not in the lock"
        assert req.specifier.contains(locked[name][0]), f"{req.name}=={locked[name][0]} vs {req}"
    for name, version in _constraints().items():
        assert locked[name][0] == version, f"lock has {name}=={locked[name][0]}, constraints-gpu.txt {version}"


def test_base_image_cuda_is_the_one_torch_is_built_for():
    """torch's PyPI wheels bring their CUDA as nvidia-* packages: the CUDA runtime's version (and the
    toolkit's) must match the base image's CUDA, and the -cuXX packages its major version."""
    image = _base_image()
    major, minor, patch = image[1], image[2], image[3]
    locked = _locked()
    assert "torch" in locked and "nvidia-cuda-runtime" in locked, "torch from PyPI, with its CUDA packages"
    runtime = Version(locked["nvidia-cuda-runtime"][0])
    assert (runtime.major, runtime.minor) == (int(major), int(minor)), f"cudart {runtime} vs image {image[0]}"
    if "cuda-toolkit" in locked:
        assert locked["cuda-toolkit"][0] == f"{major}.{minor}.{patch}", "the image's CUDA release"
    for name in locked:
        suffix = re.search(r"-cu(\d+)$", name)
        assert suffix is None or suffix[1] == major, f"{name} is built for another CUDA major version"


def test_lock_is_resolved_for_the_images_python_and_platform():
    """scripts/lock resolves for the Python and glibc of the base image's Ubuntu, wheels only, with hashes;
    the lock says scripts/lock made it."""
    python, glibc = UBUNTU[_base_image()[4]]
    script = (REPO / "scripts" / "lock").read_text()
    assert f"--python-version {python}" in script and f"--python-platform x86_64-manylinux_{glibc}" in script
    assert "--only-binary :all:" in script and "--generate-hashes" in script and "uv pip compile" in script
    assert re.search(r"^#\s+scripts/lock$", LOCK, re.M), "regenerate the lock with scripts/lock"


def test_image_installs_from_the_lock_and_runs_unprivileged():
    assert "COPY deploy/requirements-gpu.lock " in DOCKERFILE
    install = re.search(r"pip install --require-hashes --only-binary :all: -r deploy/requirements-gpu\.lock",
                        DOCKERFILE)
    assert install, "every package from the lock, hashes checked"
    assert re.search(r"pip install --no-deps --no-build-isolation \.", DOCKERFILE), "adapterd alone after it"
    assert len(re.findall(r"pip install", DOCKERFILE)) == 2, "nothing installed outside the lock"
    setuptools = PYPROJECT["tool"]["setuptools"]
    mapped = setuptools["package-dir"]
    # the top-level folder of every shipped package: proto/ for adapterd.v1, server/ for adapterd.server.engine
    folders = {mapped[p].split("/")[0] if p in mapped else p.split(".")[1] for p in setuptools["packages"] if "." in p}
    assert {"proto", "server", "trainer", "clients", "cli", "common"} <= folders
    for folder in folders:
        assert re.search(rf"^COPY {folder} ", DOCKERFILE, re.M), folder
    user = re.search(r"^USER (\S+)", DOCKERFILE, re.M)
    assert user and user[1] not in ("root", "0")
    assert re.search(r'^VOLUME \["/srv/adapters", "/srv/runs", "/srv/cache"\]', DOCKERFILE, re.M)
    assert re.search(r'HEALTHCHECK .*\n\s+CMD \["adapterd", "health"', DOCKERFILE)


def triton_cache_dir() -> str:
    """The image's TRITON_CACHE_DIR (its ENV line)."""
    return re.search(r"^ENV TRITON_CACHE_DIR=(\S+)$", DOCKERFILE, re.M)[1]


def test_the_kernel_cache_is_on_a_volume_the_daemons_user_owns():
    """Triton's compiled kernels and tuning choices outlive the container (a fresh start compiles and tunes every
    shape, ~2 min on an H200): TRITON_CACHE_DIR lies under a VOLUME, made and owned by the image's user before
    ``USER`` (a named volume starts as a copy of it, so the unprivileged daemon can write there)."""
    cache = triton_cache_dir()
    volumes = json.loads(re.search(r"^VOLUME (\[.*\])$", DOCKERFILE, re.M)[1])
    assert any(cache.startswith(volume.rstrip("/") + "/") for volume in volumes), (cache, volumes)
    setup = re.search(r"^RUN useradd [^\n]*(?:\n [^\n]*)*", DOCKERFILE, re.M)[0]
    assert re.search(rf"mkdir -p [^\n]*{re.escape(cache)}(\s|$)", setup), setup
    assert re.search(rf"chown adapterd:adapterd [^\n]*{re.escape(cache)}(\s|$)", setup), setup
    assert DOCKERFILE.index(setup) < DOCKERFILE.index("\nUSER adapterd") < DOCKERFILE.index("ENV TRITON_CACHE_DIR")


@pytest.mark.parametrize("image_triton", [False, True], ids=["venv-triton", "gpu-image-triton"])
def test_triton_caches_where_the_image_says(image_triton, tmp_path):
    """The variable the image sets is the one Triton reads, under this venv's Triton and the GPU image's (3.6)."""
    image_site = REPO / ".venv" / "gpu-image-triton"
    if image_triton and not image_site.is_dir():
        pytest.skip("no .venv/gpu-image-triton (scripts/setup puts the GPU image's Triton there on x86_64 Linux)")
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    if image_triton:
        env["PYTHONPATH"] = str(image_site)
    code = ("import triton; from triton.runtime.cache import get_cache_manager; "
            "print(triton.__version__, get_cache_manager('0' * 64).cache_dir)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    version, where = done.stdout.split()
    assert version.startswith("3.6") == image_triton
    assert Path(where).parent == tmp_path / "cache"


def test_image_has_what_triton_compiles_its_launcher_with():
    """Triton builds a C launcher with gcc against Python.h at a kernel's first launch."""
    apt = re.search(r"apt-get install [^\n]*", DOCKERFILE)
    assert apt and {"gcc", "libc6-dev", "python3-dev"} <= set(apt[0].split())


def test_dockerignore_keeps_every_copied_path():
    """The build context is only what the image copies (not the multi-GB .venv), and nothing it copies."""
    patterns = [p for p in (REPO / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert patterns[0] == "*"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for source in re.findall(r"^COPY (.+) \S+$", DOCKERFILE, re.M):
        for path in source.split():
            assert path.rstrip("/") in allowed, f"{path} is copied but .dockerignore leaves it out"


def _health(port: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adapterd.cli", "health", "--target", f"127.0.0.1:{port}",
                           "--timeout", "5"], capture_output=True, text=True, timeout=60)


def test_health_command_follows_the_daemon(tiny_model_dir, adapter_root):
    d = DaemonThread(ServerConfig(base=tiny_model_dir, adapters=adapter_root, quantization="none", port=0,
                                  device=TEST_DEVICE, dtype="float32"))
    d.start(load=False)
    try:
        loading = _health(d.port)
        assert loading.returncode == 1 and "NOT_SERVING" in loading.stdout
        d.run(d.daemon.load())
        ready = _health(d.port)
        assert ready.returncode == 0 and "SERVING" in ready.stdout
        port = d.port
    finally:
        d.stop()
    assert _health(port).returncode == 1
