"""The tokenizer as a saved stage: trained on a bounded, seeded sample of the paragraphs (or loaded),
saved under the run's work directory with the sha256 of its ``tokenizer.json``. Later stages are keyed
on that hash, and the commit copies exactly these files into the dataset."""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pyarrow as pa

from kilm_ray import storage
from kilm_ray.config import KilmConfig
from kilm_ray.data.corpus.links import sample_hash, sample_threshold
from kilm_ray.data.shuffle import light_map
from kilm_ray.data.stages import Stage, write_bytes_atomic

log = logging.getLogger("kilm_ray.pipeline")


@dataclass(frozen=True)
class Vocab:
    """A saved tokenizer: where its files are, its ``tokenizer.json`` and that file's sha256."""

    uri: str
    tokenizer_json: str
    sha256: str
    vocab_size: int
    special_ids: dict


def add_prefix_space(cfg: KilmConfig) -> bool:
    """``tokenizer.add_prefix_space``; unset: as the official KILM code, which loads BART's pretrained
    tokenizer with add_prefix_space=True (a word at the start of a paragraph is tokenized as after a
    space, as its " Title" knowledge is), and a tokenizer trained here without."""
    if cfg.tokenizer.add_prefix_space is not None:
        return cfg.tokenizer.add_prefix_space
    return cfg.tokenizer.source != "train"


def _sample_paragraphs(batch: pa.Table, seed: int, threshold: int) -> pa.Table:
    hashes, texts = [], []
    for doc in batch["doc"].to_pylist():
        for text, _ in json.loads(doc):
            h = sample_hash(seed, text)
            if h < threshold:
                hashes.append(h)
                texts.append(text)
    return pa.table({"hash": pa.array(hashes, pa.int64()), "text": pa.array(texts, pa.large_string())})


def paragraph_sample(articles, cfg: KilmConfig, total: int) -> list[str]:
    """The ``tokenizer.train_max_paragraphs`` paragraphs with the smallest seeded hashes: the same
    sample whatever the block layout, and the driver holds at most that many (plus a margin)."""
    wanted = cfg.tokenizer.train_max_paragraphs
    candidates = light_map(articles, _sample_paragraphs, cfg, seed=cfg.corpus.split_seed,
                           threshold=sample_threshold(wanted, total))
    heap: list[tuple[int, str]] = []  # max-heap of the smallest hashes, as (-hash, text)
    for batch in candidates.iter_batches(batch_format="pyarrow", batch_size=4096):
        for h, text in zip(batch["hash"].to_pylist(), batch["text"].to_pylist()):
            if len(heap) < wanted:
                heapq.heappush(heap, (-h, text))
            elif -heap[0][0] > h:
                heapq.heapreplace(heap, (-h, text))
    return [text for _, text in sorted(((-h, t) for h, t in heap))]


def build_tokenizer(cfg: KilmConfig, sample_texts: Callable[[], list[str]]):
    """The tokenizer: trained on ``sample_texts()`` (source=train) or loaded, with the five KILM tokens."""
    from kilm_ray.method.tokenizer import load_tokenizer, train_bpe

    if cfg.tokenizer.source == "train":
        texts = sample_texts()
        log.info("training a byte-level BPE (vocab %d) on %d paragraphs", cfg.tokenizer.vocab_size, len(texts))
        tokenizer = train_bpe(texts, cfg.tokenizer.vocab_size, add_prefix_space=add_prefix_space(cfg))
    else:
        tokenizer = load_tokenizer(cfg.tokenizer.source, add_prefix_space=add_prefix_space(cfg))
    tokenizer.model_max_length = 1_000_000  # paragraphs are chunked after tokenization, not truncated
    return tokenizer


def tokenizer_stage(stage: Stage, cfg: KilmConfig, sample_texts: Callable[[], list[str]]) -> Vocab:
    """Build (or find, saved by an earlier run) the tokenizer; its files go to the stage's directory."""
    from kilm_ray.method.tokenizer import special_ids

    record = stage.record()
    if record is None:
        tokenizer = build_tokenizer(cfg, sample_texts)
        stage.clear()
        with tempfile.TemporaryDirectory(prefix="kilm_tok_") as tmp:
            tokenizer.save_pretrained(tmp)
            storage.upload_dir(tmp, stage.dir)
            data = (Path(tmp) / "tokenizer.json").read_bytes()
        record = {"sha256": hashlib.sha256(data).hexdigest(), "vocab_size": len(tokenizer),
                  "special_ids": special_ids(tokenizer).__dict__}
        write_bytes_atomic(stage.record_uri, json.dumps(record).encode())
    else:
        log.info("tokenizer: saved by an earlier run, reused (%s)", stage.dir)
    data = storage.read_bytes(storage.join(stage.dir, "tokenizer.json"))
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise RuntimeError(f"{stage.dir}/tokenizer.json changed after it was saved; remove {stage.record_uri}")
    return Vocab(stage.dir, data.decode(), record["sha256"], record["vocab_size"], record["special_ids"])


def source_fingerprint(source: str) -> Optional[str]:
    """A hash of a local tokenizer source's files (``gpt2-bpe:DIR`` or a directory): the run key then
    changes when the files do. None for ``train`` and hub ids."""
    if source == "train":
        return None
    directory = Path(source.split(":", 1)[1] if source.startswith("gpt2-bpe:") else source).expanduser()
    if not directory.is_dir():
        return None
    digest = hashlib.sha256()
    suffixes = (".json", ".txt", ".bpe", ".model")
    for path in sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in suffixes):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


_TOKENIZERS: dict[str, Any] = {}


def worker_tokenizer(tokenizer_ref: dict):
    """One Rust tokenizer per worker process and job, fetched once from the object store (the ref
    travels inside a dict so that Ray hands it over as a ref, not as the whole JSON per task)."""
    import ray

    from kilm_ray.method.tokenizer import CorpusTokenizer

    ref = tokenizer_ref["tokenizer_json"]
    if ref.hex() not in _TOKENIZERS:
        _TOKENIZERS.clear()
        _TOKENIZERS[ref.hex()] = CorpusTokenizer(ray.get(ref))
    return _TOKENIZERS[ref.hex()]
