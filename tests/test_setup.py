"""scripts/install_torch.sh (run by scripts/setup.sh) chooses PyTorch's build by the machine: without a GPU
a CPU build, from PyTorch's CPU index when the configured index would bring a CUDA build, and it says
which it chose. Real pip against local package indexes holding stand-in torch wheels (a CUDA one that
needs nvidia-* packages, a `+cpu` one), in a fresh virtual environment."""

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO


def stand_in_wheel(index: Path, version: str, cuda) -> None:
    """A wheel named torch at ``version`` whose import reports ``torch.version.cuda``, in a PEP 503 index."""
    files = {"torch/__init__.py": f"__version__ = {version!r}\nclass version:\n    cuda = {cuda!r}\n"}
    info = f"torch-{version}.dist-info"
    requires = "Requires-Dist: nvidia-cublas-cu13; extra == 'never'\n" if cuda else ""
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n{requires}"
    files[f"{info}/WHEEL"] = "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = [f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(text.encode())}" for name, text in files.items()]
    files[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]) + "\n"
    name = f"torch-{version}-py3-none-any.whl"
    (index / "torch").mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(index / "torch" / name, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    (index / "torch" / "index.html").write_text(f'<html><body><a href="{name}">{name}</a></body></html>')


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    root = tmp_path_factory.mktemp("setup")
    stand_in_wheel(root / "cuda-index", "2.13.0+cu130", "13.0")
    stand_in_wheel(root / "cpu-index", "2.13.0+cpu", None)
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: Stand-in H100 (UUID: GPU-0)'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    return root


def run(sandbox: Path, configured: str, gpu: bool = False) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=(sandbox / configured).as_uri(), PIP_NO_CACHE_DIR="1",
               TORCH_CPU_INDEX_URL=(sandbox / "cpu-index").as_uri(),
               PATH=(f"{sandbox / 'bin'}:" if gpu else "") + "/usr/bin:/bin")
    subprocess.run([str(sandbox / "venv" / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", "torch"], env=env)
    done = subprocess.run(["bash", str(REPO / "scripts" / "install_torch.sh"), str(sandbox / "venv")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_no_gpu_and_a_cuda_default_index_takes_pytorchs_cpu_index(sandbox):
    line = run(sandbox, "cuda-index")
    assert line.startswith("torch 2.13.0+cpu (CPU build): no GPU found and the configured index offers a CUDA "
                           "build (2.13.0+cu130), so PyTorch's CPU index"), line


def test_no_gpu_and_a_cpu_wheel_at_hand_takes_it(sandbox):
    line = run(sandbox, "cpu-index")  # as on this machine: `pip install torch==2.13.0` finds a local +cpu wheel
    assert line.startswith("torch 2.13.0+cpu (CPU build): no GPU found; the configured index has a CPU build"), line


def test_a_gpu_takes_the_configured_indexs_build(sandbox):
    line = run(sandbox, "cuda-index", gpu=True)
    assert line.startswith("torch 2.13.0+cu130 (CUDA 13.0 build): a GPU is present (GPU 0: Stand-in H100"), line
