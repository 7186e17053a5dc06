"""The test-split ledger: every look at a dataset's test articles, by any model or rule, counted.

A figure computed on test and then acted on (a recipe changed, a model re-tuned, a rule re-chosen) is no
longer a held-out figure. The ledger makes the looks visible: one JSON line per look, beside the dataset's
manifest (``<out>/test_looks.jsonl``; the committed datasets under ``<out>/datasets/`` are never written
again, so the ledger lives outside them and outlives a re-preprocessing into ``out``), or in one file
several output directories share (``eval.test_ledger``, local or ``s3://``).

Looks are counted per **split key**, one per dump: the dump's file name and the split seed. Those decide
whether an article is test (``kilm_ray.data.corpus.articles.split_of``: a keyed hash below
``test_fraction``, so a smaller test set lies inside a larger one): another tokenizer, chunk length, test
fraction or a second dump beside the first looks at the same test articles again, and counts.

An evaluation states how many earlier looks it knows of (``eval.test_looks_before``, default 0: a first
look); :func:`check_look` refuses it unless the ledger holds exactly that many, naming them. A comparison
of three models declares 0, 1 and 2. A look is counted when it starts (a run that fails half-way may have
shown figures). The demo never refuses: it says which look its line is.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import PurePosixPath
from typing import Any, Optional

from kilm_ray import storage
from kilm_ray.errors import UserInputError

LEDGER = "test_looks.jsonl"


class TestLookRefused(UserInputError):
    """A look at test beyond the looks the caller declared it knows of."""


def split_keys(manifest: dict[str, Any]) -> list[str]:
    """What decides the test articles, one key per dump: its file name and the split seed."""
    seed = ((manifest.get("config") or {}).get("corpus") or {}).get("split_seed", 0)
    names = sorted({PurePosixPath(str(d).rstrip("/")).name for d in manifest.get("dumps") or []})
    return [hashlib.sha256(json.dumps([name, seed]).encode()).hexdigest()[:16] for name in names]


def ledger_path(data_dir: str, override: Optional[str] = None) -> str:
    """``override`` (eval.test_ledger), else ``<out>/test_looks.jsonl`` for ``<out>`` or for a committed
    ``<out>/datasets/<run key>`` whose ``<out>`` holds the current manifest (never inside a commit)."""
    if override:
        return override
    root = str(data_dir).rstrip("/")
    parent, _, _ = root.rpartition("/")
    out, _, name = parent.rpartition("/")
    if name == "datasets" and out and storage.exists(storage.join(out, "manifest.json")):
        return storage.join(out, LEDGER)
    return storage.join(root, LEDGER)


def _ledger_text(path: str) -> str:
    return storage.read_bytes(path).decode() if storage.exists(path) else ""


def _looks_in(text: str, keys: list[str]) -> list[dict[str, Any]]:
    looks = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and set(row.get("split_keys") or []) & set(keys):
            looks.append(row)
    return looks


def read_looks(path: str, keys: list[str]) -> list[dict[str, Any]]:
    """The ledger's looks at the test articles of any of ``keys``, oldest first (a torn line is skipped)."""
    return _looks_in(_ledger_text(path), keys)


def describe_look(look: dict[str, Any]) -> str:
    return f"{look.get('time')} {look.get('what')} (step {look.get('step')}, {look.get('by')})"


def check_look(earlier: list[dict[str, Any]], declared: int, path: str) -> None:
    """Refuse a look unless the ledger holds exactly the earlier looks the caller declared it knows of."""
    if len(earlier) == declared:
        return
    if len(earlier) < declared:
        raise TestLookRefused(f"eval.test_looks_before={declared}, but {path} holds {len(earlier)} look(s) at these "
                              f"test articles: declare what happened (eval.test_looks_before={len(earlier)})")
    shown = "; ".join(describe_look(r) for r in earlier[-5:])
    raise TestLookRefused(
        f"the test articles of this dataset were looked at {len(earlier)} time(s) already ({path}: {shown}), and "
        f"this evaluation declares {declared}. A test figure read after others were acted on is not held out: choose "
        "on --split valid. To look again knowingly, pass eval.test_looks_before="
        f"{len(earlier)}; the look is counted and printed in the report.")


def record_look(path: str, keys: list[str], what: str, by: str, step: Any = None, **facts: Any) -> dict[str, Any]:
    """Add one look (the file replaced whole and atomically: a kill mid-write leaves the old ledger);
    returns it with ``look`` = its number among the looks at these test articles (1 = first)."""
    from kilm_ray.data.stages import write_bytes_atomic

    old = _ledger_text(path)
    if old and not old.endswith("\n"):
        old += "\n"  # a torn line stays a line of its own
    look = {"split_keys": keys, "what": what, "by": by, "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **facts}
    write_bytes_atomic(path, (old + json.dumps(look) + "\n").encode())
    return {**look, "look": len(_looks_in(old, keys)) + 1, "ledger": path}


def look_line(look: dict[str, Any]) -> str:
    """How a report or the demo names a look."""
    n = look.get("look")
    nth = "the first" if n == 1 else f"look {n}"
    return f"{nth} at this split's test articles (every look is in {look.get('ledger')})"
