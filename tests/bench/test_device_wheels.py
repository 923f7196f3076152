"""bench/device_wheels.sh, run as the NOTES tell a session to before its first device call: the carried wheels
at this venv's versions for the GPU image's platform, bitsandbytes cut to its CUDA 13 library."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def run(tmp_path: Path, **env_extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WHEEL_DIR": str(tmp_path / "whl"), "VENV_PYTHON": sys.executable, **env_extra}
    return subprocess.run(["bash", str(REPO / "bench" / "device_wheels.sh")], capture_output=True, text=True,
                          timeout=600, env=env, cwd=REPO)


def fake_bitsandbytes(path: Path) -> None:
    """A wheel laid out as bitsandbytes' is: one library a backend, each in RECORD."""
    libs = ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda118.so", "libbitsandbytes_cuda126.so",
            "libbitsandbytes_cuda130.so", "libbitsandbytes_rocm63.so", "libbitsandbytes_xpu.so"]
    files = {f"bitsandbytes/{lib}": b"\x7fELF" for lib in libs} | {"bitsandbytes/__init__.py": b""}
    record = "".join(f"{name},sha256=x,{len(data)}\n" for name, data in files.items())
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr("bitsandbytes-0.50.2.dist-info/RECORD", record + "bitsandbytes-0.50.2.dist-info/RECORD,,\n")


def test_downloads_the_venvs_versions_for_the_image_and_slims_bitsandbytes(tmp_path):
    (tmp_path / "whl").mkdir()
    bnb = tmp_path / "whl" / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    fake_bitsandbytes(bnb)  # as a download would have left it (the real one is 43 MB)
    done = run(tmp_path, WHEEL_PACKAGES="googleapis-common-protos", OPTIONAL_WHEELS="")
    assert done.returncode == 0, done.stderr[-2000:]
    version = importlib.metadata.version("googleapis-common-protos")
    assert (tmp_path / "whl" / f"googleapis_common_protos-{version}-py3-none-any.whl").is_file(), done.stdout
    with zipfile.ZipFile(bnb) as wheel:
        names = set(wheel.namelist())
        record = wheel.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert {"bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda130.so"} <= names
    assert not any(key in name for name in names | set(record.splitlines()) for key in ("cuda118", "cuda126", "rocm",
                                                                                        "xpu"))
    assert "bitsandbytes/libbitsandbytes_cuda130.so," in record
    assert not list((tmp_path / "whl").glob("*.part"))


def test_a_package_missing_from_the_venv_stops_it_before_any_download(tmp_path):
    done = run(tmp_path, WHEEL_PACKAGES="googleapis-common-protos no-such-package-adapterd", OPTIONAL_WHEELS="")
    assert done.returncode != 0
    assert "no-such-package-adapterd is not installed in the venv" in done.stderr
    assert not list((tmp_path / "whl").glob("*.whl"))
