"""The test-split ledger: every look at a dataset's test articles, by any model or rule, counted.

A figure computed on test and then acted on (a recipe changed, a model re-tuned, a rule re-chosen) is no
longer a held-out figure. The ledger makes the looks visible: one JSON line per look, appended beside the
dataset's manifest (``<out>/test_looks.jsonl``; the committed datasets under ``<out>/datasets/`` are
never written again, so the ledger lives outside them and outlives a re-preprocessing into ``out``).

Looks are counted per **split key**: the dumps (by file name), the split seed and the test fraction,
which alone decide which articles are test (``kilm_ray.data.corpus.articles.split_of``). Another
tokenizer or chunk length makes another dataset but the same test articles, so it is the same count.

An evaluation states how many earlier looks it knows of (``eval.test_looks_before``, default 0: a first
look); :func:`check_look` refuses it when the ledger holds more, naming each earlier look. A comparison
of three models declares 0, 1 and 2. The demo never refuses: it says which look its line is.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import PurePosixPath
from typing import Any

from kilm_ray import storage
from kilm_ray.errors import UserInputError

LEDGER = "test_looks.jsonl"


class TestLookRefused(UserInputError):
    """A look at test beyond the looks the caller declared it knows of."""


def split_key(manifest: dict[str, Any]) -> str:
    """What decides the test articles: the dumps' file names, the split seed, the test fraction."""
    corpus = (manifest.get("config") or {}).get("corpus") or {}
    dumps = sorted(PurePosixPath(str(d).rstrip("/")).name for d in manifest.get("dumps") or [])
    basis = json.dumps({"dumps": dumps, "split_seed": corpus.get("split_seed", 0),
                        "test_fraction": corpus.get("test_fraction")}, sort_keys=True)
    return hashlib.sha256(basis.encode()).hexdigest()[:16]


def ledger_path(data_dir: str) -> str:
    """``<out>/test_looks.jsonl`` for ``<out>`` or ``<out>/datasets/<run key>`` (never inside a commit)."""
    parts = str(data_dir).rstrip("/").rsplit("/", 2)
    if len(parts) == 3 and parts[1] == "datasets":
        return storage.join(parts[0], LEDGER)
    return storage.join(str(data_dir).rstrip("/"), LEDGER)


def read_looks(path: str, key: str) -> list[dict[str, Any]]:
    """The ledger's looks at the test articles of ``key``, oldest first (a torn last line is skipped)."""
    if not storage.exists(path):
        return []
    looks = []
    for line in storage.read_bytes(path).decode().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("split_key") == key:
            looks.append(row)
    return looks


def describe_look(look: dict[str, Any]) -> str:
    return f"{look.get('time')} {look.get('what')} (step {look.get('step')}, {look.get('by')})"


def check_look(earlier: list[dict[str, Any]], declared: int, path: str) -> None:
    """Refuse a look when the ledger holds more earlier looks than the caller declared it knows of."""
    if len(earlier) <= declared:
        return
    shown = "; ".join(describe_look(r) for r in earlier[-5:])
    raise TestLookRefused(
        f"the test articles of this dataset were looked at {len(earlier)} time(s) already ({path}: {shown}), and "
        f"this evaluation declares {declared}. A test figure read after others were acted on is not held out: choose "
        "on --split valid. To look again knowingly, pass eval.test_looks_before="
        f"{len(earlier)}; the look is counted and printed in the report.")


def record_look(path: str, key: str, what: str, by: str, step: Any = None, **facts: Any) -> dict[str, Any]:
    """Append one look; returns it with ``look`` = its number among this split key's looks (1 = first)."""
    old = storage.read_bytes(path).decode() if storage.exists(path) else ""
    if old and not old.endswith("\n"):
        old += "\n"  # a torn line stays a line of its own
    look = {"split_key": key, "what": what, "by": by, "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **facts}
    storage.write_bytes(path, (old + json.dumps(look) + "\n").encode())
    return {**look, "look": len(read_looks(path, key)), "ledger": path}


def look_line(look: dict[str, Any]) -> str:
    """How a report or the demo names a look."""
    n = look.get("look")
    nth = "the first" if n == 1 else f"look {n}"
    return (f"{nth} at this split's test articles (split key {look.get('split_key')}; every look is in "
            f"{look.get('ledger')})")
