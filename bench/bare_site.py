"""Rehearse the bare GPU machine on this one: a directory of symlinks to only the packages such a
machine has (PyTorch, transformers, tokenizers, safetensors, pyarrow, their dependencies, and pip),
taken from this interpreter's environment.

    python bench/bare_site.py DIR          # prints DIR
    PYTHON="python -S" PYTHONPATH=DIR bench/gpu_check.sh OUT --cpu-smoke

``python -S`` skips site-packages, so with ``PYTHONPATH=DIR`` the process sees the standard library,
these packages and whatever bench/gpu_check.sh installs from the wheel folder: nothing else of this
environment (no Ray, no DeepSpeed, no kilm_ray). A run that passes this way needs nothing beyond the
folder on a machine that has the base packages.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import re
import sys
from pathlib import Path

BASE = ("torch", "transformers", "tokenizers", "safetensors", "pyarrow", "pip")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: tuple[str, ...] = BASE) -> set[str]:
    """Normalized names of ``roots`` and everything they require (markers evaluated here, no extras)."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = _norm(todo.pop())
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # a dependency this platform does not install (e.g. CUDA libraries on a CPU build)
        seen.add(name)
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def build(directory: str | Path, roots: tuple[str, ...] = BASE, exclude: tuple[str, ...] = ()) -> Path:
    """Fill ``directory`` with links to the top-level files of the distributions in ``closure(roots)``,
    leaving out ``exclude`` (e.g. what the wheel folder brings, so that its copies are the ones used)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for name in sorted(closure(roots) - {_norm(e) for e in exclude}):
        dist = md.distribution(name)
        base = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            source, link = base / top, out / top
            if source.exists() and not link.exists() and top not in ("__pycache__", "bin"):
                os.symlink(source, link)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory")
    parser.add_argument("--exclude-requirements", help="a requirements.txt (name==version lines) whose packages "
                        "are left out: the wheel folder's, so the rehearsal uses the folder's copies")
    args = parser.parse_args()
    exclude = ()
    if args.exclude_requirements:
        exclude = tuple(line.split("==")[0].strip() for line in Path(args.exclude_requirements).read_text().splitlines()
                        if line.strip() and not line.startswith("#"))
    print(build(args.directory, exclude=exclude))


if __name__ == "__main__":
    sys.exit(main())
