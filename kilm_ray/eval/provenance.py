"""What produced an evaluation's numbers: the source commit, the dataset's manifest, the training run.
How many times the test articles were looked at is the dataset's test ledger (``kilm_ray.eval.ledger``)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Optional



def source_commit() -> dict[str, Any]:
    """The git commit of the kilm_ray source that ran (and whether it had uncommitted changes)."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return {"commit": commit, "uncommitted_changes": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "uncommitted_changes": None}


def data_summary(data_dir: str) -> dict[str, Any]:
    """The preprocessing manifest's identity and sizes (what the model was trained and tested on)."""
    from kilm_ray.store.loader import read_meta

    meta = read_meta(data_dir)
    keep = ("run_key", "created", "dumps", "knowledge", "config_sha256", "tokenizer_sha256", "vocab_size", "samples")
    return {k: meta.get(k) for k in keep}


def training_summary(run_dir: Optional[str]) -> dict[str, Any]:
    """The last logged step of a training run: steps, epochs, losses, wall time."""
    from kilm_ray.eval.report import read_training_log

    if not run_dir:
        return {}
    rows = read_training_log(run_dir)
    if not rows:
        return {"run": run_dir}
    last = rows[-1]
    keys = ("step", "epoch", "train_loss", "train_knowledge_loss", "world_size")
    out = {"run": run_dir, **{k: last[k] for k in keys if k in last},
           "logged_wall_s": round(last.get("time", 0) - rows[0].get("time", 0), 1)}  # first to last log line
    for key in ("valid_loss", "valid_knowledge_loss", "valid_text_loss", "train_text_loss", "description_accuracy"):
        values = [r[key] for r in rows if key in r]
        if values:
            out[f"last_{key}"] = values[-1]
    return out
