"""The dataset commit: immutable datasets under their run key, and one manifest that says which is current.

    out/manifest.json                    the commit point: a copy of the current dataset's manifest
    out/datasets/<run key>/manifest.json that dataset's own record, written last inside it
    out/datasets/<run key>/{train,valid,test}/part-*.parquet, tokenizer/, stats.json
    out/_work/<run key>/                 saved stages of a run (removed once it is committed)

Everything a manifest lists lives under its key and is never written again: a run writes its shards
into its own key's directory (a directory without a manifest is cleared first: nothing committed is in
it), copies the saved tokenizer and the stats beside them, writes the key's manifest, and only then
replaces ``out/manifest.json`` (a rename on a local disk, one PUT on S3). A run killed at any point
leaves the previous commit readable. Rerunning a command whose key is committed writes nothing (if
``out/manifest.json`` already points at it) and says so. Nothing here deletes a committed dataset:
readers (a training run) may be using an older one; remove those you no longer need by hand.

Readers (:func:`verify_tokenizer`, ``kilm_ray.store.loader``) follow the manifest's paths, so datasets
written before this layout (everything at the root of ``out``) still read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Optional

from kilm_ray import __version__, storage
from kilm_ray.config import KilmConfig
from kilm_ray.data.corpus.articles import SPLITS
from kilm_ray.data.stages import write_bytes_atomic

log = logging.getLogger("kilm_ray.pipeline")

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1  # the manifest's fields are unchanged: its paths are relative to the output directory
DATASETS = "datasets"


class DatasetDir:
    """``out/datasets/<key>/``: one immutable dataset."""

    def __init__(self, out: str, key: str):
        self.out, self.key = out, key
        self.rel = f"{DATASETS}/{key}"
        self.root = storage.join(out, DATASETS, key)
        self.manifest_uri = storage.join(self.root, MANIFEST)
        self.current_uri = storage.join(out, MANIFEST)

    def committed(self) -> Optional[bytes]:
        """This key's manifest, if the dataset was committed."""
        return storage.read_bytes(self.manifest_uri) if storage.exists(self.manifest_uri) else None

    def prepare(self) -> None:
        """Clear what an earlier, killed run of this key left here (nothing here is committed)."""
        if self.committed() is not None:
            raise RuntimeError(f"{self.root} is committed; it is never written again")
        fs, path = storage.resolve(self.root)
        fs.delete_dir_contents(path, missing_dir_ok=True)

    def reuse(self) -> dict:
        """A rerun of a committed key: point ``out/manifest.json`` at it if it does not already; write
        nothing else. Returns the dataset's stats."""
        manifest = self.committed()
        current = storage.read_bytes(self.current_uri) if storage.exists(self.current_uri) else None
        if current == manifest:
            log.info("dataset %s is already committed in %s: nothing to do", self.key, self.out)
        else:
            write_bytes_atomic(self.current_uri, manifest)
            log.info("dataset %s was committed in %s by an earlier run: %s points at it again", self.key, self.out,
                     MANIFEST)
        stats = json.loads(storage.read_bytes(storage.join(self.out, json.loads(manifest)["stats"])))
        return {**stats, "reused": True}

    def commit(self, manifest: dict, stats: dict, tokenizer_dir: str) -> None:
        """Tokenizer and stats beside the shards, the key's manifest, then the commit point."""
        storage.copy_dir(tokenizer_dir, storage.join(self.root, "tokenizer"))
        write_bytes_atomic(storage.join(self.root, "stats.json"), json.dumps(stats, indent=2).encode())
        data = json.dumps(manifest, indent=2).encode()
        write_bytes_atomic(self.manifest_uri, data)
        write_bytes_atomic(self.current_uri, data)


def build_manifest(cfg: KilmConfig, dataset: DatasetDir, dumps: list[str], kb_files: list[str], files: list[dict],
                   stats: dict, vocab) -> dict:
    settings = {k: cfg.to_dict()[k] for k in ("corpus", "tokenizer", "data")}
    return {
        "format": MANIFEST_FORMAT, "kilm_ray_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "run_key": dataset.key, "dumps": dumps, "knowledge": kb_files, "config": settings,
        "config_sha256": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest(),
        "tokenizer_sha256": vocab.sha256, "special_ids": vocab.special_ids, "vocab_size": vocab.vocab_size,
        "samples": {s: stats["samples"][s]["chunks"] for s in SPLITS},
        "files": {s: [{k: f[k] for k in ("path", "rows", "min_sample_id", "max_sample_id")}
                      for f in files if f["split"] == s] for s in SPLITS},
        "shards": dataset.rel, "stats": f"{dataset.rel}/stats.json", "tokenizer": f"{dataset.rel}/tokenizer",
    }


def dataset_path(data_dir: str, field: str) -> str:
    """The URI of a dataset's ``tokenizer`` or ``stats`` (``shards``: its shard directory), from its
    manifest."""
    from kilm_ray.store.loader import read_meta

    defaults = {"tokenizer": "tokenizer", "stats": "stats.json", "shards": "shards"}
    return storage.join(data_dir, read_meta(data_dir).get(field, defaults[field]))


