"""The last step of docker/Dockerfile and docker/Dockerfile.cpu: fail the build unless the image holds what
cluster.yaml and deploy/k8s expect of it.

    python check_image.py --variant gpu|cpu --ray 2.60.0 --torch 2.13.0 --torch-cuda 12.6 \
        --deepspeed 0.19.8 --transformers 5.25.0

- Python 3.11, and Ray, PyTorch, DeepSpeed and transformers at exactly the pinned versions (pip did not
  move the base image's Ray, nor replace the CUDA 12.6 build of torch with PyPI's default one).
- GPU: torch is the CUDA build named, with machine code for V100 (sm_70) and H100 (sm_90). The build
  machine has no GPU: ``torch.cuda.get_arch_list()`` reads the list compiled into the build and needs none
  (it is empty only for a build without CUDA).
- DeepSpeed, transformers, Ray Train / Data / Serve and kilm_ray's CLI import.
- CPU: torch has no CUDA.
- kilm_ray imports, accepts this DeepSpeed (``kilm_ray.train.zero.check_version``) and its ``kilm-ray``
  command is on PATH (cluster.yaml starts ``kilm-ray spot-watch`` on every worker node).

Prints one JSON line; exits 1 naming every problem. tests/test_image.py runs it against the project's own
environment (the CPU variant) and with fake builds.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
from importlib import metadata
from typing import Callable, Optional, Sequence

# V100 (the v100_spot nodes, fp16) and H100 (the h100 nodes, bf16): each needs machine code of its own.
GPU_ARCHES = ((7, 0), (9, 0))
# What a job imports first (a missing dependency of any fails here, not on a node).
IMPORTS = ("deepspeed", "transformers", "ray.train.torch", "ray.data", "ray.serve", "kilm_ray.cli")


def torch_arch_flags() -> list[str]:
    import torch

    return list(torch.cuda.get_arch_list())


def problems(args: argparse.Namespace, version: Callable[[str], str] = metadata.version,
             python: Sequence[int] = sys.version_info[:2], torch_cuda: Optional[str] = None,
             arch_flags: Optional[list[str]] = None, on_path: Callable[[str], Optional[str]] = shutil.which,
             load: Callable[[str], object] = importlib.import_module) -> list[str]:
    from kilm_ray.train.gpu_arch import kernel_support

    found: list[str] = []
    if tuple(python) != (3, 11):
        found.append(f"Python {'.'.join(map(str, python))}, not 3.11 (the py311 Ray image)")
    for name, wanted in (("ray", args.ray), ("deepspeed", args.deepspeed), ("transformers", args.transformers)):
        have = version(name)
        if have != wanted:
            found.append(f"{name} {have} installed, {wanted} pinned")
    have_torch = version("torch")
    public, _, local = have_torch.partition("+")
    if public != args.torch:
        found.append(f"torch {have_torch} installed, {args.torch} pinned")
    if args.variant == "gpu":
        if torch_cuda != args.torch_cuda:
            found.append(f"torch {have_torch} is built for CUDA {torch_cuda}, not {args.torch_cuda} "
                         "(the CUDA 12.6 build carries V100 kernels; CUDA 13 builds do not)")
        for capability in GPU_ARCHES:
            verdict, _entry = kernel_support(capability, arch_flags or [])
            if verdict != "native":
                found.append(f"torch {have_torch} has no sm_{capability[0]}{capability[1]} machine code "
                             f"(its arch list: {' '.join(arch_flags or []) or 'none'})")
    else:
        if torch_cuda is not None or (local and local != "cpu"):
            found.append(f"torch {have_torch} (CUDA {torch_cuda}) is a CUDA build: the CPU image takes the CPU one")
    try:
        from kilm_ray.train.zero import check_version

        check_version(version("deepspeed"))
    except Exception as exc:  # UntestedDeepSpeed, or kilm_ray missing
        found.append(f"kilm_ray refuses this DeepSpeed: {exc}")
    for module in IMPORTS:
        try:
            load(module)
        except Exception as exc:
            found.append(f"import {module} fails: {type(exc).__name__}: {exc}")
    if not on_path("kilm-ray"):
        found.append("the kilm-ray command is not on PATH (cluster.yaml's spot watcher needs it)")
    return found


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", choices=("gpu", "cpu"), required=True)
    p.add_argument("--ray", required=True)
    p.add_argument("--torch", required=True)
    p.add_argument("--torch-cuda", default="", help="the CUDA version of the GPU image's torch build (e.g. 12.6)")
    p.add_argument("--deepspeed", required=True)
    p.add_argument("--transformers", required=True)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    import torch

    flags = torch_arch_flags()
    found = problems(args, torch_cuda=torch.version.cuda, arch_flags=flags)
    print(json.dumps({"variant": args.variant, "python": sys.version.split()[0], "torch": torch.__version__,
                      "cuda": torch.version.cuda, "arch_list": flags, "ok": not found, "problems": found}))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
