"""Installing the GPU proof's wheel folder where pip is missing (bench/gpu_check.sh uses pip when it can)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def unpack_wheels(wheels: Path, target: Path) -> None:
    """Extract the requirements' wheels that fit this interpreter into ``target``: what pip --target does
    for these packages, except console scripts (ninja's: only DeepSpeed's CPU JIT builds call it)."""
    import zipfile

    from packaging.tags import sys_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename

    wanted = {canonicalize_name(line.split("==")[0]): line.split("==")[1].strip()
              for line in (wheels / "requirements.txt").read_text().splitlines() if "==" in line and not line.startswith("#")}
    supported = list(sys_tags())
    chosen: dict = {}
    for whl in wheels.glob("*.whl"):
        name, version, _, tags = parse_wheel_filename(whl.name)
        if name not in wanted or str(version) != wanted[name]:
            continue
        rank = min((supported.index(t) for t in tags if t in supported), default=None)
        if rank is not None and (name not in chosen or rank < chosen[name][0]):
            chosen[name] = (rank, whl)
    missing = sorted(set(wanted) - set(chosen))
    if missing:
        raise SystemExit(f"no wheel in {wheels} fits this Python for {missing}")
    target.mkdir(parents=True, exist_ok=True)
    for _, whl in chosen.values():
        with zipfile.ZipFile(whl) as z:
            z.extractall(target)


def restore_mtimes(wheels: Path, target: Path) -> int:
    """Give installed files the times recorded in their wheels (pip stamps them with the install time).
    Reinstalling the same DeepSpeed then leaves the sources of the op it JIT-builds on a CPU unchanged in
    ninja's eyes, so the op built once (about 25 s) is not rebuilt; on a GPU nothing is JIT-built."""
    import zipfile

    touched = 0
    for whl in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            for info in z.infolist():
                path = target / info.filename
                if not info.is_dir() and path.is_file():
                    stamp = time.mktime(info.date_time + (0, 0, -1))
                    os.utime(path, (stamp, stamp))
                    touched += 1
    return touched
