"""The deterministic training order: every sample once per epoch, independent of the worker count
and of where a run resumed; a worker's work proportional to 1/W at every worker count; the node copy
(vectorized merge, length index, clean-up of a failed build)."""

import numpy as np
import pytest
import torch

from kilm_ray.store.loader import BatchPlan, SampleStore, StepDataset, special_ids_of
from kilm_ray.method.masking import MaskingParams


@pytest.mark.parametrize("n, batch, micro, world", [(37, 8, 2, 1), (37, 8, 2, 2), (37, 8, 3, 3), (5, 8, 4, 2)])
def test_each_sample_exactly_once_per_epoch_on_any_worker_count(n, batch, micro, world):
    plan = BatchPlan(n_samples=n, global_batch=batch, micro_batch=micro, world_size=world, epochs=2, seed=3)
    for epoch in range(2):
        seen = []
        for step in range(epoch * plan.steps_per_epoch, (epoch + 1) * plan.steps_per_epoch):
            counts = set()
            for rank in range(world):
                e, micro_batches = plan.worker_micro_batches(step, rank)
                assert e == epoch and all(len(m) <= micro for m in micro_batches)
                counts.add(len(micro_batches))
                seen += [int(p) for m in micro_batches for p in m]
            assert counts == {plan.grad_accum}  # DeepSpeed needs the same count on every worker
        assert sorted(seen) == list(range(n))


def test_global_batches_do_not_depend_on_world_size_but_on_seed_and_epoch():
    one = BatchPlan(100, 16, 4, 1, 3, seed=5)
    four = BatchPlan(100, 16, 2, 4, 3, seed=5)
    for step in range(one.total_steps):
        a = sorted(one.step_positions(step)[1].tolist())
        b = sorted(p for r in range(4) for m in four.worker_micro_batches(step, r)[1] for p in m.tolist())
        assert a == b
    assert not np.array_equal(one.step_positions(0)[1], one.step_positions(one.steps_per_epoch)[1])
    assert not np.array_equal(one.step_positions(0)[1], BatchPlan(100, 16, 4, 1, 3, seed=6).step_positions(0)[1])
    assert one.samples_consumed(9) == (1, 32) and one.total_steps == 21
    assert BatchPlan(100, 16, 4, 1, 3, seed=5, max_steps=4).total_steps == 4


def test_max_steps_wins_over_epochs_and_says_so():
    """As in Hugging Face's Trainer: max_steps beyond the epochs goes on into further epochs (each a new
    permutation, every sample once), and the start of the run names both figures."""
    from kilm_ray.store.loader import schedule_note

    plan = BatchPlan(100, 16, 4, 1, 3, seed=5, max_steps=30)
    assert plan.total_steps == 30 and plan.steps_per_epoch == 7
    fourth = [p for step in range(21, 28) for p in plan.step_positions(step)[1].tolist()]
    assert plan.step_positions(27)[0] == 3 and sorted(fourth) == list(range(100))
    assert schedule_note(100, 16, 3, 30) == (
        "train.max_steps=30 wins over train.epochs=3: training 30 steps, 4.29 passes over the 100 training "
        "samples (7 steps per epoch at global batch 16; 3 epochs would be 21 steps)")
    assert "training 4 steps" in schedule_note(100, 16, 3, 4)
    assert schedule_note(100, 16, 3, 0) is None and schedule_note(100, 16, 3, 21) is None


def test_resumed_dataset_yields_the_same_batches(tiny_data, tiny_config):
    store = SampleStore.load(tiny_data, "train")
    sp = special_ids_of(tiny_data)
    plan = BatchPlan(len(store), 8, 4, 2, epochs=2, seed=1)
    params = MaskingParams(0.3, 3.0, 1.0)
    full = StepDataset(store, plan, rank=1, start_step=0, params=params, sp=sp, knowledge_weight=2.0)
    resumed = StepDataset(store, plan, rank=1, start_step=7, params=params, sp=sp, knowledge_weight=2.0)
    assert len(full) == plan.total_steps and len(resumed) == plan.total_steps - 7
    for k in range(3):
        a, b = full[7 + k], resumed[k]
        assert a["step"] == b["step"] == 7 + k
        for ma, mb in zip(a["micro_batches"], b["micro_batches"]):
            assert all(torch.equal(ma[key], mb[key]) for key in ma)
        assert a["weight"] == b["weight"] == sum(float(mb["label_weights"].sum()) for mb in a["micro_batches"])
    # Filler micro-batches (units past the step's count) carry zero weight.
    tiny_plan = BatchPlan(len(store), 3, 1, 2, epochs=1, seed=0)
    item = StepDataset(store, tiny_plan, rank=0, start_step=0, params=params, sp=sp, knowledge_weight=1.0)[0]
    weights = [float(mb["label_weights"].sum()) for mb in item["micro_batches"]]
    assert tiny_plan.unit_ids(0) == [0, -1] and tiny_plan.unit_ids(1) == [1, 2]  # snake order: 0 1 | 2 (3)
    assert len(weights) == tiny_plan.grad_accum == 2
    assert weights[-1] == 0.0 and weights[0] > 0
    assert item["live"] == [True, False]  # the loop counts no loss, token or FLOP of the filler


def test_merged_order_is_exact_and_bounded_by_buckets():
    from kilm_ray.store.node_cache import merged_order

    rng = np.random.default_rng(0)
    ids = rng.choice(10**9, size=60_000, replace=False)
    for runs in ([np.sort(ids[k::9]) for k in range(9)] + [ids[:0]],  # overlapping ranges, one empty shard
                 [np.arange(300, 400), np.arange(0, 100), np.arange(100, 300)]):  # disjoint, out of order
        parts = list(merged_order(runs, bucket=4096, sample=2048))
        shard, row, sid = (np.concatenate(c) for c in zip(*parts))
        assert sid.tolist() == sorted(np.concatenate(runs).tolist())
        assert all(runs[k][r] == s for k, r, s in zip(shard.tolist(), row.tolist(), sid.tolist()))
        assert max(len(p[2]) for p in parts) <= 2 * 4096  # memory: one bucket, not the split


def test_failed_build_leaves_nothing_and_a_killed_one_is_cleaned_up(tmp_path):
    import pyarrow as pa

    from kilm_ray.store.node_cache import build_split

    table = pa.table({"sample_id": pa.array([3, 1, 2], pa.int64()),
                      "input_ids": pa.array([[5, 6], [7], [8, 9, 10]], pa.large_list(pa.int32())),
                      "ent_knowledge": pa.array([[[1, 2]], [], [[3], [4, 4]]], pa.large_list(pa.large_list(pa.int32())))})
    table = table.sort_by("sample_id")
    target = tmp_path / "key-train"
    (tmp_path / ".tmp-key-train-99999").mkdir()  # what a SIGKILLed builder left

    def failing(k):
        if k == 1:
            raise OSError("disk full")
        return table

    with pytest.raises(OSError, match="disk full"):
        build_split(target, 2, failing)
    assert not target.exists() and not list(tmp_path.glob(".tmp-*"))
    build_split(target, 1, lambda k: table)
    assert np.load(target / "sorted_sid.npy").tolist() == [1, 2, 3]
    assert np.load(target / "sorted_len.npy").tolist() == [1 + 0, 3 + 3, 2 + 2]  # text + knowledge tokens


def test_store_is_a_node_copy_built_once_and_reopened_by_pickle(tiny_data, tmp_path):
    import pickle

    from kilm_ray.store.loader import epoch_order

    store = SampleStore.load(tiny_data, "train", tmp_path)
    (copy,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    built = (copy / "sorted_sid.npy").stat().st_mtime_ns
    again = SampleStore.load(tiny_data, "train", tmp_path)
    assert (copy / "sorted_sid.npy").stat().st_mtime_ns == built and again.directory == copy
    assert np.all(np.diff(store.sample_ids) > 0)
    clone = pickle.loads(pickle.dumps(store))  # what a spawned DataLoader worker gets
    for i in (0, len(store) // 2, len(store) - 1):
        assert np.array_equal(clone.ids(i), store.ids(i)) and clone.text(i) == store.text(i)
        assert [(e.start, e.end, e.knowledge.tolist()) for e in clone.entities(i)] == \
            [(e.start, e.end, e.knowledge.tolist()) for e in store.entities(i)]
        assert store.source_length(i) == len(store.ids(i)) + sum(len(e.knowledge) for e in store.entities(i))
    assert np.array_equal(store.source_lengths(np.arange(len(store))),
                          [store.source_length(i) for i in range(len(store))])
    n = len(store)
    assert np.array_equal(store.order_slice(n, 3, 1, 5, 9), epoch_order(n, 3, 1)[5:9])
    assert (copy / "order-3-1.npy").is_file()


def test_length_grouping_reorders_micro_batches_only():
    plan = BatchPlan(100, 32, 4, 2, 2, seed=4)
    lengths = np.random.default_rng(1).integers(10, 500, 100)
    for step in range(plan.total_steps):
        _, plain = plan.step_units(step)
        _, grouped = plan.step_units(step, lambda p: lengths[p])
        assert [len(m) for m in plain] == [len(m) for m in grouped]
        assert sorted(np.concatenate(plain).tolist()) == sorted(np.concatenate(grouped).tolist())
        assert np.all(np.diff(lengths[np.concatenate(grouped)]) <= 0)  # units cut from one sorted batch
        assert max(lengths[grouped[0]]) == lengths[plan.step_positions(step)[1]].max()  # the largest runs first


def test_work_per_worker_is_proportional_to_one_over_w_at_every_worker_count():
    """At every W from 1 to 32 a worker runs ceil(B / (W m)) micro-batches (what `kilm-ray train
    --dry-run` prints), and every unit of the step runs exactly once, whatever W."""
    import math

    from kilm_ray.config import load_config
    from kilm_ray.store.loader import worker_layouts

    from conftest import REPO

    for batch, micro in ((8192, 8), (1000, 7), (16, 8), (37, 4)):
        for row in worker_layouts(batch, micro, range(1, 33)):
            ideal = math.ceil(batch / (row["workers"] * micro))
            assert row["ideal"] == ideal and row["micro_batches_per_worker"] <= 1.1 * ideal
            plan = BatchPlan(batch, batch, micro, row["workers"], 1, 0)
            ran = sorted(u for r in range(row["workers"]) for u in plan.unit_ids(r) if u >= 0)
            assert ran == list(range(plan.units))
    t = load_config(REPO / "configs" / "bart-base-v100.yaml").train
    lo, hi = t.worker_bounds
    rows = {r["workers"]: r for r in worker_layouts(t.global_batch_size, t.micro_batch_size, range(lo, hi + 1))}
    for w in (8, 16, 24, 32):  # one to four p3.16xlarge nodes
        assert rows[w]["micro_batches_per_worker"] <= 1.1 * rows[w]["ideal"], rows[w]
    assert rows[24]["micro_batches_per_worker"] == 43 and rows[16]["micro_batches_per_worker"] == 64


def test_micro_batches_are_the_same_units_at_any_worker_count():
    """A unit (its samples, hence its padding, masks and dropout seed) does not depend on W."""
    lengths = np.random.default_rng(2).integers(10, 500, 500)
    plans = [BatchPlan(500, 48, 4, w, 2, seed=7) for w in (1, 3, 5, 12)]
    for step in (0, 5, plans[0].steps_per_epoch - 1):  # the last step of an epoch is smaller
        by_unit = []
        for plan in plans:
            units = {}
            for rank in range(plan.world_size):
                _, micro = plan.worker_micro_batches(step, rank, lambda p: lengths[p])
                for u, m in zip(plan.unit_ids(rank), micro):
                    if u >= 0:
                        units[u] = m.tolist()
                    else:
                        assert len(m) == 0
            by_unit.append(units)
        assert all(u == by_unit[0] for u in by_unit[1:])


def test_train_dry_run_prints_one_line_per_worker_count(tiny_data, capsys):
    import json

    from kilm_ray.cli import main

    from conftest import TINY_CONFIG

    assert main(["train", "--dry-run", "--data", tiny_data, "--config", str(TINY_CONFIG),
                 "train.num_workers=[1,4]", "train.global_batch_size=64", "train.micro_batch_size=4"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["workers"] for r in rows] == [1, 2, 3, 4]
    assert [(r["micro_batches_per_worker"], r["ideal"]) for r in rows] == [(16, 16), (8, 8), (6, 6), (4, 4)]
    assert all(r["train_samples"] > 0 and r["steps"] > 0 for r in rows)


def test_a_store_keeps_a_bounded_number_of_shards_open(tmp_path, monkeypatch):
    """However many shards a split has, a rank keeps at most OPEN_SHARDS of them open, and a row read
    after its shard was closed and reopened is the same row."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO))
    from bench.node_cache import write_dataset

    from kilm_ray.store import loader

    write_dataset(tmp_path / "data", 30_000)  # 4 shards of 8192 rows
    monkeypatch.setattr(loader, "OPEN_SHARDS", 2)
    store = SampleStore.load(str(tmp_path / "data"), "train", tmp_path / "cache")
    assert store.n_shards == 4
    picks = np.random.default_rng(0).integers(0, len(store), 400)
    first = [store.ids(int(i)).tolist() for i in picks]
    assert len(store._shards) <= 2 and len(store._mappings) <= 2
    store.release()
    assert [store.ids(int(i)).tolist() for i in picks] == first
    assert np.all(np.diff(store.sample_ids) > 0)
