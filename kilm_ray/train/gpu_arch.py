"""Does this PyTorch build carry kernels for this node's GPU?

A CUDA build of PyTorch ships machine code (``sm_XY``) for a fixed list of GPU architectures and maybe
PTX (``compute_XY``) that the driver compiles at start-up for newer ones. On a GPU it was not built
for, the first kernel fails with "no kernel image is available for execution on the device", long
after a cluster node was set up. ``python -m kilm_ray.train.gpu_arch`` (run by cluster.yaml's node setup)
fails early instead, naming the GPU, the build and the build to install.

Which builds carry Volta (V100, sm_70), from PyTorch's release matrices (RELEASE.md and the
release RFCs, pytorch/pytorch#172352, #178665, #190355, #190385):

- CUDA 13.x builds (13.0, 13.2; PyPI's default wheels from 2.12 on): Turing (sm_75) and newer only.
- CUDA 12.8 builds: Volta up to PyTorch 2.10; dropped from 2.11; no cu128 builds from 2.12 on.
- CUDA 12.6 builds: sm_50, sm_60, sm_70, sm_75, sm_80, sm_86, sm_90 (so one build serves V100 and
  H100 nodes; no Blackwell) in every release through 2.14; 2.15 is proposed to drop CUDA 12.6, and
  with it the last Volta build.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Optional, Sequence

VOLTA_BUILD = ("pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126 "
               "(CUDA 12.6 builds carry sm_50-sm_90 up to PyTorch 2.14; CUDA 13 builds, PyPI's default, and "
               "CUDA 12.8 builds from 2.11 on start at sm_75)")

_ENTRY = re.compile(r"^(sm|compute)_(\d+?)(\d)([a-z]?)$")


def parse_arch(entry: str) -> Optional[tuple[str, int, int, str]]:
    """``"sm_90a"`` -> ``("sm", 9, 0, "a")``; ``"compute_70"`` -> ``("compute", 7, 0, "")``; None if unknown."""
    m = _ENTRY.match(entry.strip())
    if not m:
        return None
    return m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)


def kernel_support(capability: tuple[int, int], arch_list: Sequence[str]) -> tuple[str, str]:
    """How a device of compute ``capability`` runs this build: ``("native", entry)`` (machine code for
    exactly it), ``("compatible", entry)`` (machine code of an older minor of the same major, which
    runs unchanged, e.g. sm_80 on an sm_86), ``("ptx", entry)`` (only PTX of an older architecture:
    the driver JIT-compiles every kernel at start-up, minutes, and the result is untuned) or
    ``("missing", "")``. Arch-specific entries (``sm_90a``) run on exactly that architecture;
    family entries (``sm_100f``) on later minors of their major."""
    major, minor = capability
    best: tuple[tuple[int, int, int], str, str] = ((0, 0, 0), "missing", "")
    for entry in arch_list:
        parsed = parse_arch(entry)
        if parsed is None:
            continue
        kind, a_major, a_minor, suffix = parsed
        if kind == "sm" and (a_major, a_minor) == (major, minor):
            rank, verdict = 3, "native"
        elif kind == "sm" and a_major == major and a_minor < minor and suffix != "a":
            rank, verdict = 2, "compatible"
        elif kind == "compute" and (a_major, a_minor) <= (major, minor) and suffix != "a":
            rank, verdict = 1, "ptx"
        else:
            continue
        key = (rank, a_major, a_minor)  # the closest of several usable entries (sm_86 before sm_80 on an sm_89)
        if key > best[0]:
            best = (key, verdict, entry)
    return best[1], best[2]


def gpu_present() -> bool:
    """An NVIDIA GPU is attached (the driver's device files), whatever torch thinks."""
    return os.path.exists("/proc/driver/nvidia/gpus") and bool(os.listdir("/proc/driver/nvidia/gpus")) \
        or os.path.exists("/dev/nvidia0")


def check() -> dict:
    """Every visible GPU against this torch build: a dict with ``ok`` and, when not ok, ``error``."""
    import torch

    info: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "arch_list": []}
    if not torch.cuda.is_available():
        if gpu_present():
            info.update(ok=False, error=(
                f"this node has an NVIDIA GPU but torch {torch.__version__} (CUDA {torch.version.cuda}) sees no "
                "CUDA device: a CPU-only build, or a driver too old for this CUDA version. For V100 nodes: "
                + VOLTA_BUILD))
        else:
            info.update(ok=True, devices=[], note="no CUDA device: nothing to check")
        return info
    arch_list = list(torch.cuda.get_arch_list())
    info["arch_list"] = arch_list
    devices = []
    for i in range(torch.cuda.device_count()):
        cap = torch.cuda.get_device_capability(i)
        verdict, entry = kernel_support(cap, arch_list)
        devices.append({"index": i, "name": torch.cuda.get_device_name(i), "capability": f"{cap[0]}.{cap[1]}",
                        "arch": f"sm_{cap[0]}{cap[1]}", "support": verdict, "via": entry})
    info["devices"] = devices
    bad = [d for d in devices if d["support"] == "missing"]
    info["ok"] = not bad
    if bad:
        d = bad[0]
        info["error"] = (f"torch {torch.__version__} (CUDA {torch.version.cuda}) has no kernels for GPU {d['index']} "
                         f"{d['name']} ({d['arch']}); this build covers {', '.join(arch_list) or 'nothing'}. "
                         + ("Install " + VOLTA_BUILD if d["arch"] in ("sm_70", "sm_72")
                            else "Install a PyTorch build whose arch list holds it."))
    ptx = [d for d in devices if d["support"] == "ptx"]
    if ptx:
        info["warning"] = (f"{ptx[0]['name']} ({ptx[0]['arch']}) runs this build's PTX ({ptx[0]['via']}) only: the "
                           "driver JIT-compiles kernels at start-up (slow) and they are not tuned for it")
    return info


def main(argv: Optional[Sequence[str]] = None) -> int:
    info = check()
    if info["ok"]:
        devices = info.get("devices") or []
        if info.get("warning"):
            print(f"kilm_ray.train.gpu_arch: WARNING: {info['warning']}", file=sys.stderr)
        if devices:
            for d in devices:
                print(f"kilm_ray.train.gpu_arch: GPU {d['index']} {d['name']} ({d['arch']}): {d['support']} "
                      f"kernels ({d['via']}) in torch {info['torch']} (CUDA {info['cuda']})")
        else:
            print(f"kilm_ray.train.gpu_arch: {info.get('note')}")
        return 0
    print(f"kilm_ray.train.gpu_arch: ERROR: {info['error']}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
