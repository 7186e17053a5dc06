"""Run the official KILM preprocessing (github.com/alexa/kilm) and kilm_ray's on the same Wikipedia dump,
and print where they differ, by entity (article), then a count per kind of difference.

    python scripts/parity_official.py --official PATH/TO/alexa-kilm [--dump DUMP.xml.bz2] [--site DIR]

``--official`` is a checkout of alexa/kilm: its functions are imported from there and run as they are
(nothing of it is copied here). They need ``spacy`` and ``mwparserfromhell`` (and import ``wikimapper``,
unused by these steps, stubbed when missing), ``torch`` and ``transformers``. ``--site DIR`` appends a
site-packages directory to the path, e.g. a separate venv holding spaCy:

    python3.11 -m venv /tmp/official-venv && /tmp/official-venv/bin/pip install spacy wikimapper
    .venv/bin/python scripts/parity_official.py --official /tmp/kilm --site /tmp/official-venv/lib/python3.11/site-packages

The official steps, in order (what each runs is printed under "reproduced how"):
  1. data/wiki/wiki_short_desc.py  WikiXmlShortDescRetriever.run(): the dump -> articles.json, short_desc.json
  2. data/wiki/wiki_preprocess.py  proc_data_samples() (its ``--task filter``): first paragraphs, the
     description filters, links without a description turned into text
  3. src/data/wiki_data_utils.py   proc_wiki_lm_dataset(): 512-token chunks, entity slots, text infilling,
     for training (``epochs`` copies, masks drawn per map batch) and validation (one sample per entity)
kilm_ray's side runs its pure functions (no Ray) with configs/bart-base-h100.yaml's data settings: the
page parser, the knowledge lookup, chunking and the masking of the training loader and of evaluation.

Not part of the test suite (it needs the official checkout and spaCy); ``tests/test_parity_official.py``
tests the comparison functions below on hand-made strings.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import difflib
import json
import os
import platform
import re
import sys
import tempfile
import types
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("KILM_SHARED_DATA", REPO.parent / "shared" / "data"))  # as the tests read it
DEFAULT_DUMP = SHARED_DATA / "enwiki-sample-pages-articles.xml.bz2"
DEFAULT_BPE = SHARED_DATA / "gpt2-bpe"
SPACE = "\u0120"  # how byte-level BPE writes a space ("Ġ")

# Kinds of difference, in the order the summary prints them, with what each means.
KINDS = {
    "redirect_page": "a redirect page: official drops it, ours resolves links through it",
    "disambiguation_page": "a disambiguation page: official keeps it as an article, ours skips it",
    "page_kind": "any other page that the two classify differently",
    "lead_dropped": "official drops the whole lead (filter_para), ours keeps paragraphs of it",
    "lead_only_official": "official keeps a lead, ours keeps no text of the article",
    "lead_text": "both keep the lead, but its words differ (similarity < 0.8)",
    "blank_lines": "official lead keeps empty lines (ours: non-empty paragraphs only)",
    "knowledge_caption": "official's 'first sentence' is a part of an image caption (thumb|...)",
    "knowledge_text": "both describe the entity, in different words",
    "knowledge_spacing": "both describe the entity in the same words; spaces or punctuation differ",
    "knowledge_only_official": "only official has a description of the entity",
    "knowledge_only_ours": "only ours has a description of the entity",
    "link_only_official": "a link in a lead carries knowledge in official only",
    "link_only_ours": "a link in a lead carries knowledge in ours only",
    "space_before_ent": "sample with a lone space token before <ent>",
    "space_in_mention": "sample whose mention gains a space token the text did not have",
    "space_after_ent_desc": "sample with a space token after </ent_desc> that the text did not have",
    "eos_cut": "sample whose source or target lost </s> to the 512-token cut",
    "knowledge_cut": "sample whose target lost </ent_desc> (knowledge cut) to the 512-token cut",
    "knowledge_tokens": "knowledge tokens of <ent_desc>Title<sep>description</ent_desc> differ from ours",
    "knowledge_over_max": "knowledge longer than ours keeps (data.max_knowledge_tokens)",
    "valid_masked": "validation sample with text-infilling masks besides the knowledge slot",
}


# ----------------------------------------------------------------------------------------------
# The comparison itself: small pure functions (tests/test_parity_official.py)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Diff:
    entity: str  # the article (page title) the difference belongs to
    kind: str  # a key of KINDS
    official: str = ""
    ours: str = ""
    n: int = 1  # how many samples (or links) the line stands for
    split: str = ""  # for sample kinds: "evaluation" or "training"


def norm(text: Optional[str]) -> str:
    """Whitespace collapsed and stripped: what two texts are compared on."""
    return re.sub(r"\s+", " ", text or "").strip()


def official_lead_drop_reason(text: str) -> Optional[str]:
    """Why the official ``filter_para`` drops a first paragraph (None: it keeps it), in its order of
    checks. Only labels the verdict: the script checks it against filter_para itself."""
    if not text:
        return "empty"
    if text.lower().startswith("redirect"):
        return "starts with redirect"
    markers = [m for m in ("File:", "http:", "https:", "Image:") if m in text]
    if markers:
        return "contains " + ", ".join(markers)
    if text.count("\n") / len(text) >= 0.01:
        return f"newline rate {text.count(chr(10)) / len(text):.3f} >= 0.01"
    if re.search(r"\[\[.*?in aviation.*?\]\]", text):
        return "in aviation link"
    return None


def knowledge_diff(official: Optional[str], ours: Optional[str], official_raw: str = "") -> Optional[str]:
    """The kind of difference between two descriptions of one entity, None when they agree.
    ``official_raw``: the official description before filter_desc (a ``|`` in it: a caption's part)."""
    a, b = norm(official), norm(ours)
    if a == b:
        return None
    if not b:
        return "knowledge_only_official"
    if not a:
        return "knowledge_only_ours"
    if "|" in official_raw:
        return "knowledge_caption"
    if re.sub(r"[\W_]+", "", a) == re.sub(r"[\W_]+", "", b):
        return "knowledge_spacing"
    return "knowledge_text"


def blank_lines(text: str) -> int:
    """Empty (or whitespace-only) lines between the first and the last line of text."""
    lines = text.strip("\n").split("\n")
    return sum(1 for line in lines if not line.strip())


def unlink(text: str) -> str:
    """Wikitext links replaced by their visible text ([[Target|text]] -> text, [[Target]] -> Target)."""
    return re.sub(r"\[\[(?:[^\[\]|]*\|)?([^\[\]|]*)\]\]", r"\1", text)


def word_similarity(a: str, b: str) -> float:
    """Similarity of two texts' word sequences (difflib ratio, 1.0 = same words)."""
    return difflib.SequenceMatcher(None, a.split(), b.split()).ratio()


def link_target(inner: str) -> Optional[str]:
    """The page a link's inside (``Target#anchor|text``) points at, as the official code keys it: first
    letter upper-cased, anchor dropped; then spaces normalized (underscores, runs) to compare with ours."""
    target = inner.split("|")[0].split("#")[0] or inner.split("|")[0]
    target = re.sub(r"\s+", " ", target.replace("_", " ")).strip()
    return target[0].upper() + target[1:] if target else None


def wikilinks(text: str) -> Counter:
    """Targets of the ``[[...]]`` links in a text, with multiplicity."""
    found = Counter()
    for inner in re.findall(r"\[\[(.*?)\]\]", text):
        target = link_target(inner)
        if target:
            found[target] += 1
    return found


def counter_diff(official: Counter, ours: Counter) -> tuple[Counter, Counter]:
    """(links only official has, links only ours has), counted."""
    return official - ours, ours - official


def lone_space_before(tokens: Sequence[str], marker: str) -> int:
    """How many ``marker`` tokens directly follow a lone space token."""
    return sum(1 for i, t in enumerate(tokens) if t == marker and i > 0 and tokens[i - 1] == SPACE)


def space_added_after(tokens: Sequence[str], marker: str, text_after: str) -> bool:
    """True when the token after the first ``marker`` starts with a space that the text after the marker
    does not have (the tokenizer prefixed one)."""
    if marker not in tokens:
        return False
    i = list(tokens).index(marker) + 1
    return i < len(tokens) and tokens[i].startswith(SPACE) and not text_after[:1].isspace()


def ends_with(ids: Sequence[int], last: int, pad: int) -> bool:
    """Whether the sequence, padding removed, ends with token ``last``."""
    body = [i for i in ids if i != pad]
    return bool(body) and body[-1] == last


def realised_ratio(before: int, kept: int) -> float:
    """Fraction of maskable tokens that text infilling masked: 1 - kept / before."""
    return 1.0 - kept / before if before else 0.0


def summarize(diffs: Sequence[Diff]) -> dict[str, tuple[int, int, int]]:
    """Per kind, every kind of KINDS listed: (differences, of which training samples, entities concerned).
    A sample kind counts samples (evaluation, then training), a link kind links, any other kind entities."""
    count: Counter = Counter()
    training: Counter = Counter()
    entities = defaultdict(set)
    for d in diffs:
        (training if d.split == "training" else count)[d.kind] += d.n
        entities[d.kind].add(d.entity)
    return {kind: (count[kind], training[kind], len(entities[kind])) for kind in KINDS}


def short(text: Optional[str], width: int = 90) -> str:
    text = norm(text)
    return text if len(text) <= width else text[: width - 3] + "..."


def format_by_entity(diffs: Sequence[Diff]) -> list[str]:
    """One block per entity, its differences in KINDS order."""
    order = {kind: i for i, kind in enumerate(KINDS)}
    by_entity = defaultdict(list)
    for d in diffs:
        by_entity[d.entity].append(d)
    lines = []
    for entity in sorted(by_entity):
        lines.append(f"== {entity}")
        for d in sorted(by_entity[entity], key=lambda d: order[d.kind]):
            label = d.kind + (f" ({d.split})" if d.split else "")
            lines.append(f"  {label:<34} official: {short(d.official)}")
            lines.append(f"  {'':<34} ours:     {short(d.ours)}")
    return lines


def format_summary(summary: dict[str, tuple[int, int, int]]) -> list[str]:
    lines = [f"{'kind':<24}{'count':>6}{'train':>7}{'entities':>9}  meaning"]
    for kind, (n, train, entities) in summary.items():
        lines.append(f"{kind:<24}{n:>6}{train:>7}{entities:>9}  {KINDS[kind]}")
    return lines


# ----------------------------------------------------------------------------------------------
# The official code, imported from a checkout and run
# ----------------------------------------------------------------------------------------------


class _Rows:
    """The part of a HuggingFace ``datasets.Dataset`` that proc_wiki_lm_dataset uses: column names, a
    batched ``map`` (batches of ``batch_size`` consecutive rows, in-process, as with num_proc=None),
    ``len`` and ``save_to_disk`` (nothing is saved)."""

    def __init__(self, columns: dict[str, list]):
        self.columns = columns

    @property
    def column_names(self) -> list[str]:
        return list(self.columns)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()), []))

    def map(self, function, batched=True, batch_size=1000, **_ignored) -> "_Rows":
        assert batched
        out: dict[str, list] = {}
        for start in range(0, len(self), batch_size):
            result = function({k: v[start:start + batch_size] for k, v in self.columns.items()})
            for k, v in result.items():
                out.setdefault(k, []).extend(v)
        return _Rows(out)

    def save_to_disk(self, path: str) -> None:
        pass


class _Recorder:
    """The tokenizer, watched: each ``tokenizer(texts, add_special_tokens=False)`` call of the official
    ``tokenize`` (sources, then targets, once per map batch) is recorded with its result."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.calls: list[tuple[list[str], list[list[int]]]] = []

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, texts, *args, **kwargs):
        result = self._tokenizer(texts, *args, **kwargs)
        if kwargs.get("add_special_tokens") is False and isinstance(texts, list):
            self.calls.append((list(texts), [list(ids) for ids in result["input_ids"]]))
        return result

    def __len__(self) -> int:
        return len(self._tokenizer)


@dataclass
class OfficialRun:
    notes: list[str]
    articles: dict[str, dict]  # title -> articles.json row
    first_paragraphs: dict[str, str]  # title -> get_first_para text (before filtering)
    kept: dict[str, dict]  # title -> the filtered sample (text with described links, desc)
    descriptions: dict[str, str]  # title -> description after filter_desc
    drop_reason: dict[str, str]  # title -> why filter_para dropped its lead
    raw_descriptions: dict[str, str]  # title -> short_desc.json's value (before filter_desc)
    train: list[dict] = field(default_factory=list)  # per sample: title, src, src_ids, tgt_ids, out_ids, batch
    valid: list[dict] = field(default_factory=list)
    tokenizer: object = None


def _install_stub(name: str, notes: list[str], why: str) -> None:
    module = types.ModuleType(name)
    if name == "wikimapper":
        module.WikiMapper = None
    sys.modules[name] = module
    notes.append(f"{name}: not installed, stubbed ({why})")


def _constant_of(path: Path, name: str):
    """A module-level constant of the official code, read from its source (not imported)."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise KeyError(f"{name} not found in {path}")


def official_tokenizer(checkout: Path, bpe_dir: Path):
    """BART's tokenizer as tasks/pretraining.py sets it up: fast, add_prefix_space=True, and its
    ATTR_TO_SPECIAL_TOKEN added with add_special_tokens. BART's BPE is GPT-2's: the same merges and token
    strings (facebook/bart-base cannot be downloaded here; its ids differ, its tokens do not)."""
    from transformers import BartTokenizerFast

    special = _constant_of(checkout / "tasks" / "pretraining.py", "ATTR_TO_SPECIAL_TOKEN")
    tokenizer = BartTokenizerFast(vocab=str(bpe_dir / "encoder.json"), merges=str(bpe_dir / "vocab.bpe"),
                                  add_prefix_space=True)
    tokenizer.add_special_tokens(special)
    tokenizer.model_max_length = 1024  # bart-base's
    return tokenizer


def run_official(checkout: Path, dump: Path, bpe_dir: Path, spacy_model: str, epochs: int, seed: int,
                 workdir: Path) -> OfficialRun:
    import random
    from unittest import mock

    import numpy as np
    import spacy
    import torch
    import transformers

    notes: list[str] = []
    for name, why in (("wikimapper", "util.py imports it for WikiTitleIdResolver, unused by these steps"),):
        try:
            __import__(name)
        except ImportError:
            _install_stub(name, notes, why)
    sys.path[:0] = [str(checkout / "data" / "wiki"), str(checkout)]
    import util  # the official data/wiki/util.py
    import wiki_preprocess
    import wiki_short_desc
    from src.data import wiki_data_utils

    try:
        nlp = spacy.load(spacy_model)
        notes.append(f"first sentence: spaCy {spacy.__version__} model {spacy_model} (as the official code)")
    except OSError:
        nlp = spacy.blank("en")
        nlp.add_pipe("sentencizer")
        notes.append(f"first sentence: spaCy {spacy.__version__} model {spacy_model} NOT installed; "
                     "spacy.blank('en') + rule-based sentencizer instead (sentence ends may differ from the "
                     "parser's; pass --spacy-model with the real model to remove this caveat)")

    # Step 1: wiki_short_desc.py, as its __main__ runs it (every page: --max_articles -1).
    with mock.patch.object(util.spacy, "load", lambda name: nlp):
        wiki_short_desc.WikiXmlShortDescRetriever(str(dump), -1, str(workdir)).run()
    lines = (workdir / "articles.json").read_text().splitlines(keepends=True)
    desc_lines = (workdir / "short_desc.json").read_text().splitlines(keepends=True)
    notes.append(f"step 1: wiki_short_desc.WikiXmlShortDescRetriever.run() on the dump as is "
                 f"(bzcat, SAX): {len(lines)} articles")

    # Step 2: wiki_preprocess.py --task filter.
    paras, descs = wiki_preprocess.proc_data_samples(lines, desc_lines, sep="==", threads=1, tqdm_enabled=False)
    articles = {json.loads(line)["title"]: json.loads(line) for line in lines}
    first = {t: wiki_preprocess.get_first_para(json.dumps(a), sep="==")["text"] for t, a in articles.items()}
    kept = {p["title"]: p for p in paras}
    drop_reason = {}
    for title, text in first.items():
        reason = official_lead_drop_reason(text)
        if (reason is not None) != bool(wiki_preprocess.filter_para(text)):
            raise AssertionError(f"official_lead_drop_reason disagrees with filter_para on {title!r}")
        if title not in kept:
            drop_reason[title] = reason or "?"
    descriptions: dict[str, str] = {}
    for d in descs:
        descriptions.update(d)
    notes.append(f"step 2: wiki_preprocess.proc_data_samples(sep='==', threads=1) (--task filter): "
                 f"{len(paras)} leads kept, {len(descriptions)} descriptions; the split task is not run "
                 "(its 1000 validation articles exceed the excerpt): every kept lead is both train and "
                 "validation input")

    # Step 3: wiki_data_utils.proc_wiki_lm_dataset, with scripts/run_pretraining.sh's settings.
    tokenizer = official_tokenizer(checkout, bpe_dir)
    recorder = _Recorder(tokenizer)
    chunks: list[list[tuple[str, str]]] = []  # per map call: (title, chunk text) of split_line's output
    original_split = wiki_data_utils.split_line

    def split_line(examples, tok, max_source_length=512):
        out = original_split(examples, tok, max_source_length=max_source_length)
        chunks.append(list(zip(out["title"], out["text"])))
        return out

    columns = {"id": [str(i) for i in range(len(paras))], "title": [p["title"] for p in paras],
               "text": [p["text"] for p in paras], "desc": [p["desc"] for p in paras]}
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    training_args = types.SimpleNamespace(do_train=True, do_eval=True, do_predict=False)
    data_args = types.SimpleNamespace(max_source_length=512, preprocessing_num_workers=None, overwrite_cache=True)
    with mock.patch.object(wiki_data_utils, "split_line", split_line):
        train, valid, _ = wiki_data_utils.proc_wiki_lm_dataset(
            training_args, data_args, {"train": _Rows(columns), "validation": _Rows(columns)},
            str(workdir / "dataset"), recorder, epochs=epochs, mlm_probability=0.3, poisson_lambda=3.0)
    notes.append(f"step 3: wiki_data_utils.proc_wiki_lm_dataset(epochs={epochs}, mlm_probability=0.3, "
                 f"poisson_lambda=3.0, max_source_length=512, seed {seed}) as scripts/run_pretraining.sh; "
                 f"tokenizer: transformers {transformers.__version__} BartTokenizerFast from GPT-2 BPE files, "
                 "add_prefix_space=True, tasks/pretraining.py's ATTR_TO_SPECIAL_TOKEN (not the pinned "
                 "transformers 4.12.3 / tokenizers 0.10: no wheels for this Python); HF datasets replaced "
                 "by an in-memory batched map (batch_size 100, one process, as num_proc=None)")

    # Calls: [train sources, train targets] per train map batch, then the same for validation.
    n_train_batches = (len(paras) + 99) // 100
    samples = {"train": [], "valid": []}
    for call in range(len(recorder.calls) // 2):
        split = "train" if call < n_train_batches else "valid"
        srcs, src_ids = recorder.calls[2 * call]
        _, tgt_ids = recorder.calls[2 * call + 1]
        titles = []
        for title, text in chunks[call]:
            entities = wiki_data_utils.detect_entity(text)
            titles += [title] * (1 if entities is None or split == "train" else min(len(entities), 10))
        if split == "train":
            titles = titles * epochs
        assert len(titles) == len(srcs), (len(titles), len(srcs))
        samples[split] += [{"title": t, "src": s, "src_ids": a, "tgt_ids": b, "batch": call}
                           for t, s, a, b in zip(titles, srcs, src_ids, tgt_ids)]
    for split, rows in (("train", train), ("valid", valid)):
        for sample, out in zip(samples[split], rows.columns["input_ids"]):
            sample["out_ids"] = out
    raw = {k: v for line in desc_lines for k, v in json.loads(line).items()}
    return OfficialRun(notes, articles, first, kept, descriptions, drop_reason, raw, samples["train"],
                       samples["valid"], tokenizer)


# ----------------------------------------------------------------------------------------------
# kilm_ray's side
# ----------------------------------------------------------------------------------------------


@dataclass
class OursRun:
    notes: list[str]
    records: dict[str, dict]  # title -> page_record
    lookup: object
    paragraphs: dict[str, list]  # title -> Paragraphs of articles
    train: list[dict]  # per sample: title, tokens, texts around the markers, eos_ok, closed, before, kept
    valid: list[dict]  # the same, one per evaluated entity
    max_knowledge_tokens: int
    encode: object
    sep: int


def run_ours(dump: Path, bpe_dir: Path, epochs: int, seed: int) -> OursRun:
    import numpy as np

    from kilm_ray.config import load_config
    from kilm_ray.data.corpus.articles import article_chunks, page_record, paragraphs_from_doc
    from kilm_ray.data.corpus.dump import iter_raw_pages
    from kilm_ray.data.corpus.knowledge import KnowledgeLookup
    from kilm_ray.data.corpus.links import lookup_resolver
    from kilm_ray.method.chunking import knowledge_ids, newline_ids
    from kilm_ray.method.masking import (Entity, MaskingParams, build_eval_examples, build_train_example,
                                         marked_sequences, plain_sequences)
    from kilm_ray.method.tokenizer import CorpusTokenizer, load_tokenizer, special_ids

    sources = ["template", "first_sentence"]  # the official code's; "external" is our extension
    cfg = load_config(REPO / "configs" / "bart-base-h100.yaml",
                      [f"tokenizer.source=gpt2-bpe:{bpe_dir}", f"corpus.knowledge_sources={json.dumps(sources)}"])
    # add_prefix_space: True, as kilm_ray.data.vocab.add_prefix_space gives for a pretrained tokenizer.
    hf = load_tokenizer(cfg.tokenizer.source, add_prefix_space=True)
    tokenizer = CorpusTokenizer(hf.backend_tokenizer.to_str())
    sp = special_ids(hf)
    records = [page_record(raw, cfg.corpus.mode, cfg.corpus.max_description_chars) for raw in iter_raw_pages(str(dump))]
    lookup = KnowledgeLookup(sources=tuple(cfg.corpus.knowledge_sources))
    for r in records:
        lookup.add_page(r)
    sep, max_k = tokenizer.token_id("<sep>"), cfg.data.max_knowledge_tokens
    resolve = lookup_resolver(lookup, lambda title, desc: knowledge_ids(tokenizer.encode, title, desc, sep, max_k))
    newline = newline_ids(tokenizer.encode)
    params = MaskingParams.from_config(cfg.masking)
    desc_ids = (sp.desc, sp.desc_end)

    def sample(title: str, chunk, mention, source, labels, masked) -> dict:
        source, labels = [int(i) for i in source], [int(i) for i in labels]
        ids = chunk.input_ids
        cut = (mention.start, mention.end) if mention is not None else (0, 0)
        return {
            "title": title, "tokens": hf.convert_ids_to_tokens(source),
            "text_before_ent": tokenizer.decode(ids[:cut[0]]), "text_after_ent": tokenizer.decode(ids[cut[0]:cut[1]]),
            "text_after_desc": tokenizer.decode(ids[cut[1]:]),
            "eos_ok": source[-1] == sp.eos and labels[-1] == sp.eos,
            "closed": (desc_ids[1] in labels) if desc_ids[0] in labels else None,
            "before": len(ids), "kept": int((~np.isin(masked, sp.all())).sum()),
        }

    train, valid, paragraphs = [], [], {}
    for r in records:
        if r["kind"] != "article":
            continue
        paragraphs[r["title"]] = paragraphs_from_doc(r["doc"])
        chunks, _ = article_chunks(paragraphs[r["title"]], resolve, tokenizer.encode, tokenizer.decode, newline,
                                   cfg.data.max_text_tokens, cfg.data.min_chunk_tokens)
        for index, chunk in enumerate(chunks):
            sample_id = r["page_id"] * 10_000 + index
            entities = [Entity(m.start, m.end, m.knowledge) for m in chunk.mentions]
            for epoch in range(epochs):
                ex = build_train_example(chunk.input_ids, entities, sample_id, seed, epoch, params, sp)
                if ex.entity >= 0:  # the source before text infilling, rebuilt from the same choice
                    source, labels, _ = marked_sequences(chunk.input_ids, [entities[ex.entity]], sp)
                else:
                    source, labels, _ = plain_sequences(chunk.input_ids, sp)
                assert list(labels) == list(ex.labels)
                mention = chunk.mentions[ex.entity] if ex.entity >= 0 else None
                train.append(sample(r["title"], chunk, mention, source, labels, ex.input_ids))
            examples = build_eval_examples(chunk.input_ids, entities, sample_id, cfg.data.max_eval_entities, sp)
            for ex, mention in zip(examples, chunk.mentions):
                valid.append(sample(r["title"], chunk, mention, ex.input_ids, ex.labels, ex.input_ids))
    notes = [f"ours: kilm_ray page_record / KnowledgeLookup(sources={sources}) / article_chunks / "
             f"build_train_example ({epochs} epochs, seed {seed}) / build_eval_examples, configs/bart-base-h100.yaml "
             f"(corpus.mode={cfg.corpus.mode}, max_source_tokens={cfg.data.max_source_tokens}, "
             f"max_knowledge_tokens={max_k}, mask_ratio={cfg.masking.mask_ratio}) with the same GPT-2 BPE, "
             "add_prefix_space=True; every article's chunks are both train and evaluation input, as on the "
             "official side (no split)"]
    return OursRun(notes, {r["title"]: r for r in records if r["title"]}, lookup, paragraphs, train, valid, max_k,
                   tokenizer.encode, sep)


# ----------------------------------------------------------------------------------------------
# Putting the two side by side
# ----------------------------------------------------------------------------------------------


def _ours_fate(record: dict) -> str:
    if record["kind"] in ("article", "redirect"):
        return record["kind"] + (f" -> {record['redirect']}" if record["redirect"] else "")
    return f"{record['kind']}: {record['reason']}"


def _ours_description(lookup, title: str) -> tuple[Optional[str], str]:
    found = lookup.describe(title)
    return (found[0], found[1]) if found else (None, "")


def compare_pages(off: OfficialRun, ours: OursRun) -> list[Diff]:
    diffs = []
    for title, record in sorted(ours.records.items()):
        official = title in off.articles
        kind, reason = record["kind"], record["reason"]
        fate = _ours_fate(record)
        if kind == "redirect" and not official:
            diffs.append(Diff(title, "redirect_page", "page dropped (#REDIRECT): links to it stay text", fate))
        elif kind == "skipped" and reason == "disambiguation" and official:
            lead = "lead kept" if title in off.kept else f"lead dropped: {off.drop_reason.get(title)}"
            diffs.append(Diff(title, "disambiguation_page", f"article ({lead}; description "
                                                             f"{'kept' if title in off.descriptions else 'dropped'})", fate))
        elif (kind == "article") != official:
            lead = "lead kept" if title in off.kept else f"lead dropped: {off.drop_reason.get(title)}"
            diffs.append(Diff(title, "page_kind", f"article ({lead})" if official else "page dropped", fate))
    for title in sorted(set(off.articles) - set(ours.records)):
        diffs.append(Diff(title, "page_kind", "article", "no page of that title"))
    return diffs


def compare_leads(off: OfficialRun, ours: OursRun) -> list[Diff]:
    diffs = []
    for title in sorted(set(off.articles) & set(ours.records)):
        paragraphs = ours.paragraphs.get(title, [])
        our_text = "\n".join(p.text for p in paragraphs)
        if title in off.drop_reason and paragraphs:
            diffs.append(Diff(title, "lead_dropped", f"lead dropped: {off.drop_reason[title]}",
                              f"{len(paragraphs)} paragraphs kept: {our_text}"))
        if title in off.kept:
            text = off.kept[title]["text"]
            if not paragraphs:
                diffs.append(Diff(title, "lead_only_official", f"lead kept: {text}", _ours_fate(ours.records[title])))
            else:
                similarity = word_similarity(unlink(text), our_text)
                if similarity < 0.8:
                    diffs.append(Diff(title, "lead_text", f"similarity {similarity:.2f}: {unlink(text)}", our_text))
            if blank_lines(text):
                diffs.append(Diff(title, "blank_lines", f"{blank_lines(text)} empty lines in the lead",
                                  f"{len(paragraphs)} paragraphs, none empty"))
    return diffs


def compare_knowledge(off: OfficialRun, ours: OursRun) -> list[Diff]:
    diffs = []
    for title in sorted(set(off.articles) | set(t for t, r in ours.records.items() if r["kind"] == "article")):
        mine, source = _ours_description(ours.lookup, title)
        theirs = off.descriptions.get(title)
        kind = knowledge_diff(theirs, mine, off.raw_descriptions.get(title, ""))
        if kind:
            diffs.append(Diff(title, kind, theirs or "(none)", f"({source}) {mine}" if mine else "(none)"))
    return diffs


def compare_links(off: OfficialRun, ours: OursRun) -> tuple[list[Diff], dict]:
    """Links with knowledge in the leads both keep, per target; and their totals."""
    diffs = []
    totals = Counter()
    for title in sorted(set(off.kept) & set(ours.paragraphs)):
        described = Counter()
        for entry in filter(None, off.kept[title]["desc"].split("<sep_ent>")):
            described[link_target(entry.split("<sep>")[0][2:-2])] += 1
        raw_official = wikilinks(off.first_paragraphs[title])
        mine, resolved = Counter(), {}
        for para in ours.paragraphs[title]:
            for link in para.links:
                target = ours.lookup.resolve(link.target)
                if ours.lookup.describe(target) is not None:
                    mine[link.target] += 1
                    resolved[link.target] = target
        only_official, only_ours = counter_diff(described, mine)
        totals["official"] += sum(described.values())
        totals["ours"] += sum(mine.values())
        totals["ours_via_redirect"] += sum(n for t, n in mine.items() if resolved[t] != t)
        for target, n in sorted(only_official.items()):
            why = "no link to it in our paragraphs" if not any(
                link.target == target for p in ours.paragraphs[title] for link in p.links) else "no knowledge in ours"
            diffs.append(Diff(title, "link_only_official", f"[[{target}]] x{n}: {off.descriptions.get(target)}",
                              why, n=n))
        for target, n in sorted(only_ours.items()):
            if resolved[target] != target:
                why = f"target is a redirect (to {resolved[target]}): dropped, no description"
            elif raw_official[target] == 0:
                why = "no such link in its lead text"
            elif target not in off.descriptions:
                why = "no description for the target (filtered or page dropped)"
            else:
                why = "link left as text (e.g. a [[a|b|c]] link)"
            description = _ours_description(ours.lookup, resolved[target])[0]
            diffs.append(Diff(title, "link_only_ours", why, f"[[{target}]] x{n} -> {resolved[target]}: {description}",
                              n=n))
    return diffs, {f"links with knowledge in the {len(set(off.kept) & set(ours.paragraphs))} leads both keep":
                   dict(totals)}


def sample_checks(tokens: Sequence[str], text_before_ent: str, text_after_ent: str, text_after_desc: str,
                  eos_ok: bool, desc_closed: Optional[bool]) -> list[str]:
    """The kinds of sample-level difference one sample shows: ``tokens`` of its source before masking,
    the text around its markers (for whether a space token was added), whether its source and target end
    with </s>, and whether its target closes the knowledge slot (None: no slot)."""
    found = []
    if lone_space_before(tokens, "<ent>"):
        found.append("space_before_ent")
    at_start = text_before_ent in ("", "<s>")  # a text's first word is spaced by add_prefix_space on both sides
    if not at_start and not text_before_ent[-1:].isspace() and space_added_after(tokens, "<ent>", text_after_ent):
        found.append("space_in_mention")
    if space_added_after(tokens, "</ent_desc>", text_after_desc):
        found.append("space_after_ent_desc")
    if not eos_ok:
        found.append("eos_cut")
    if desc_closed is False:
        found.append("knowledge_cut")
    return found


def compare_samples(off: OfficialRun, ours: OursRun) -> tuple[list[Diff], dict]:
    from kilm_ray.method.chunking import knowledge_ids

    tok = off.tokenizer
    pad, eos = tok.pad_token_id, tok.eos_token_id
    special = set(tok.all_special_ids)
    desc_id, desc_end_id, sep_id = tok.convert_tokens_to_ids(["<ent_desc>", "</ent_desc>", "<sep>"])
    found = defaultdict(lambda: [0, 0])  # (title, kind, split) -> [official, ours] samples
    totals = defaultdict(lambda: [0, 0])  # (title, split) -> [official, ours] samples
    knowledge = []  # (title, official slot tokens, ours for the same title and description)
    for split, rows in (("evaluation", off.valid), ("training", off.train)):
        for s in rows:
            src, tgt = s["src"], [i for i in s["tgt_ids"] if i != pad]
            before, after_ent = src.split("<ent>", 1) if "<ent>" in src else (src, "")
            after_desc = src.split("</ent_desc>", 1)[1] if "</ent_desc>" in src else ""
            closed = (desc_end_id in tgt) if desc_id in tgt else None
            eos_ok = ends_with(s["src_ids"], eos, pad) and ends_with(s["tgt_ids"], eos, pad)
            tokens = tok.convert_ids_to_tokens([i for i in s["src_ids"] if i != pad])
            kinds = sample_checks(tokens, before, after_ent, after_desc, eos_ok, closed)
            if split == "evaluation" and sum(1 for i in s["out_ids"] if i not in special) < sum(
                    1 for i in s["src_ids"] if i not in special):
                kinds.append("valid_masked")
            totals[(s["title"], split)][0] += 1
            for kind in kinds:
                found[(s["title"], kind, split)][0] += 1
            if split == "evaluation" and closed:
                slot = tgt[tgt.index(desc_id) + 1: tgt.index(desc_end_id)]
                text = tok.decode(slot, skip_special_tokens=False)
                if "<sep>" in text:
                    title, description = text.split("<sep>", 1)
                    mine = knowledge_ids(ours.encode, title.strip(), description.strip(), sep_id, 10**6)
                    knowledge.append((s["title"], slot, mine))
    for split, rows in (("evaluation", ours.valid), ("training", ours.train)):
        for s in rows:
            totals[(s["title"], split)][1] += 1
            kinds = sample_checks(s["tokens"], s["text_before_ent"], s["text_after_ent"], s["text_after_desc"],
                                  s["eos_ok"], s["closed"])
            if split == "evaluation" and s["kept"] < s["before"]:
                kinds.append("valid_masked")
            for kind in kinds:
                found[(s["title"], kind, split)][1] += 1
    diffs = []
    for (title, kind, split), (a, b) in sorted(found.items()):
        n_off, n_ours = totals[(title, split)]
        diffs.append(Diff(title, kind, f"{a} of {n_off} {split} samples", f"{b} of {n_ours}", n=max(a, b),
                          split=split))
    for title, a, b in knowledge:
        if list(a) != list(b):
            diffs.append(Diff(title, "knowledge_tokens", " ".join(tok.convert_ids_to_tokens(a)[:12]),
                              " ".join(tok.convert_ids_to_tokens(b)[:12])))
        if len(a) > ours.max_knowledge_tokens:
            diffs.append(Diff(title, "knowledge_over_max", f"{len(a)} knowledge tokens",
                              f"cut to {ours.max_knowledge_tokens}"))
    metrics = mask_metrics(off, ours)
    metrics["knowledge_slots_compared"] = len(knowledge)
    return diffs, metrics


def _quantiles(values: list[float]) -> str:
    values = sorted(values)
    if not values:
        return "-"
    pick = [values[int(q * (len(values) - 1))] for q in (0.0, 0.1, 0.5, 0.9, 1.0)]
    return "min/p10/median/p90/max " + " / ".join(f"{v:.3f}" for v in pick)


def mask_metrics(off: OfficialRun, ours: OursRun) -> dict:
    special = set(off.tokenizer.all_special_ids)
    batches = defaultdict(lambda: [0, 0])
    per_sample = []
    for s in off.train:
        orig = sum(1 for i in s["src_ids"] if i not in special)
        kept = sum(1 for i in s["out_ids"] if i not in special)
        batches[s["batch"]][0] += orig
        batches[s["batch"]][1] += kept
        per_sample.append(realised_ratio(orig, kept))
    official_valid = [realised_ratio(sum(1 for i in s["src_ids"] if i not in special),
                                     sum(1 for i in s["out_ids"] if i not in special)) for s in off.valid]
    ours_before = sum(s["before"] for s in ours.train)
    ours_kept = sum(s["kept"] for s in ours.train)
    return {
        "official_train_per_batch": [round(realised_ratio(a, b), 4) for a, b in batches.values()],
        "official_train_per_sample": _quantiles(per_sample),
        "official_valid_overall": round(realised_ratio(
            sum(sum(1 for i in s["src_ids"] if i not in special) for s in off.valid),
            sum(sum(1 for i in s["out_ids"] if i not in special) for s in off.valid)), 4),
        "official_valid_per_sample": _quantiles(official_valid),
        "ours_train_overall": round(realised_ratio(ours_before, ours_kept), 4),
        "ours_train_per_sample": _quantiles([realised_ratio(s["before"], s["kept"]) for s in ours.train]),
        "ours_valid_overall": round(realised_ratio(sum(s["before"] for s in ours.valid),
                                                   sum(s["kept"] for s in ours.valid)), 4),
        "samples (with a knowledge slot)": {
            f"{side}_{split}": f"{len(rows)} ({sum(1 for s in rows if has_slot(s))})"
            for side, split, rows, has_slot in (
                ("official", "train", off.train, lambda s: "<ent_desc>" in s["src"]),
                ("official", "valid", off.valid, lambda s: "<ent_desc>" in s["src"]),
                ("ours", "train", ours.train, lambda s: s["closed"] is not None),
                ("ours", "valid", ours.valid, lambda s: s["closed"] is not None))},
    }


def _git_commit(path: Path, changes_under: str = "") -> str:
    """The checkout's commit, "+ changes" when ``changes_under`` has uncommitted changes; "unknown" without git."""
    import subprocess

    def git(*args: str) -> str:
        run = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True)
        return run.stdout.strip() if run.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if changes_under and git("status", "--porcelain", "--", changes_under):
        commit += f" + uncommitted changes in {changes_under}/"
    return commit


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", required=True, type=Path, help="a checkout of github.com/alexa/kilm")
    parser.add_argument("--dump", type=Path, default=DEFAULT_DUMP, help="pages-articles .xml.bz2 (default: the excerpt)")
    parser.add_argument("--bpe", type=Path, default=DEFAULT_BPE, help="directory with GPT-2's encoder.json, vocab.bpe")
    parser.add_argument("--site", action="append", default=[], help="site-packages to append to sys.path (spaCy)")
    parser.add_argument("--spacy-model", default="en_core_web_sm")
    parser.add_argument("--epochs", type=int, default=10, help="official num_train_epochs (copies masked per batch)")
    parser.add_argument("--seed", type=int, default=42, help="official set_seed default; ours: masking seed")
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args(argv)
    import site

    for path in args.site:
        before = list(sys.path)
        site.addsitedir(path)  # appended: the project's own packages keep precedence
        sys.path[:] = before + [p for p in sys.path if p not in before]
    if not (args.official / "src" / "data" / "wiki_data_utils.py").is_file():
        parser.error(f"--official {args.official}: not a checkout of alexa/kilm (no src/data/wiki_data_utils.py)")
    for module in ("spacy", "mwparserfromhell", "torch", "transformers"):
        try:
            __import__(module)
        except ImportError:
            parser.error(f"the official code needs {module}: install it, or point --site at a site-packages "
                         "holding it (see this script's help)")
    commit, ours_commit = _git_commit(args.official), _git_commit(REPO, "kilm_ray")
    with tempfile.TemporaryDirectory(prefix="kilm_parity_") as tmp:
        off = run_official(args.official, args.dump, args.bpe, args.spacy_model, args.epochs, args.seed, Path(tmp))
    ours = run_ours(args.dump, args.bpe, args.epochs, args.seed)
    link_diffs, link_totals = compare_links(off, ours)
    sample_diffs, metrics = compare_samples(off, ours)
    diffs = compare_pages(off, ours) + compare_leads(off, ours) + compare_knowledge(off, ours) + link_diffs + sample_diffs

    print(f"# parity_official: {datetime.date.today()} on {platform.node()} ({platform.machine()}, "
          f"Python {platform.python_version()})")
    print(f"official checkout: {args.official} (commit {commit}); kilm_ray: {ours_commit}; dump: {args.dump.name}")
    print("\n## reproduced how")
    for note in off.notes + ours.notes:
        print(f"- {note}")
    if not args.summary_only:
        print("\n## differences by entity")
        for line in format_by_entity(diffs):
            print(line)
    print("\n## summary")
    for line in format_summary(summarize(diffs)):
        print(line)
    print("\n## masking (realised fraction of maskable tokens masked; target 0.30) and counts")
    for key, value in {**metrics, **link_totals}.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
