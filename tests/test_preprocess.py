"""The Ray Data preprocessing job on the real dump excerpt: outputs, stats, determinism, bad input,
s3:// input and output (moto server), and the Ray Dataset of masked batches."""

import bz2
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from kilm_ray.data.corpus.articles import SPLITS
from kilm_ray.data.corpus.compressed import TruncatedInput
from kilm_ray.store.loader import DataError, SampleStore, read_meta, special_ids_of, split_files, verify_tokenizer
from kilm_ray.data.masked_dataset import collate_fn, masked_dataset
from kilm_ray.method.masking import MaskingParams
from kilm_ray.data.plan import preprocess
from kilm_ray.data.commit import dataset_path

from conftest import DUMP, REPO, WORDNET


def read_split(out, split):
    """The rows of a split, from the files its manifest lists."""
    return [row for f in split_files(str(out), split) for row in pq.read_table(f).to_pylist()]


def sorted_rows(out, split):
    return sorted(read_split(out, split), key=lambda r: r["sample_id"])


def test_outputs_and_stats_on_real_data(tiny_data, tiny_config):
    stats = json.load(open(dataset_path(tiny_data, "stats")))
    assert stats["pages"]["read"] == 206 and stats["pages"]["redirects"] == 100
    assert stats["pages"]["articles"] + sum(stats["pages"]["skipped"].values()) == 106
    links = stats["links"]
    known = sum(links["with_knowledge"].values())
    assert known + links["without_knowledge"] == links["total"] > 1500
    assert links["with_knowledge"]["external"] > 700 and links["with_knowledge"]["first_sentence"] > 0
    # WordNet has no titles: its rows match by name, or by a bare name carrying the link's qualifier.
    by_rule = links["external_by_rule"]
    assert sum(by_rule.values()) == links["with_knowledge"]["external"] and by_rule["title"] == 0
    assert by_rule["name"] > 700 and by_rule["qualified"] > 0
    assert stats["knowledge_base"]["entities"] > 100_000 and stats["knowledge_base"]["bad_lines"] == 0
    assert stats["pages"]["skipped"]["disambiguation"] == 8  # Austin (disambiguation), Aberdeen (...), ...
    rows = {s: read_split(tiny_data, s) for s in SPLITS}
    assert not [r for s in SPLITS for r in rows[s] if "(disambiguation)" in r["article"] + "".join(r["ent_title"])]
    for split in SPLITS:
        assert stats["samples"][split]["chunks"] == len(rows[split]) > 0
    train_articles = {r["article"] for r in rows["train"]}
    assert not train_articles & {r["article"] for r in rows["valid"]}
    assert not train_articles & {r["article"] for r in rows["test"]}
    assert not {r["article"] for r in rows["valid"]} & {r["article"] for r in rows["test"]}
    # Stored chunks hold spans and knowledge, not masks.
    sp = special_ids_of(tiny_data)
    for r in rows["train"]:
        assert len(r["input_ids"]) <= tiny_config.data.max_text_tokens and sp.mask not in r["input_ids"]
        for s, e, k in zip(r["ent_start"], r["ent_end"], r["ent_knowledge"]):
            assert 0 <= s < e <= len(r["input_ids"]) and sp.sep in k
    manifest = json.load(open(f"{tiny_data}/manifest.json"))
    assert manifest["special_ids"] == sp.__dict__ and (REPO / "configs").exists()
    for split in SPLITS:  # the manifest lists every shard with its rows and sample-id range
        files = manifest["files"][split]
        assert sum(f["rows"] for f in files) == stats["samples"][split]["chunks"]
        for f in files:
            ids = pq.read_table(f"{tiny_data}/{manifest['shards']}/{f['path']}", columns=["sample_id"])["sample_id"]
            assert (ids[0].as_py(), ids[-1].as_py()) == (f["min_sample_id"], f["max_sample_id"])
    assert len(manifest["tokenizer_sha256"]) == 64 and manifest["config"]["corpus"]["mode"] == "lead"
    assert not (Path(tiny_data) / "_work").exists()  # the work directory goes once committed
    # Everything the manifest lists lives under its key.
    assert manifest["shards"] == f"datasets/{manifest['run_key']}" and manifest["tokenizer"].startswith(manifest["shards"])


def test_mentions_decode_to_their_text(tiny_data):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dataset_path(tiny_data, "tokenizer"))
    store = SampleStore.load(tiny_data, "train")
    checked = 0
    for i in range(len(store)):
        ids, text = store.ids(i), store.text(i)
        for ent, title in zip(store.entities(i), store.entity_titles(i)):
            mention = tok.decode(ids[ent.start:ent.end]).strip()
            assert mention and mention in text
            assert tok.decode(ent.knowledge).startswith(" " + title)
            checked += 1
    assert checked > 500


def files_of(directory) -> dict:
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in Path(directory).rglob("*") if p.is_file()}


def test_killed_in_the_shard_stage_keeps_the_commit_and_reruns_identical(tmp_path, ray_cluster, tiny_data,
                                                                            tiny_config):
    """A dataset is committed (a copy of the session's tiny_data); a prepress with other settings (another
    run key, the same samples) is killed while it writes its shards: the committed dataset stays readable.
    The same command rerun reuses the stages that finished and commits output identical (row for row) to
    an uninterrupted run; rerun once more, it writes nothing."""
    import ray

    from kilm_ray.data.stages import HOLD_BEFORE_COMMIT_ENV

    out = tmp_path / "data"
    shutil.copytree(tiny_data, out)
    before = read_meta(str(out))
    cmd = [sys.executable, "-m", "kilm_ray.cli", "preprocess", "--dump", str(DUMP), "--knowledge", str(WORDNET),
           "--out", str(out), "--address", ray.get_runtime_context().gcs_address, "corpus.lookup_max_input_mb=65"]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              env={**os.environ, HOLD_BEFORE_COMMIT_ENV: "120"})
    deadline = time.time() + 300
    while time.time() < deadline and not [p for p in out.glob("datasets/*/train/*.parquet")
                                          if before["run_key"] not in str(p)]:
        assert driver.poll() is None, "preprocess ended before it could be interrupted"
        time.sleep(0.1)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert read_meta(str(out)) == before  # the commit point did not move
    verify_tokenizer(str(out))
    for split in SPLITS:
        assert sorted_rows(out, split) == sorted_rows(tiny_data, split)

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "parsed by an earlier run, reused" in rerun.stderr and "tokenizer: saved by an earlier run" in rerun.stderr
    after = read_meta(str(out))
    assert after["run_key"] != before["run_key"] and (out / before["shards"] / "manifest.json").exists()
    for split in SPLITS:
        assert sorted_rows(out, split) == sorted_rows(tiny_data, split)
    assert Path(verify_tokenizer(str(out)), "tokenizer.json").read_bytes() == \
        Path(verify_tokenizer(tiny_data), "tokenizer.json").read_bytes()
    assert not (out / "_work").exists()

    snapshot = files_of(out)
    cfg = tiny_config.with_overrides({"corpus.lookup_max_input_mb": 65})
    stats = preprocess(cfg, [str(DUMP)], str(out), [str(WORDNET)])
    assert stats["reused"] and files_of(out) == snapshot  # nothing written, not even the same bytes again


@pytest.mark.slow
def test_a_worker_killed_mid_stage_on_two_nodes_changes_no_row(tmp_path, tiny_data):
    """On a simulated two-node cluster (tests/preprocess_cluster.py) a local --out is refused until declared
    shared; then a parse-stage writer dies after its files are in place and before it reports them, and
    is run again: the committed samples are those of the uninterrupted run (tiny_data), row for row, no
    sample_id twice. A stage listed from its directory would hold the dead attempt's file too."""
    out, marker = tmp_path / "data", tmp_path / "killed"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "preprocess_cluster.py"), str(out), str(marker),
                           str(DUMP), str(WORDNET)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert f"--out {out} is a local path, but this Ray cluster has 3 nodes" in summary["refused"]
    assert summary["killed"] and summary["stats"]["pages"]["read"] == 206
    for split in SPLITS:
        rows = sorted_rows(out, split)
        assert len({r["sample_id"] for r in rows}) == len(rows) and rows == sorted_rows(tiny_data, split)


def test_readers_refuse_what_is_not_committed_and_a_changed_tokenizer(tmp_path, tiny_data):
    (tmp_path / "partial" / "_work" / "k").mkdir(parents=True)
    (tmp_path / "partial" / "_work" / "k" / "pages.json").write_text("{}")  # what a killed run leaves
    with pytest.raises(DataError, match=r"has no manifest.json.*it holds .*rerun"):
        read_meta(str(tmp_path / "partial"))
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    tokenizer = Path(dataset_path(str(data), "tokenizer"), "tokenizer.json")
    tokenizer.write_text(tokenizer.read_text().replace('"<sep>"', '"<SEP>"'))
    train = subprocess.run([sys.executable, "-m", "kilm_ray.cli", "train", "--no-ray", "--data", str(data),
                            "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert train.returncode == 2, train.stderr[-3000:]
    last = train.stderr.strip().splitlines()[-1]
    assert last.startswith("kilm-ray train: error:") and f"{tokenizer} is not the tokenizer" in last
    assert "tokenizer_sha256" in last


@pytest.mark.slow
def test_multistream_dump_is_read_in_byte_ranges(tmp_path, ray_cluster, tiny_data, tiny_config, caplog):
    """The excerpt rewritten as a multistream dump (20 pages per bz2 stream) with its index: the index
    cuts it into several read tasks. Resolved the way a full dump is (link_resolution auto with the
    input over the lookup limit: Ray Data group-bys), the samples are
    those of the single-file read resolved by lookup (the session's tiny_data), row for row."""
    from kilm_ray.data.corpus.dump import iter_raw_pages, read_units, write_multistream

    pages = [raw.xml for raw in iter_raw_pages(str(DUMP))]
    dump = write_multistream(pages, str(tmp_path / "enwiki-pages-articles-multistream.xml.bz2"), pages_per_stream=20)
    units = read_units([str(tmp_path)], unit_bytes=30_000)
    assert len(units) > 2 and all(u.uri == dump and u.length > 0 for u in units)  # the index file is not a dump
    cfg = tiny_config.with_overrides({"corpus.read_unit_mb": 30_000 / 2**20, "corpus.lookup_max_input_mb": 1})
    with caplog.at_level(logging.INFO, logger="kilm_ray.pipeline"):
        stats = preprocess(cfg, [str(tmp_path)], str(tmp_path / "out"), [str(WORDNET)])
    assert "link resolution: distributed" in caplog.text
    assert re.search(r"links\+redirects\+knowledge\+kb: [0-9.]+ MB of input -> \d+ shuffle partitions", caplog.text)
    assert stats["pages"]["read"] == len(pages) == 206
    assert stats["links"] == json.load(open(dataset_path(tiny_data, "stats")))["links"]
    for split in SPLITS:
        assert sorted_rows(tmp_path / "out", split) == sorted_rows(tiny_data, split)


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
    # A dump that ends early stops the run, naming the file and the byte (issue 31: it used to commit
    # whatever was read, and a valid dump lost pages the same way); the user may keep what was read.
    with pytest.raises(TruncatedInput, match=rf"broken.xml.bz2: ends at byte {dump.stat().st_size}, inside"):
        preprocess(tiny_config, [str(dump)], str(tmp_path / "stopped"), [str(kb)])
    assert not (tmp_path / "stopped" / "manifest.json").exists()
    keep = tiny_config.with_overrides({"corpus.keep_truncated_input": True})
    stats = preprocess(keep, [str(dump)], str(tmp_path / "out"), [str(kb)])
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


def test_s3_globs_and_prefixes_in_and_dataset_out(s3_server, ray_cluster, tiny_config):
    from kilm_ray import storage

    s3_server.put_object(Bucket="kilm", Key="dumps/enwiki-p1.xml.bz2", Body=DUMP.read_bytes())
    s3_server.put_object(Bucket="kilm", Key="dumps/README.txt", Body=b"not a dump")
    s3_server.put_object(Bucket="kilm", Key="kb/part-0.jsonl.gz", Body=WORDNET.read_bytes())
    s3_server.put_object(Bucket="kilm", Key="kb/part-1.jsonl", Body=b'{"name": "Zq", "description": "a test"}\n')
    assert storage.expand("s3://kilm/dumps/*.bz2", (".bz2",)) == ["s3://kilm/dumps/enwiki-p1.xml.bz2"]
    cfg = tiny_config.with_overrides({"corpus.max_pages": 30})
    stats = preprocess(cfg, ["s3://kilm/dumps/enwiki-*.xml.bz2"], "s3://kilm/data/tiny", ["s3://kilm/kb/"])
    assert stats["knowledge_base"]["files"] == ["s3://kilm/kb/part-0.jsonl.gz", "s3://kilm/kb/part-1.jsonl"]
    assert stats["pages"]["read"] == 30
    keys = [o["Key"] for o in s3_server.list_objects_v2(Bucket="kilm", Prefix="data/tiny/")["Contents"]]
    manifest = json.loads(s3_server.get_object(Bucket="kilm", Key="data/tiny/manifest.json")["Body"].read())
    assert f"data/tiny/{manifest['tokenizer']}/tokenizer.json" in keys and "data/tiny/_work" not in " ".join(keys)
    verify_tokenizer("s3://kilm/data/tiny")
    store = SampleStore.load("s3://kilm/data/tiny", "train")
    assert len(store) == stats["samples"]["train"]["chunks"] > 0


def test_masked_ray_dataset_matches_the_training_loader(tiny_data, tiny_config, ray_cluster):
    ds = masked_dataset(tiny_data, "valid", epoch=3, seed=11, cfg=tiny_config)
    rows = ds.take_all()
    store = SampleStore.load(tiny_data, "valid")
    sp = special_ids_of(tiny_data)
    params = MaskingParams(tiny_config.masking.mask_ratio, tiny_config.masking.poisson_lambda,
                           tiny_config.masking.knowledge_prob)
    assert sorted(r["sample_id"] for r in rows) == sorted(store.sample_ids.tolist())
    by_id = {int(s): i for i, s in enumerate(store.sample_ids)}
    for r in rows:
        ex = store.train_example(by_id[int(r["sample_id"])], 11, 3, params, sp)
        assert np.array_equal(ex.input_ids, r["input_ids"]) and np.array_equal(ex.labels, r["labels"])
    # Same order on a second pass; batches come out padded, ready for training.
    assert [r["sample_id"] for r in masked_dataset(tiny_data, "valid", 3, 11, tiny_config).take_all()] == \
        [r["sample_id"] for r in rows]
    batch = next(iter(ds.iter_torch_batches(batch_size=4, collate_fn=collate_fn(tiny_config, tiny_data))))
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].shape == batch["label_weights"].shape
