"""Question files as they are published, and answers cut as the official KILM QA code cuts them.

Formats (``.gz`` or not, recognised by content):

- Google's NQ-open JSONL (``NQ-open.dev.jsonl``): one ``{"question": ..., "answer": [...]}`` per line
  (``answers`` and a single string answer are read too);
- DPR's TSV (``nq-test.qa.csv``): ``question<TAB>['answer', ...]``, read with Python's CSV reader and a
  tab delimiter as DPR reads it (a quoted question may hold a tab), the answers a Python list literal;
  ``question<TAB>answer[<TAB>answer...]`` too;
- TriviaQA's published JSON (``unfiltered-web-dev.json``, ``verified-wikipedia-dev.json``, ...): one object
  whose ``Data`` holds ``{"Question", "Answer": {"NormalizedAliases", "Aliases", "Value", ...}}`` items, the
  answers its normalized aliases as the official KILM code reads them (its aliases, then its value, where a
  file has none);
- WebQuestions' published JSON (``webquestions.examples.test.json``): a list of ``{"utterance", "targetValue":
  "(list (description X) (description \"Y Z\"))"}``, the answers the descriptions of ``targetValue``;
- a JSON list of ``{"question", "answer(s)"}`` objects or ``[question, answers]`` pairs.

A row that is not a question with at least one answer is skipped and counted with its line, never a
crash of the run; a file with no readable question at all is an error naming the file.
"""

from __future__ import annotations

import ast
import csv
import gzip
import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from kilm_ray.errors import UserInputError


class QAFileError(UserInputError, ValueError):
    """A question file with no readable question; the message names it and what was found."""


@dataclass
class ReadCounts:
    """What reading a published file met: rows read, rows skipped by reason, the first few with their line."""
    path: str
    rows: int = 0  # data rows read (blank lines not counted)
    skipped: Counter = field(default_factory=Counter)  # reason -> rows
    examples: list[str] = field(default_factory=list)  # "file:line: reason", the first few

    def skip(self, where: str, reason: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {reason}")


@dataclass
class QAFile(ReadCounts):
    format: str = ""
    pairs: list[tuple[str, list[str]]] = field(default_factory=list)


def cut_answer(text: str) -> str:
    """The official KILM QA post-processing: the generation up to its first newline, and before any
    ``Question:`` (the model going on to a next question)."""
    return text.split("\n")[0].split("Question:")[0].strip()


def _answers(value: Any) -> Optional[list[str]]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        return None
    kept = [a.strip() for a in value if a.strip()]
    return kept or None


def _add(out: QAFile, where: str, question: Any, answers: Any) -> None:
    ans = _answers(answers)
    if not isinstance(question, str) or not question.strip():
        out.skip(where, "no question")
    elif ans is None:
        out.skip(where, "no answer strings")
    else:
        out.pairs.append((question.strip(), ans))


_DESCRIPTION = re.compile(r'\(description\s+(?:"((?:[^"\\]|\\.)*)"|([^()"]*?))\s*\)')


def webquestions_answers(target_value: Any) -> Optional[list[str]]:
    """The answers of a WebQuestions ``targetValue``: each ``(description X)`` or ``(description "X Y")``."""
    if not isinstance(target_value, str):
        return None
    found = [(quoted.replace('\\"', '"').replace("\\\\", "\\") if quoted else bare).strip()
             for quoted, bare in _DESCRIPTION.findall(target_value)]
    return [a for a in found if a] or None


def _triviaqa_answers(answer: Any) -> Any:
    if not isinstance(answer, dict):
        return None
    return answer.get("NormalizedAliases") or answer.get("Aliases") or answer.get("Value")


def _parse_triviaqa(text: str, out: QAFile) -> None:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise QAFileError(f"{out.path}: starts like a JSON object but is neither JSON lines nor one JSON object "
                          f"({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("Data"), list):
        raise QAFileError(f"{out.path}: one JSON object without a 'Data' list: not TriviaQA's published layout")
    for k, row in enumerate(data["Data"]):
        out.rows += 1
        where = f"{out.path}: Data[{k}]"
        if not isinstance(row, dict):
            out.skip(where, "not a JSON object")
            continue
        _add(out, where, row.get("Question"), _triviaqa_answers(row.get("Answer")))


def _parse_json_list(text: str, out: QAFile) -> None:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise QAFileError(f"{out.path}: starts like a JSON list but is not one ({exc.msg} at line {exc.lineno})") from None
    for k, row in enumerate(rows):
        out.rows += 1
        where = f"{out.path}: item {k}"
        if isinstance(row, dict) and "utterance" in row:  # WebQuestions
            out.format = "webquestions json"
            _add(out, where, row.get("utterance"), webquestions_answers(row.get("targetValue")))
        elif isinstance(row, dict):
            _add(out, where, row.get("question"), row.get("answers", row.get("answer")))
        elif isinstance(row, list) and len(row) == 2:
            _add(out, where, row[0], row[1])
        else:
            out.skip(where, "not {question, answers} or [question, answers]")


def json_objects(text: str, out: ReadCounts) -> Iterator[tuple[str, dict]]:
    """(``file:line``, object) for each JSON-object line of ``text``; ``out`` counts every non-blank line
    and skips the rest with their reason."""
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        out.rows += 1
        where = f"{out.path}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            out.skip(where, f"not JSON ({exc.msg})")
            continue
        if not isinstance(row, dict):
            out.skip(where, "not a JSON object")
            continue
        yield where, row


def _parse_jsonl(text: str, out: QAFile) -> None:
    for where, row in json_objects(text, out):
        _add(out, where, row.get("question"), row.get("answer", row.get("answers")))


def _parse_tsv(text: str, out: QAFile) -> None:
    # The file's lines in order; csv joins a quoted field's lines into one row, as DPR's reader does.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t")
    for row in reader:
        line_no = reader.line_num
        if not row or not any(cell.strip() for cell in row):
            continue
        out.rows += 1
        where = f"{out.path}:{line_no}"
        if len(row) < 2 or not row[0].strip():
            out.skip(where, "expected question<TAB>['answer', ...] or question<TAB>answer")
            continue
        if len(row) == 2 and row[1].strip().startswith("["):
            try:
                answers = ast.literal_eval(row[1].strip())
            except (ValueError, SyntaxError):
                out.skip(where, "the answers are not a Python list literal")
                continue
            _add(out, where, row[0], answers)
        else:
            _add(out, where, row[0], [a for a in row[1:] if a.strip()])


def detect_format(text: str) -> str:
    head = text.lstrip()
    if head.startswith("["):
        return "json"
    if head.startswith("{"):  # JSON lines, or one object (TriviaQA's layout, pretty-printed or not)
        try:
            first = json.loads(head.split("\n", 1)[0])
        except json.JSONDecodeError:  # a pretty-printed object, or JSON lines whose first line is bad
            try:
                whole = json.loads(head)
            except json.JSONDecodeError:
                return "jsonl"
            return "triviaqa json" if isinstance(whole, dict) else "jsonl"
        return "triviaqa json" if isinstance(first, dict) and "Data" in first else "jsonl"
    return "tsv"


def parse_qa_text(text: str, path: str = "qa file") -> QAFile:
    """Parse a question file's text (see the module doc)."""
    fmt = detect_format(text)
    out = QAFile(path, format=fmt)
    {"json": _parse_json_list, "jsonl": _parse_jsonl, "tsv": _parse_tsv, "triviaqa json": _parse_triviaqa}[fmt](text, out)
    if not out.pairs:
        found = "; ".join(out.examples[:2]) or "it is empty"
        raise QAFileError(f"{path}: no question with an answer was read as {fmt} ({found}). Expected NQ-open JSONL "
                          "({\"question\", \"answer\": [...]}) lines, DPR's question<TAB>['answer', ...] TSV, TriviaQA's or "
                          "WebQuestions' published JSON, or a JSON list")
    return out


def decode_bytes(data: bytes, path: str) -> str:
    """A question file's bytes as text: gunzipped when they are gzip (by their magic bytes, whatever
    the name), UTF-8 (a byte-order mark is dropped)."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise QAFileError(f"{path}: a gzip file that does not decompress ({exc})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise QAFileError(f"{path}: not UTF-8 text (byte {exc.start}); a compressed file other than gzip?") from None


def read_qa_file(path: str) -> QAFile:
    from kilm_ray import storage

    return parse_qa_text(decode_bytes(storage.read_bytes(path), path), path)
