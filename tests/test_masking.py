"""The KILM sample format and BART text infilling, pinned token by token."""

import math

import numpy as np
import pytest

from kilm_ray.method.masking import (
    Entity, MaskingParams, SpecialIds, appositive_sequences, build_eval_examples, build_train_example, collate, plain_sequences,
    slot_sequences, text_infilling,
)

SP = SpecialIds(bos=0, eos=2, pad=1, mask=3, ent=100, ent_end=101, desc=102, desc_end=103, sep=104)
TEXT = list(range(10, 40))  # 30 ordinary tokens
KNOW = [50, 51, SP.sep, 52, 53]  # "Title<sep>description"


def test_slot_sequences_exact_structure():
    source, target, in_slot = slot_sequences([10, 11, 12, 13, 14], 1, 3, KNOW, SP)
    assert source.tolist() == [0, 10, 100, 11, 12, 101, 102, 3, 103, 13, 14, 2]
    assert target.tolist() == [0, 10, 100, 11, 12, 101, 102, 50, 51, 104, 52, 53, 103, 13, 14, 2]
    # The knowledge mask covers Title<sep>description and the closing </ent_desc>, nothing else.
    assert target[in_slot].tolist() == KNOW + [SP.desc_end]


def test_slot_after_later_token_for_appositives():
    source, _, _ = slot_sequences([10, 11, 12, 13], 0, 1, None, SP, slot=3)
    assert source.tolist() == [0, 100, 10, 101, 11, 12, 102, 3, 103, 13, 2]


def test_bad_span_is_rejected():
    with pytest.raises(ValueError, match="bad mention span"):
        slot_sequences([10, 11], 1, 5, KNOW, SP)


def test_text_infilling_budget_specials_and_collapse():
    rng = np.random.default_rng(0)
    source, _, _ = slot_sequences(TEXT, 4, 6, KNOW, SP)
    masked, drawn = text_infilling(source, rng, 0.3, 3.0, SP, return_spans=True)
    specials = set(SP.all().tolist())
    # Special tokens are never masked: they all survive, in order.
    assert [t for t in masked.tolist() if t in specials - {SP.mask}] == [t for t in source.tolist() if t in specials - {SP.mask}]
    # Consecutive masks are collapsed.
    assert not any(a == b == SP.mask for a, b in zip(masked[:-1], masked[1:]))
    # Exactly ceil(0.3 * maskable) ordinary tokens disappear into <mask> runs.
    n_maskable = sum(t not in specials for t in source.tolist())
    kept = sum(t not in specials for t in masked.tolist())
    assert n_maskable - kept == math.ceil(0.3 * n_maskable)
    assert all(length > 0 for length in drawn)


def test_consecutive_masks_collapse_to_one():
    # With every ordinary token masked, each run between specials becomes exactly one <mask>.
    source = np.array([0, 10, 11, 12, 100, 13, 101, 14, 15, 2])
    masked = text_infilling(source, np.random.default_rng(1), 1.0, 3.0, SP)
    assert masked.tolist() == [0, 3, 100, 3, 101, 3, 2]


def test_mask_budget_and_span_length_statistics():
    """Over many samples: the budget is exact and the drawn span lengths follow a zero-truncated
    Poisson(3) (mean lambda / (1 - e^-lambda) = 3.157)."""
    lam = 3.0
    drawn_all, masked_fraction = [], []
    for sid in range(400):
        tokens = np.arange(1000, 1200)  # no special ids among them
        rng = np.random.default_rng([0, 0, sid])
        out, drawn = text_infilling(tokens, rng, 0.3, lam, SP, return_spans=True)
        drawn_all += drawn
        masked_fraction.append((200 - int((out != SP.mask).sum())) / 200)
    assert np.mean(masked_fraction) == pytest.approx(0.3, abs=1e-9)
    expected_mean = lam / (1 - math.exp(-lam))
    assert np.mean(drawn_all) == pytest.approx(expected_mean, rel=0.03)
    assert np.var(drawn_all) == pytest.approx(
        (lam + lam**2) / (1 - math.exp(-lam)) - expected_mean**2, rel=0.1)


def test_training_example_is_a_pure_function_of_seed_epoch_sample():
    ents = [Entity(2, 4, KNOW), Entity(10, 12, [60, SP.sep, 61])]
    params = MaskingParams(0.3, 3.0, 1.0)
    a = build_train_example(TEXT, ents, 123, seed=7, epoch=2, params=params, sp=SP)
    b = build_train_example(TEXT, ents, 123, seed=7, epoch=2, params=params, sp=SP)
    assert a.input_ids.tolist() == b.input_ids.tolist() and a.entity == b.entity
    others = [build_train_example(TEXT, ents, 123, seed=7, epoch=e, params=params, sp=SP) for e in range(3, 8)]
    assert any(o.input_ids.tolist() != a.input_ids.tolist() for o in others)  # re-sampled each epoch
    assert {o.entity for o in others + [a]} == {0, 1}  # the entity choice varies across epochs


def test_one_entity_per_training_chunk_others_stay_text():
    ents = [Entity(2, 4, KNOW), Entity(10, 12, [60, SP.sep, 61])]
    ex = build_train_example(TEXT, ents, 5, 0, 0, MaskingParams(0.0, 3.0, 1.0), SP)
    assert ex.labels.tolist().count(SP.ent) == 1 and ex.labels.tolist().count(SP.desc) == 1
    chosen = ents[ex.entity]
    assert ex.labels[ex.knowledge].tolist() == list(chosen.knowledge) + [SP.desc_end]
    # With mask_ratio 0 the only <mask> is the knowledge slot.
    assert ex.input_ids.tolist().count(SP.mask) == 1


def test_several_entities_per_chunk_and_the_markup_only_baseline():
    ents = [Entity(2, 4, KNOW), Entity(6, 7, [80]), Entity(10, 12, [60, SP.sep, 61])]
    params = MaskingParams(0.0, 3.0, 1.0, entities_per_chunk=2)
    ex = build_train_example(TEXT, ents, 5, 0, 0, params, SP)
    labels = ex.labels.tolist()
    assert labels.count(SP.ent) == 2 == labels.count(SP.desc) and ex.input_ids.tolist().count(SP.mask) == 2
    drawn = {tuple(build_train_example(TEXT, ents, 5, 0, e, params, SP).labels.tolist()) for e in range(12)}
    assert len(drawn) == 3  # the pair is re-drawn per epoch: all 3 pairs of 3 entities occur
    # One slot per entity, each holding that entity's knowledge, in text order.
    everything = build_train_example(TEXT, ents, 5, 0, 0, MaskingParams(0.0, 3.0, 1.0, 8), SP)
    assert everything.labels[everything.knowledge].tolist() == [*KNOW, SP.desc_end, 80, SP.desc_end, 60, SP.sep, 61,
                                                                SP.desc_end]
    # The fair baseline: the same entities, same draws, marked <ent>mention</ent> with no knowledge slot.
    base = build_train_example(TEXT, ents, 5, 0, 0, MaskingParams(0.0, 3.0, 1.0, 2, knowledge_slot=False), SP)
    assert base.labels.tolist() == [t for t, k in zip(labels, ex.knowledge) if not k and t != SP.desc]
    assert not base.knowledge.any() and SP.mask not in base.input_ids.tolist() and SP.desc not in base.labels
    # One entity: the paper's format, the same as the probes' slot_sequences.
    one = build_train_example(TEXT, ents[:1], 5, 0, 0, params, SP)
    assert one.labels.tolist() == slot_sequences(TEXT, 2, 4, KNOW, SP)[1].tolist()


def test_chunk_without_links_gets_infilling_only_and_baseline_switch():
    ex = build_train_example(TEXT, [], 9, 0, 0, MaskingParams(0.3, 3.0, 1.0), SP)
    assert ex.entity == -1 and SP.ent not in ex.labels.tolist()
    assert ex.labels.tolist() == plain_sequences(TEXT, SP)[1].tolist()
    # knowledge_prob = 0: plain BART text infilling even when the chunk has entities.
    ex = build_train_example(TEXT, [Entity(2, 4, KNOW)], 9, 0, 0, MaskingParams(0.3, 3.0, 0.0), SP)
    assert ex.entity == -1 and not ex.knowledge.any()


def test_eval_expansion_one_sample_per_entity_up_to_limit():
    ents = [Entity(i, i + 1, [60 + i, SP.sep, 70]) for i in range(0, 24, 2)]  # 12 entities
    exs = build_eval_examples(TEXT, ents, 3, 10, SP)
    assert len(exs) == 10
    for i, ex in enumerate(exs):
        assert ex.entity == i
        assert ex.input_ids.tolist().count(SP.mask) == 1  # only the knowledge slot is masked
        assert ex.labels[ex.knowledge].tolist() == [60 + 2 * i, SP.sep, 70, SP.desc_end]


def test_collate_pads_shifts_and_weights():
    exs = build_eval_examples([10, 11, 12], [Entity(0, 1, [50, SP.sep, 51])], 1, 10, SP)
    exs += [build_train_example([10, 11], [], 2, 0, 0, MaskingParams(0.0, 3.0, 1.0), SP)]
    batch = collate(exs, SP, knowledge_weight=2.0, pad_to_multiple=8)
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["labels"].shape == batch["decoder_input_ids"].shape
    labels = batch["labels"][0]
    n = int((labels != -100).sum())
    # decoder input = </s> then the labels shifted right (BART's shift_tokens_right).
    assert batch["decoder_input_ids"][0, 0] == SP.eos
    assert batch["decoder_input_ids"][0, 1:n].tolist() == labels[: n - 1].tolist()
    assert set(batch["label_weights"][0, :n].tolist()) == {1.0, 2.0}
    assert batch["label_weights"][1, 4:].sum() == 0 and batch["attention_mask"][1].sum() == 4


def test_data_matched_baseline_writes_the_same_knowledge_as_text():
    """masking.knowledge_as_text: the same entities and draws as KILM, each followed by its knowledge as a
    plain-text appositive ("mention, Title: description,"), no markup, no forced mask."""
    sp = SpecialIds(**{**SP.__dict__, "comma": 90, "colon": 91})
    ents = [Entity(2, 4, KNOW), Entity(6, 7, [80]), Entity(10, 12, [60, SP.sep, 61])]
    kilm = build_train_example(TEXT, ents, 5, 0, 0, MaskingParams(0.0, 3.0, 1.0, 2), sp)
    text = build_train_example(TEXT, ents, 5, 0, 0, MaskingParams(0.0, 3.0, 1.0, 2, knowledge_slot=False,
                                                                 knowledge_as_text=True), sp)
    labels = text.labels.tolist()
    assert not set(labels) & {SP.ent, SP.ent_end, SP.desc, SP.desc_end, SP.mask, SP.sep}
    assert text.input_ids.tolist() == labels  # mask ratio 0: nothing masked, the knowledge is plain text
    # The same two entities as KILM's draw, their knowledge after the mention with <sep> written as ':'.
    kilm_knowledge = [t for t, k in zip(kilm.labels.tolist(), kilm.knowledge) if k and t != SP.desc_end]
    assert [t for t, k in zip(labels, text.knowledge) if k and t != 90] == [91 if t == SP.sep else t
                                                                             for t in kilm_knowledge]
    # Token by token: "<s> 10 [11 12] , 50 : 51 , 13 </s>" for the mention [11 12] (KNOW-like knowledge).
    one = appositive_sequences([10, 11, 12, 13], [Entity(1, 3, [50, SP.sep, 51])], sp)
    assert one[1].tolist() == [0, 10, 11, 12, 90, 50, 91, 51, 90, 13, 2]
    assert one[1][one[2]].tolist() == [50, 91, 51, 90]
    # Masks fall where BART's infilling puts them: at ratio 0.3 the knowledge is sometimes masked, sometimes not.
    masked = [build_train_example(TEXT, ents, 5, 0, e, MaskingParams(0.3, 3.0, 1.0, 2, False, True), sp)
              for e in range(8)]
    assert all(SP.mask in m.input_ids.tolist() and m.labels.tolist().count(90) == 4 for m in masked)
    with pytest.raises(ValueError, match="rerun kilm-ray preprocess"):  # a dataset without ',' and ':' ids
        build_train_example(TEXT, ents, 5, 0, 0, MaskingParams(0.0, 3.0, 1.0, 2, False, True), SP)
