"""Masked training examples as a Ray Dataset, for any (split, epoch, seed): the same masks as the training
loader (the same pure function, ``kilm_ray.method.masking``), over the shards a dataset's manifest lists."""

from __future__ import annotations

import numpy as np

from kilm_ray.config import KilmConfig
from kilm_ray.method.masking import Entity, MaskingParams, build_train_example, collate
from kilm_ray.data.rows import CHUNK_SCHEMA
from kilm_ray.data.sources import read_parquet_files


def _mask_rows(batch: dict, seed: int, epoch: int, params: MaskingParams, sp_dict: dict) -> dict:
    from kilm_ray.method.masking import SpecialIds

    sp = SpecialIds(**sp_dict)
    out: dict[str, list] = {"sample_id": [], "input_ids": [], "labels": [], "knowledge": [], "order": []}
    for i in range(len(batch["sample_id"])):
        starts, ends, know = batch["ent_start"][i], batch["ent_end"][i], batch["ent_knowledge"][i]
        entities = [Entity(int(s), int(e), list(k)) for s, e, k in zip(starts, ends, know)]
        ex = build_train_example(list(batch["input_ids"][i]), entities, int(batch["sample_id"][i]), seed, epoch,
                                 params, sp)
        out["sample_id"].append(ex.sample_id)
        out["input_ids"].append(ex.input_ids)
        out["labels"].append(ex.labels)
        out["knowledge"].append(ex.knowledge)
        out["order"].append(int(np.random.default_rng([seed, epoch, ex.sample_id]).integers(2**62)))
    return {"sample_id": np.array(out["sample_id"]), "order": np.array(out["order"]),
            "input_ids": _object_array(out["input_ids"]), "labels": _object_array(out["labels"]),
            "knowledge": _object_array(out["knowledge"])}


def _object_array(items: list) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def masked_dataset(data_dir: str, split: str, epoch: int, seed: int, cfg: KilmConfig):
    """A Ray Dataset of masked training examples of ``split`` for one epoch, in a seeded order that
    depends on nothing but ``(seed, epoch, sample_id)``. Feed it to ``iter_torch_batches`` with
    :func:`collate_fn`. Masks are identical to the training loader's (same pure function)."""
    from kilm_ray.store.loader import special_ids_of, split_files

    sp = special_ids_of(data_dir)
    params = MaskingParams.from_config(cfg.masking)
    ds = read_parquet_files(split_files(data_dir, split), CHUNK_SCHEMA,
                            columns=["sample_id", "input_ids", "ent_start", "ent_end", "ent_knowledge"],
                            rows_per_block=1024)
    ds = ds.map_batches(_mask_rows, batch_format="numpy",
                        fn_kwargs={"seed": seed, "epoch": epoch, "params": params, "sp_dict": sp.__dict__})
    return ds.sort("order")


class collate_fn:
    """``iter_torch_batches(collate_fn=collate_fn(cfg, data_dir))``: pads a batch of masked examples."""

    def __init__(self, cfg: KilmConfig, data_dir: str):
        from kilm_ray.store.loader import special_ids_of

        self.sp = special_ids_of(data_dir)
        self.knowledge_weight = cfg.masking.knowledge_loss_weight

    def __call__(self, batch: dict) -> dict:
        import torch

        from kilm_ray.method.masking import Example

        examples = [Example(np.asarray(i), np.asarray(l), np.asarray(k, dtype=bool), int(s))
                    for i, l, k, s in zip(batch["input_ids"], batch["labels"], batch["knowledge"], batch["sample_id"])]
        arrays = collate(examples, self.sp, self.knowledge_weight)
        return {k: torch.from_numpy(v) for k, v in arrays.items()}
