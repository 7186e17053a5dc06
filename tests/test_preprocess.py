"""The Ray Data preprocessing job on the real dump excerpt: outputs, stats, determinism, bad input,
s3:// input and output (moto server), and the Ray Dataset of masked batches."""

import bz2
import json
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from kilm_ray.corpus.articles import SPLITS
from kilm_ray.data import collate_fn, masked_dataset, preprocess
from kilm_ray.loader import SampleStore, special_ids_of
from kilm_ray.masking import MaskingParams

from conftest import DUMP, REPO, WORDNET


def read_split(out, split):
    return pq.read_table(f"{out}/{split}").to_pylist()  # an empty split is one empty shard


def test_outputs_and_stats_on_real_data(tiny_data, tiny_config):
    stats = json.load(open(f"{tiny_data}/stats.json"))
    assert stats["pages"]["read"] == 206 and stats["pages"]["redirects"] == 100
    assert stats["pages"]["articles"] + sum(stats["pages"]["skipped"].values()) == 106
    links = stats["links"]
    known = sum(links["with_knowledge"].values())
    assert known + links["without_knowledge"] == links["total"] > 1500
    assert links["with_knowledge"]["external"] > 700 and links["with_knowledge"]["first_sentence"] > 0
    assert stats["knowledge_base"]["entities"] > 100_000 and stats["knowledge_base"]["bad_lines"] == 0
    rows = {s: read_split(tiny_data, s) for s in SPLITS}
    for split in SPLITS:
        assert stats["samples"][split]["chunks"] == len(rows[split]) > 0
    train_articles = {r["article"] for r in rows["train"]}
    assert not train_articles & {r["article"] for r in rows["valid_unseen"]}
    assert {r["article"] for r in rows["valid_seen"]} <= train_articles
    # Stored chunks hold spans and knowledge, not masks.
    sp = special_ids_of(tiny_data)
    for r in rows["train"]:
        assert len(r["input_ids"]) <= tiny_config.data.max_text_tokens and sp.mask not in r["input_ids"]
        for s, e, k in zip(r["ent_start"], r["ent_end"], r["ent_knowledge"]):
            assert 0 <= s < e <= len(r["input_ids"]) and sp.sep in k
    meta = json.load(open(f"{tiny_data}/meta.json"))
    assert meta["special_ids"] == sp.__dict__ and (REPO / "configs").exists()


def test_mentions_decode_to_their_text(tiny_data):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(f"{tiny_data}/tokenizer")
    store = SampleStore.load(tiny_data, "train")
    checked = 0
    for i in range(len(store)):
        ids, text = store.ids(i), store.text(i)
        for ent, title in zip(store.entities(i), store.entity_titles(i)):
            mention = tok.decode(ids[ent.start:ent.end]).strip()
            assert mention and mention in text
            assert tok.decode(ent.knowledge).startswith(title)
            checked += 1
    assert checked > 500


def test_rerun_is_identical(tmp_path, ray_cluster, tiny_config):
    cfg = tiny_config.with_overrides({"corpus.max_pages": 40})
    a, b = tmp_path / "a", tmp_path / "b"
    preprocess(cfg, [str(DUMP)], str(a), [str(WORDNET)])
    preprocess(cfg, [str(DUMP)], str(b), [str(WORDNET)])
    for split in SPLITS:
        ra = sorted(read_split(a, split), key=lambda r: r["sample_id"])
        rb = sorted(read_split(b, split), key=lambda r: r["sample_id"])
        assert ra == rb
    assert (a / "tokenizer" / "tokenizer.json").read_bytes() == (b / "tokenizer" / "tokenizer.json").read_bytes()


def test_bad_input_is_skipped_counted_and_named(tmp_path, ray_cluster, tiny_config):
    text = bz2.decompress(DUMP.read_bytes()).decode()
    pages = text.split("<page>")
    # Page 3 loses its closing tags (malformed); the file ends mid-way through a compressed stream.
    broken = pages[3].replace("</revision>", "", 1)
    doctored = "<page>".join(pages[:3] + [broken] + pages[4:30])
    data = bz2.compress(doctored.encode(), compresslevel=1)  # 100 kB blocks: a cut keeps earlier blocks
    dump = tmp_path / "broken.xml.bz2"
    dump.write_bytes(data[: int(len(data) * 0.8)])
    kb = tmp_path / "kb.jsonl"
    kb.write_text('{"name": "Anarchy", "description": "a state of lawlessness"}\nnot json\n{"description": "x"}\n')
    stats = preprocess(tiny_config, [str(dump)], str(tmp_path / "out"), [str(kb)])
    errors = stats["pages"]["errors"]
    assert errors["malformed_page"] == 1 and errors["truncated_input"] == 1
    assert any("malformed_page" in e and "not well-formed" in e for e in stats["pages"]["error_examples"])
    assert stats["knowledge_base"]["bad_lines"] == 2
    assert stats["knowledge_base"]["bad_examples"][0].startswith(f"{kb}:2: not JSON")
    assert stats["samples"]["train"]["chunks"] > 0  # the job still finished and wrote its data


@pytest.mark.parametrize("args, message", [
    (["--dump", "/nonexistent/dump.xml.bz2"], "dump not found: /nonexistent/dump.xml.bz2"),
    (["--dump", str(DUMP), "--knowledge", "/nope/kb.jsonl"], "knowledge file not found: /nope/kb.jsonl"),
    (["--dump", "s3://kilm/no-such-key.xml.bz2"], "dump not found: s3://kilm/no-such-key.xml.bz2"),
    (["--dump", str(DUMP), "data.max_source_tokens=lots"], "data.max_source_tokens: 'lots' should be an integer"),
])
def test_missing_inputs_fail_fast_with_one_line(args, message, tmp_path, s3_server):
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "kilm_ray.cli", "preprocess", "--out", str(tmp_path / "o"), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("kilm-ray preprocess: error:") and message in lines[-1]
    assert not any("Traceback" in line for line in lines)
    assert time.time() - started < 30  # before any Ray work starts


def test_s3_dump_in_and_dataset_out(s3_server, ray_cluster, tiny_config):
    s3_server.put_object(Bucket="kilm", Key="dumps/enwiki.xml.bz2", Body=DUMP.read_bytes())
    s3_server.put_object(Bucket="kilm", Key="kb/wordnet.jsonl.gz", Body=WORDNET.read_bytes())
    cfg = tiny_config.with_overrides({"corpus.max_pages": 30})
    stats = preprocess(cfg, ["s3://kilm/dumps/enwiki.xml.bz2"], "s3://kilm/data/tiny",
                       ["s3://kilm/kb/wordnet.jsonl.gz"])
    keys = [o["Key"] for o in s3_server.list_objects_v2(Bucket="kilm", Prefix="data/tiny/")["Contents"]]
    assert "data/tiny/stats.json" in keys and "data/tiny/tokenizer/tokenizer.json" in keys
    store = SampleStore.load("s3://kilm/data/tiny", "train")
    assert len(store) == stats["samples"]["train"]["chunks"] > 0


def test_masked_ray_dataset_matches_the_training_loader(tiny_data, tiny_config, ray_cluster):
    ds = masked_dataset(tiny_data, "valid_seen", epoch=3, seed=11, cfg=tiny_config)
    rows = ds.take_all()
    store = SampleStore.load(tiny_data, "valid_seen")
    sp = special_ids_of(tiny_data)
    params = MaskingParams(tiny_config.masking.mask_ratio, tiny_config.masking.poisson_lambda,
                           tiny_config.masking.knowledge_prob)
    assert sorted(r["sample_id"] for r in rows) == sorted(store.sample_ids.tolist())
    by_id = {int(s): i for i, s in enumerate(store.sample_ids)}
    for r in rows:
        ex = store.train_example(by_id[int(r["sample_id"])], 11, 3, params, sp)
        assert np.array_equal(ex.input_ids, r["input_ids"]) and np.array_equal(ex.labels, r["labels"])
    # Same order on a second pass; batches come out padded, ready for training.
    assert [r["sample_id"] for r in masked_dataset(tiny_data, "valid_seen", 3, 11, tiny_config).take_all()] == \
        [r["sample_id"] for r in rows]
    batch = next(iter(ds.iter_torch_batches(batch_size=4, collate_fn=collate_fn(tiny_config, tiny_data))))
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].shape == batch["label_weights"].shape
