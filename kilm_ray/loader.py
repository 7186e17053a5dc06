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

import json
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kilm_ray import storage
from kilm_ray.masking import (
    Entity, Example, MaskingParams, SpecialIds, build_eval_examples, build_retention_example,
    build_train_example, collate,
)


class DataError(ValueError):
    pass


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


def split_files(data_dir: str, split: str) -> list[str]:
    """The shards of ``split`` that the manifest lists (nothing else under the directory is read)."""
    manifest = read_meta(data_dir)
    if split not in manifest["files"]:
        raise DataError(f"{data_dir}: the manifest has no split {split!r} (it has {sorted(manifest['files'])})")
    return [storage.join(data_dir, manifest["shards"], f["path"]) for f in manifest["files"][split]]


def special_ids_of(data_dir: str) -> SpecialIds:
    return SpecialIds(**read_meta(data_dir)["special_ids"])


def _flat(array: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, np.ndarray]:
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    return array.flatten(), array.offsets.to_numpy()


class SampleStore:
    """A split's chunks sorted by ``sample_id``, with cheap access to one row's arrays."""

    def __init__(self, table: pa.Table):
        table = table.sort_by("sample_id")
        self.sample_ids = table.column("sample_id").to_numpy()
        self.articles = table.column("article").to_pylist()
        self.texts = table.column("text")
        values, self._ids_off = _flat(table.column("input_ids"))
        self._ids = values.to_numpy()
        starts, self._ent_off = _flat(table.column("ent_start"))
        self._ent_start = starts.to_numpy()
        self._ent_end = _flat(table.column("ent_end"))[0].to_numpy()
        self._ent_title = _flat(table.column("ent_title"))[0]
        self._ent_source = _flat(table.column("ent_source"))[0]
        knowledge_lists, _ = _flat(table.column("ent_knowledge"))
        self._know_values, self._know_off = _flat(knowledge_lists)
        self._know_values = self._know_values.to_numpy()

    @classmethod
    def load(cls, data_dir: str, split: str) -> "SampleStore":
        files = split_files(data_dir, split)
        fs, _ = storage.resolve(data_dir)
        tables = [pq.read_table(storage.resolve(f)[1], filesystem=fs) for f in files]
        if not tables:
            from kilm_ray.data import CHUNK_SCHEMA

            schema = pa.schema([f for f in CHUNK_SCHEMA if f.name != "split" and not f.name.startswith("links")])
            return cls(schema.empty_table())
        return cls(pa.concat_tables(tables, promote_options="permissive"))

    def __len__(self) -> int:
        return len(self.sample_ids)

    def ids(self, i: int) -> np.ndarray:
        return self._ids[self._ids_off[i]: self._ids_off[i + 1]]

    def entities(self, i: int) -> list[Entity]:
        a, b = self._ent_off[i], self._ent_off[i + 1]
        return [Entity(int(self._ent_start[j]), int(self._ent_end[j]),
                       self._know_values[self._know_off[j]: self._know_off[j + 1]]) for j in range(a, b)]

    def entity_titles(self, i: int) -> list[str]:
        return self._ent_title[self._ent_off[i]: self._ent_off[i + 1]].to_pylist()

    def entity_sources(self, i: int) -> list[str]:
        return self._ent_source[self._ent_off[i]: self._ent_off[i + 1]].to_pylist()

    def text(self, i: int) -> str:
        return self.texts[i].as_py()

    def n_entities(self, i: int) -> int:
        return int(self._ent_off[i + 1] - self._ent_off[i])

    def train_example(self, i: int, seed: int, epoch: int, params: MaskingParams, sp: SpecialIds) -> Example:
        return build_train_example(self.ids(i), self.entities(i), int(self.sample_ids[i]), seed, epoch, params, sp)

    def eval_examples(self, i: int, max_entities: int, sp: SpecialIds) -> list[Example]:
        return build_eval_examples(self.ids(i), self.entities(i), int(self.sample_ids[i]), max_entities, sp)

    def retention_example(self, i: int, seed: int, params: MaskingParams, sp: SpecialIds) -> Example:
        return build_retention_example(self.ids(i), int(self.sample_ids[i]), seed, params, sp)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """Positions of the store in the order epoch ``epoch`` visits them."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFF, int(epoch), 0x5EED]).permutation(n)


@dataclass(frozen=True)
class BatchPlan:
    """Which samples each optimizer step and each worker consume.

    ``steps_per_epoch = ceil(n / B)``: the last step of an epoch is smaller rather than dropping
    samples. A worker takes every ``world``-th sample of the global batch and splits its share into
    ``grad_accum`` micro-batches (the same count on every worker, which DeepSpeed needs); a share
    too small for that gets zero-weight filler micro-batches.
    """

    n_samples: int
    global_batch: int
    micro_batch: int
    world_size: int
    epochs: int
    seed: int
    max_steps: int = 0

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.n_samples / self.global_batch))

    @property
    def total_steps(self) -> int:
        full = self.epochs * self.steps_per_epoch
        return min(full, self.max_steps) if self.max_steps else full

    @property
    def grad_accum(self) -> int:
        return max(1, math.ceil(math.ceil(self.global_batch / self.world_size) / self.micro_batch))

    def step_positions(self, step: int) -> tuple[int, np.ndarray]:
        """(epoch, store positions) of global step ``step`` (0-based)."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        order = _cached_order(self.n_samples, self.seed, epoch)
        return epoch, order[in_epoch * self.global_batch: (in_epoch + 1) * self.global_batch]

    def worker_micro_batches(self, step: int, rank: int) -> tuple[int, list[np.ndarray]]:
        epoch, positions = self.step_positions(step)
        share = positions[rank:: self.world_size]
        return epoch, np.array_split(share, self.grad_accum)

    def samples_consumed(self, step: int) -> tuple[int, int]:
        """(epoch, samples of that epoch consumed) after ``step`` completed steps."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        return epoch, min(self.n_samples, in_epoch * self.global_batch)


_ORDER_CACHE: dict[tuple[int, int, int], np.ndarray] = {}


def _cached_order(n: int, seed: int, epoch: int) -> np.ndarray:
    key = (n, seed, epoch)
    if key not in _ORDER_CACHE:
        if len(_ORDER_CACHE) > 4:
            _ORDER_CACHE.clear()
        _ORDER_CACHE[key] = epoch_order(n, seed, epoch)
    return _ORDER_CACHE[key]


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
                 sp: SpecialIds, knowledge_weight: float, end_step: Optional[int] = None):
        self.store, self.plan, self.rank = store, plan, rank
        self.start_step = start_step
        self.end_step = plan.total_steps if end_step is None else end_step
        self.params, self.sp, self.knowledge_weight = params, sp, knowledge_weight

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)

    def __getitem__(self, k: int) -> dict:
        step = self.start_step + k
        epoch, micro = self.plan.worker_micro_batches(step, self.rank)
        batches = [micro_batch_arrays(self.store, m, epoch, self.plan.seed, self.params, self.sp,
                                      self.knowledge_weight) for m in micro]
        return {"step": step, "epoch": epoch,
                "micro_batches": [{k2: torch.from_numpy(v) for k2, v in b.items()} for b in batches]}


def eval_example_list(store: SampleStore, max_samples: int, max_entities: int, sp: SpecialIds) -> list[Example]:
    """The first ``max_samples`` evaluation examples of a split (in sample_id order; 0 = all)."""
    out: list[Example] = []
    for i in range(len(store)):
        out.extend(store.eval_examples(i, max_entities, sp))
        if max_samples and len(out) >= max_samples:
            return out[:max_samples]
    return out
