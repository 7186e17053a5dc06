"""The deterministic training order: every sample once per epoch, independent of the worker count
and of where a run resumed."""

import numpy as np
import pytest
import torch

from kilm_ray.loader import BatchPlan, SampleStore, StepDataset, special_ids_of
from kilm_ray.masking import MaskingParams


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
    from kilm_ray.loader import schedule_note

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
    # Filler micro-batches (a share smaller than the accumulation count) carry zero weight.
    tiny_plan = BatchPlan(len(store), 3, 1, 2, epochs=1, seed=0)
    item = StepDataset(store, tiny_plan, rank=1, start_step=0, params=params, sp=sp, knowledge_weight=1.0)[0]
    weights = [float(mb["label_weights"].sum()) for mb in item["micro_batches"]]
    assert len(weights) == tiny_plan.grad_accum == 2 and weights[-1] == 0.0 and weights[0] > 0


def test_merged_order_of_overlapping_and_disjoint_shards():
    from kilm_ray.node_cache import merged_order

    rng = np.random.default_rng(0)
    ids = rng.choice(10_000, size=600, replace=False)
    for runs in ([np.sort(ids[:200]), np.sort(ids[200:450]), np.sort(ids[450:])],  # overlapping ranges
                 [np.arange(300, 400), np.arange(0, 100), np.arange(100, 300)]):  # disjoint, out of order
        parts = list(merged_order(runs))
        shard, row, sid = (np.concatenate(c) for c in zip(*parts))
        assert sid.tolist() == sorted(np.concatenate(runs).tolist())
        assert all(runs[k][r] == s for k, r, s in zip(shard.tolist(), row.tolist(), sid.tolist()))


def test_store_is_a_node_copy_built_once_and_reopened_by_pickle(tiny_data, tmp_path):
    import pickle

    from kilm_ray.loader import epoch_order

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
    assert np.array_equal(store.epoch_order(len(store), 3, 1), epoch_order(len(store), 3, 1))
    assert (copy / "order-3-1.npy").is_file()


def test_length_grouping_reorders_micro_batches_only():
    plan = BatchPlan(100, 32, 4, 2, 2, seed=4)
    lengths = np.random.default_rng(1).integers(10, 500, 100)
    for step in range(plan.total_steps):
        for rank in range(2):
            _, plain = plan.worker_micro_batches(step, rank)
            _, grouped = plan.worker_micro_batches(step, rank, lambda p: lengths[p])
            assert [len(m) for m in plain] == [len(m) for m in grouped]
            assert sorted(np.concatenate(plain).tolist()) == sorted(np.concatenate(grouped).tolist())
            flat = lengths[np.concatenate(grouped)]
            assert np.all(np.diff(flat) <= 0)  # longest first, so the biggest micro-batch runs first
