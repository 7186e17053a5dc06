"""Training-side data: the stored chunks of a split, the deterministic order of global batches, and a
torch Dataset that yields one optimizer step's micro-batches for one worker.

Why not ``ray.train.get_dataset_shard``: Ray Data's streaming split assigns blocks to workers
dynamically, and open-source Ray has no mid-epoch iterator state, so neither a resumed nor a
re-scaled run could see exactly the remaining samples of an epoch. Here the order is a pure
function of ``(seed, epoch)`` over samples sorted by ``sample_id``; global step ``s`` consumes
positions ``[s*B, (s+1)*B)`` of that order whatever the worker count, so resuming needs only the step.
No Ray in this module: the same loader feeds the worker loop with and without Ray.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kilm_ray import storage
from kilm_ray.store import node_cache
from kilm_ray.errors import UserInputError
from kilm_ray.method.masking import (
    Entity, Example, MaskingParams, SpecialIds, build_eval_examples, build_retention_example,
    build_train_example, collate,
)

log = logging.getLogger("kilm_ray")


class DataError(UserInputError, ValueError):
    """The dataset is missing, uncommitted or not one this kilm_ray reads; the message names it."""


def read_meta(data_dir: str) -> dict:
    """The dataset's manifest (``manifest.json``, written last by ``kilm-ray preprocess``)."""
    path = storage.join(data_dir, "manifest.json")
    if not storage.exists(path):
        found = [p.rsplit("/", 1)[-1] for p in storage.list_files(data_dir)][:5] if storage.is_dir(data_dir) else []
        what = f"it holds {', '.join(found)}{' ...' if len(found) == 5 else ''}" if found else "it is empty or missing"
        raise DataError(f"{data_dir} has no manifest.json, so it is not a committed KILM dataset ({what}): "
                        "preprocessing did not finish there, or wrote an older format. Run (or rerun) "
                        "`kilm-ray preprocess --out " + str(data_dir) + "`; a rerun reuses the stages that finished.")
    manifest = json.loads(storage.read_bytes(path))
    if manifest.get("format") != 1:
        raise DataError(f"{path}: manifest format {manifest.get('format')!r} is not one this kilm_ray reads (1)")
    return manifest


def verify_tokenizer(data_dir: str) -> str:
    """The dataset's tokenizer directory, after checking that its ``tokenizer.json`` is the one the
    shards were tokenized with (the manifest's ``tokenizer_sha256``). Train, tune and eval call it before
    they start: ids read with another tokenizer would silently mean other tokens."""
    manifest = read_meta(data_dir)
    directory = storage.join(data_dir, manifest.get("tokenizer", "tokenizer"))
    path = storage.join(directory, "tokenizer.json")
    if not storage.exists(path):
        raise DataError(f"{path} is missing: the dataset's tokenizer (its manifest lists it); rerun kilm-ray "
                        "preprocess")
    found = hashlib.sha256(storage.read_bytes(path)).hexdigest()
    expected = manifest.get("tokenizer_sha256")
    if found != expected:
        raise DataError(f"{path} is not the tokenizer this dataset was made with: its sha256 is {found[:16]}..., "
                        f"the manifest's tokenizer_sha256 is {str(expected)[:16]}... The shards' token ids would "
                        "mean other tokens; restore the file or rerun kilm-ray preprocess.")
    return directory


def check_dataset(train_cfg, data_dir: str) -> dict:
    """Run at the start of training or tuning, before any worker starts: the manifest of a committed
    dataset (a missing one fails here, at once, rather than in every worker of every retry), and one
    line when ``train.max_steps`` and ``train.epochs`` disagree. Returns the manifest."""
    manifest = read_meta(data_dir)
    t = train_cfg
    note = schedule_note(manifest["samples"]["train"], t.global_batch_size, t.epochs, t.max_steps)
    if note and int(os.environ.get("RANK", "0")) == 0:  # under torchrun: once, not once per process
        log.info(note)
    return manifest


def split_files(data_dir: str, split: str) -> list[str]:
    """The shards of ``split`` that the manifest lists (nothing else under the directory is read)."""
    manifest = read_meta(data_dir)
    if split not in manifest["files"]:
        raise DataError(f"{data_dir}: the manifest has no split {split!r} (it has {sorted(manifest['files'])})")
    return [storage.join(data_dir, manifest["shards"], f["path"]) for f in manifest["files"][split]]


def special_ids_of(data_dir: str) -> SpecialIds:
    return SpecialIds(**read_meta(data_dir)["special_ids"])


class _Shard:
    """Zero-copy numpy views of one memory-mapped shard (offsets index the unsliced child arrays)."""

    def __init__(self, batch: pa.RecordBatch):
        self.batch = batch
        ids = batch.column("input_ids")
        self.ids_off, self.ids = ids.offsets.to_numpy(), ids.values.to_numpy()
        starts = batch.column("ent_start")
        self.ent_off, self.ent_start = starts.offsets.to_numpy(), starts.values.to_numpy()
        self.ent_end = batch.column("ent_end").values.to_numpy()
        knowledge = batch.column("ent_knowledge")
        self.know_outer = knowledge.offsets.to_numpy()
        self.know_off, self.know = knowledge.values.offsets.to_numpy(), knowledge.values.values.to_numpy()


# Shards a store keeps open (mapped, with numpy views of their columns: ~10 kB of Python objects each).
OPEN_SHARDS = 2048


class SampleStore:
    """A split's chunks in ``sample_id`` order, read row by row from the node's memory-mapped copy
    (``kilm_ray.store.node_cache``): a rank holds a few arrays per shard, not the split."""

    def __init__(self, directory: Optional[Path], n_shards: int):
        self.directory = directory
        self.n_shards = n_shards
        # Open shards, least recently used first: a bounded cache, whatever the number of shards.
        self._shards: collections.OrderedDict[int, _Shard] = collections.OrderedDict()
        self._mappings: dict = {}
        self._touched: set[int] = set()
        if directory is None:
            self._file = self._row = self.sample_ids = self._len = np.zeros(0, np.int64)
        else:
            self._file = node_cache.map_array(directory / "sorted_file.npy")
            self._row = node_cache.map_array(directory / "sorted_row.npy")
            self.sample_ids = node_cache.map_array(directory / "sorted_sid.npy")
            self._len = node_cache.map_array(directory / "sorted_len.npy")

    @classmethod
    def load(cls, data_dir: str, split: str, cache_root: Optional[str | Path] = None) -> "SampleStore":
        """Open ``split`` of a committed dataset, building the node's copy first if no process has."""
        manifest = read_meta(data_dir)
        files = split_files(data_dir, split)
        if not files:
            return cls(None, 0)
        root = Path(cache_root) if cache_root else node_cache.default_root()
        directory = root / node_cache.split_key(manifest, split, files)
        if not (directory / "sorted_sid.npy").exists():
            fs, _ = storage.resolve(data_dir)
            with node_cache.node_lock(root / f"{directory.name}.lock"):
                node_cache.build_split(directory, len(files), lambda k: pq.read_table(
                    storage.resolve(files[k])[1], filesystem=fs, columns=STORE_COLUMNS))
        return cls(directory, len(files))

    def __reduce__(self):  # DataLoader workers started by spawn re-map the files
        return (SampleStore, (self.directory, self.n_shards))

    def _at(self, i: int) -> tuple[_Shard, int]:
        k = int(self._file[i])
        shard = self._shards.get(k)
        if shard is None:
            batch, self._mappings[k] = node_cache.map_batch_and_mapping(self.directory / f"{k:05d}.arrow")
            shard = self._shards[k] = _Shard(batch)
            if len(self._shards) > OPEN_SHARDS:
                old, _ = self._shards.popitem(last=False)
                self._mappings.pop(old, None)
                self._touched.discard(old)
        else:
            self._shards.move_to_end(k)
        self._touched.add(k)
        return shard, int(self._row[i])

    def release(self) -> None:
        """Unmap the pages this process has read since the last call (they stay in the node's page
        cache): called after each step's micro-batches are built, so a rank's resident memory does not
        grow with the rows it has visited (node_cache.release)."""
        node_cache.release([self._mappings[k] for k in self._touched]
                           + [a._mmap for a in (self._file, self._row, self.sample_ids, self._len)
                              if getattr(a, "_mmap", None) is not None])
        self._touched.clear()

    def __len__(self) -> int:
        return len(self.sample_ids)

    def sample_id(self, i: int) -> int:
        return int(self.sample_ids[i])

    def ids(self, i: int) -> np.ndarray:
        s, r = self._at(i)
        return s.ids[s.ids_off[r]: s.ids_off[r + 1]]

    def entities(self, i: int) -> list[Entity]:
        s, r = self._at(i)
        a, b = s.ent_off[r], s.ent_off[r + 1]
        outer = s.know_outer[r]  # entity j of the row has knowledge list outer + (j - a)
        return [Entity(int(s.ent_start[j]), int(s.ent_end[j]),
                       s.know[s.know_off[outer + j - a]: s.know_off[outer + j - a + 1]]) for j in range(a, b)]

    def source_length(self, i: int) -> int:
        """Text plus knowledge tokens: what decides a sample's padded size, for length grouping."""
        s, r = self._at(i)
        return int(s.ids_off[r + 1] - s.ids_off[r]
                   + s.know_off[s.know_outer[r + 1]] - s.know_off[s.know_outer[r]])

    def source_lengths(self, positions: np.ndarray) -> np.ndarray:
        """:meth:`source_length` of many positions at once, from the node copy's length index."""
        return np.asarray(self._len[np.asarray(positions)], dtype=np.int64)

    def _column_value(self, name: str, i: int):
        s, r = self._at(i)
        return s.batch.column(name)[r].as_py()

    def entity_titles(self, i: int) -> list[str]:
        return self._column_value("ent_title", i)

    def entity_sources(self, i: int) -> list[str]:
        return self._column_value("ent_source", i)

    def text(self, i: int) -> str:
        return self._column_value("text", i)

    def article(self, i: int) -> str:
        return self._column_value("article", i)

    def n_entities(self, i: int) -> int:
        s, r = self._at(i)
        return int(s.ent_off[r + 1] - s.ent_off[r])

    def order_slice(self, n: int, seed: int, epoch: int, start: int, stop: int) -> np.ndarray:
        """Positions ``[start, stop)`` of :func:`epoch_order`. The permutation is computed once per node
        and saved beside the copy (8 bytes a sample on the disk); a step reads only its slice, so no
        rank holds a permutation in memory, across epochs or within one."""
        if self.directory is None or n != len(self):
            return _order_slice(n, seed, epoch, start, stop)
        path = node_cache.cached_array(self.directory / f"order-{int(seed) & 0xFFFFFFFFFFFF}-{int(epoch)}.npy",
                                       self.directory.with_suffix(".order.lock"), lambda: epoch_order(n, seed, epoch))
        return node_cache.read_rows(path, start, stop)

    def train_example(self, i: int, seed: int, epoch: int, params: MaskingParams, sp: SpecialIds) -> Example:
        return build_train_example(self.ids(i), self.entities(i), self.sample_id(i), seed, epoch, params, sp)

    def eval_examples(self, i: int, max_entities: int, sp: SpecialIds) -> list[Example]:
        return build_eval_examples(self.ids(i), self.entities(i), self.sample_id(i), max_entities, sp)

    def retention_example(self, i: int, seed: int, params: MaskingParams, sp: SpecialIds) -> Example:
        return build_retention_example(self.ids(i), self.sample_id(i), seed, params, sp)


# What training and evaluation read of a chunk row (the link statistics columns stay in parquet).
STORE_COLUMNS = ["sample_id", "article", "chunk_index", "text", "input_ids", "ent_start", "ent_end", "ent_title",
                 "ent_source", "ent_knowledge"]


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """Positions of the store in the order epoch ``epoch`` visits them."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFF, int(epoch), 0x5EED]).permutation(n)


def schedule_note(n_samples: int, global_batch: int, epochs: int, max_steps: int) -> Optional[str]:
    """One line for the start of a run whose ``train.max_steps`` and ``train.epochs`` disagree (None when
    they agree or max_steps is unset): which figure wins, and what the other would have given."""
    per_epoch = max(1, math.ceil(n_samples / global_batch))
    if not max_steps or max_steps == epochs * per_epoch:
        return None
    return (f"train.max_steps={max_steps} wins over train.epochs={epochs}: training {max_steps} steps, "
            f"{max_steps / per_epoch:.3g} passes over the {n_samples} training samples ({per_epoch} steps per "
            f"epoch at global batch {global_batch}; {epochs} epochs would be {epochs * per_epoch} steps)")


@dataclass(frozen=True)
class BatchPlan:
    """Which samples each optimizer step and each worker consume.

    ``steps_per_epoch = ceil(n / B)``: the last step of an epoch is smaller rather than dropping
    samples. Global step ``s`` takes positions ``[s*B, (s+1)*B)`` of its epoch's order, whatever the
    worker count. Those samples are cut into ``U = ceil(B / m)`` micro-batches, the *units* of the
    step: with length grouping they are sorted longest first and cut into consecutive runs (each unit
    pads to similar lengths). The units do not depend on the worker count either. Worker ``r`` of
    ``W`` runs units ``r, 2W-1-r, 2W+r, ...`` (snake order, which evens out long and short units);
    every worker runs ``M = ceil(U / W)`` micro-batches (DeepSpeed needs the same count everywhere),
    those past ``U`` being zero-weight fillers. So ``M = ceil(B / (W m))``: a worker's work is
    proportional to ``1/W`` at every worker count, not only at those that divide a fixed number of
    shares.

    What stays bit-identical across worker counts: each micro-batch (samples, padding, masks, and the
    dropout seed of its unit), hence each micro-batch's gradient. The step's gradient is their sum, in
    an order that depends on the worker count (accumulation on a worker, then the all-reduce), so
    updates are bit-identical across worker counts only where that order cannot matter: two units a
    step (``a + b == b + a``), as in the tiny config's elastic tests.
    """

    n_samples: int
    global_batch: int
    micro_batch: int
    world_size: int
    epochs: int
    seed: int
    max_steps: int = 0
    # Where the epoch permutations come from (SampleStore.order_slice reads the node's copy of them).
    order_source: Optional[Callable[[int, int, int, int, int], np.ndarray]] = field(
        default=None, compare=False, repr=False)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.n_samples / self.global_batch))

    @property
    def total_steps(self) -> int:
        """``max_steps`` when set (it wins over ``epochs``, as in Hugging Face's Trainer: the run goes on
        into further epochs, or stops inside one), else ``epochs`` whole epochs."""
        return self.max_steps or self.epochs * self.steps_per_epoch

    @property
    def units(self) -> int:
        """Micro-batches of a step, over all workers (fillers not counted)."""
        return math.ceil(self.global_batch / self.micro_batch)

    @property
    def grad_accum(self) -> int:
        """Micro-batches every worker runs per step."""
        return math.ceil(self.units / self.world_size)

    def unit_ids(self, rank: int) -> list[int]:
        """The units worker ``rank`` runs, in order, -1 for a filler: what seeds each micro-batch's
        dropout, so a unit is computed the same way on whichever worker runs it."""
        w = self.world_size
        ids = [k * w + (rank if k % 2 == 0 else w - 1 - rank) for k in range(self.grad_accum)]
        return [u if u < self.units else -1 for u in ids]

    def step_positions(self, step: int) -> tuple[int, np.ndarray]:
        """(epoch, store positions) of global step ``step`` (0-based)."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        start = in_epoch * self.global_batch
        stop = min(start + self.global_batch, self.n_samples)
        return epoch, (self.order_source or _order_slice)(self.n_samples, self.seed, epoch, start, stop)

    def step_units(self, step: int, lengths: Optional[Callable[[np.ndarray], np.ndarray]] = None
                   ) -> tuple[int, list[np.ndarray]]:
        """(epoch, the ``units`` position arrays of step ``step``). With ``lengths`` the step's samples
        are sorted longest first before they are cut, so each micro-batch pads to similar lengths
        (the loss is token-weighted over the global batch, so the gradient does not change) and the
        largest comes first (an out-of-memory shows at once)."""
        epoch, positions = self.step_positions(step)
        if lengths is not None and len(positions) > 1:
            positions = positions[np.argsort(-lengths(positions), kind="stable")]
        return epoch, np.array_split(positions, self.units)

    def worker_micro_batches(self, step: int, rank: int,
                             lengths: Optional[Callable[[np.ndarray], np.ndarray]] = None
                             ) -> tuple[int, list[np.ndarray]]:
        """A worker's ``grad_accum`` micro-batches of step ``step`` (empty arrays for fillers)."""
        epoch, units = self.step_units(step, lengths)
        empty = units[0][:0]
        return epoch, [units[u] if u >= 0 else empty for u in self.unit_ids(rank)]

    def samples_consumed(self, step: int) -> tuple[int, int]:
        """(epoch, samples of that epoch consumed) after ``step`` completed steps."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        return epoch, min(self.n_samples, in_epoch * self.global_batch)


def worker_layouts(global_batch: int, micro_batch: int, worker_counts) -> list[dict]:
    """For each worker count W: the micro-batches a worker runs per step and the ideal
    ``ceil(global_batch / (W x micro_batch))`` (what ``kilm-ray train --dry-run`` prints)."""
    rows = []
    for w in worker_counts:
        plan = BatchPlan(global_batch, global_batch, micro_batch, w, 1, 0)
        rows.append({"workers": w, "micro_batches_per_worker": plan.grad_accum,
                     "ideal": math.ceil(global_batch / (w * micro_batch)),
                     "filler_micro_batches": plan.grad_accum * w - plan.units})
    return rows


_LAST_ORDER: dict[tuple[int, int, int], np.ndarray] = {}


def _order_slice(n: int, seed: int, epoch: int, start: int, stop: int) -> np.ndarray:
    """Without a node copy: the permutation of the current epoch only, computed once per process."""
    key = (n, seed, epoch)
    if key not in _LAST_ORDER:
        _LAST_ORDER.clear()
        _LAST_ORDER[key] = epoch_order(n, seed, epoch)
    return _LAST_ORDER[key][start:stop]


def micro_batch_arrays(store: SampleStore, positions: np.ndarray, epoch: int, seed: int, params: MaskingParams,
                       sp: SpecialIds, knowledge_weight: float) -> dict[str, np.ndarray]:
    """Masked, padded arrays for one micro-batch; an empty one becomes a zero-weight filler."""
    if len(positions) == 0:
        example = store.train_example(0, seed, epoch, params, sp)
        return collate([example], sp, knowledge_weight, weights_scale=[0.0])
    examples = [store.train_example(int(p), seed, epoch, params, sp) for p in positions]
    return collate(examples, sp, knowledge_weight)


try:  # torch is a dependency of training, not of preprocessing
    import torch
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover
    torch = None
    _TorchDataset = object


class StepDataset(_TorchDataset):
    """Item ``k`` = the micro-batches (dicts of tensors) of global step ``start_step + k`` for ``rank``.
    Map-style and pure, so a torch DataLoader with worker processes stays deterministic."""

    def __init__(self, store: SampleStore, plan: BatchPlan, rank: int, start_step: int, params: MaskingParams,
                 sp: SpecialIds, knowledge_weight: float, end_step: Optional[int] = None,
                 group_by_length: bool = False):
        self.store, self.plan, self.rank = store, plan, rank
        self.group_by_length = group_by_length
        self.start_step = start_step
        self.end_step = plan.total_steps if end_step is None else end_step
        self.params, self.sp, self.knowledge_weight = params, sp, knowledge_weight

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)

    def __getitem__(self, k: int) -> dict:
        step = self.start_step + k
        epoch, micro = self.plan.worker_micro_batches(
            step, self.rank, self.store.source_lengths if self.group_by_length else None)
        batches = [micro_batch_arrays(self.store, m, epoch, self.plan.seed, self.params, self.sp,
                                      self.knowledge_weight) for m in micro]
        # The loss weight of this worker's share, summed here on the host: the training loop needs it
        # before the step and must not read it back from the device.
        weights = [float(b["label_weights"].sum(dtype=np.float64)) for b in batches]
        self.store.release()  # the arrays above are copies: the mapped rows are not needed any more
        # ``live``: which micro-batches hold samples (a zero-weight filler only keeps the collectives in step;
        # the metrics must not count its losses, tokens or FLOPs), known here without a device read.
        return {"step": step, "epoch": epoch, "weight": sum(weights), "live": [w > 0 for w in weights],
                "micro_batches": [{k2: torch.from_numpy(v) for k2, v in b.items()} for b in batches]}


def eval_example_list(store: SampleStore, max_samples: int, max_entities: int, sp: SpecialIds) -> list[Example]:
    """The first ``max_samples`` evaluation examples of a split (in sample_id order; 0 = all)."""
    out: list[Example] = []
    for i in range(len(store)):
        out.extend(store.eval_examples(i, max_entities, sp))
        if max_samples and len(out) >= max_samples:
            return out[:max_samples]
    return out
