"""ApposCorpus as published (Kalamkar et al.; the KILM paper's appositive generation task), read into
appositive probe items. Pure Python.

Layout: ``<root>/wikipedia_silver/en/{org,per}/{train,valid,test}.jsonl`` and
``<root>/news_gold_test/en/{org,per}/test.jsonl``; ``eval.appos`` names a file, or the root with a subset
(``wiki_per``, ``news_org``, ... as the official code's ``--dataset_config``; its ``test.jsonl``). One JSON
object per line, tokens as lists::

    {"previous_sentence": [[tokens of the sentence before]], "input": [tokens with "<appos>" once],
     "next_sentence": [tokens of the sentence after], "name": "the entity as written",
     "target": [tokens of the gold appositive, [] when the sentence should have none],
     "descriptions": "the entity's description", ...}

The item's text is built as the official loader builds it (the last 100 tokens of the sentence before,
the sentence, the first 100 of the sentence after); the entity is the last occurrence of ``name`` before
the slot. A row that is not that shape is skipped and counted with its line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kilm_ray.errors import UserInputError
from kilm_ray.eval.qa_files import ReadCounts, decode_bytes, json_objects

SLOT = "<appos>"
SUBSETS = {"wiki": "wikipedia_silver", "news": "news_gold_test"}
DOMAINS = ("org", "per")


class ApposFileError(UserInputError, ValueError):
    """An ApposCorpus path that holds no readable row; the message names it."""


@dataclass
class ApposFile(ReadCounts):
    items: list[dict] = field(default_factory=list)


def appos_path(root: str, subset: str = "") -> str:
    """The file of ``subset`` (``wiki_per``: its test split) under an ApposCorpus root; a file as is."""
    from kilm_ray import storage

    if not subset:
        return root
    source, _, domain = subset.partition("_")
    if source not in SUBSETS or domain not in DOMAINS:
        raise ApposFileError(f"ApposCorpus subset {subset!r}: one of "
                             f"{', '.join(f'{s}_{d}' for s in SUBSETS for d in DOMAINS)}")
    return storage.join(root, SUBSETS[source], "en", domain, "test.jsonl")


def _tokens(value: Any) -> list[str]:
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return value
    raise TypeError


def row_item(row: dict, k: int) -> dict:
    """One ApposCorpus row as a probe item (raises KeyError / TypeError / ValueError on another shape)."""
    previous = row.get("previous_sentence") or []
    before = " ".join(_tokens(previous[0])[-100:]) if previous else ""
    after = " ".join(_tokens(row.get("next_sentence") or [])[:100])
    sentence = " ".join(_tokens(row["input"]))
    if sentence.count(SLOT) != 1:
        raise ValueError(f"the sentence holds {sentence.count(SLOT)} {SLOT} slots")
    name = row["name"]
    if not isinstance(name, str) or not name.strip() or name not in sentence[: sentence.index(SLOT)]:
        raise ValueError("the name does not occur before the slot")
    sentence = sentence.replace(f" {SLOT}", SLOT)  # the slot follows the word before it, as the official loader
    text = " ".join(part for part in (before, sentence, after) if part)
    target = " ".join(_tokens(row.get("target") or []))
    description = row.get("descriptions") or ""
    return {"id": f"{k:07d}", "text": text, "mention": name, "target": target,
            "description": description if isinstance(description, str) else ""}


def parse_appos_text(text: str, path: str) -> ApposFile:
    out = ApposFile(path)
    for where, row in json_objects(text, out):
        try:
            out.items.append(row_item(row, len(out.items)))
        except KeyError as exc:
            out.skip(where, f"no {exc.args[0]!r} field")
        except TypeError:
            out.skip(where, "a field is not a list of tokens")
        except ValueError as exc:
            out.skip(where, str(exc))
    if not out.items:
        found = "; ".join(out.examples[:2]) or "it is empty"
        raise ApposFileError(f"{path}: no ApposCorpus row was read ({found}); expected JSON lines with "
                             "previous_sentence, input (holding <appos>), next_sentence, name and target")
    return out


def read_appos(root: str, subset: str = "") -> ApposFile:
    from kilm_ray import storage

    path = appos_path(root, subset)
    return parse_appos_text(decode_bytes(storage.read_bytes(path), path), path)
