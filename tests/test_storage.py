"""Local paths and s3:// behind one interface, on the real S3 protocol (moto on loopback)."""

from pathlib import Path

from kilm_ray import storage


def test_materialized_export_without_weights_leaves_nothing_behind(s3_server, tmp_path):
    """What a Serve ingress replica does with an s3:// export: the tokenizer and config only, in a
    temporary directory removed once they are loaded."""
    export = tmp_path / "export"
    (export / "sub").mkdir(parents=True)
    for name, data in (("config.json", b"{}"), ("tokenizer.json", b"tok"), ("model.safetensors", b"W" * 1000),
                       ("sub/extra.txt", b"x")):
        (export / name).write_bytes(data)
    storage.upload_dir(export, "s3://kilm/exports/v1")
    with storage.materialized("s3://kilm/exports/v1", skip_suffixes=storage.WEIGHT_SUFFIXES) as local:
        got = sorted(str(p.relative_to(local)) for p in Path(local).rglob("*") if p.is_file())
        assert got == ["config.json", "sub/extra.txt", "tokenizer.json"]
        assert (local / "tokenizer.json").read_bytes() == b"tok"
    assert not Path(local).exists()
    with storage.materialized(str(export)) as same:  # a local export is used in place
        assert same == export


def test_file_sizes_take_one_listing_per_directory_and_no_directory_markers(s3_server, tmp_path):
    """The plan's sizes of many files (knowledge shards) come from one listing per directory, equal to each
    file's own; writing to S3 makes no directory marker objects (a request per level per file before)."""
    for i in range(5):
        s3_server.put_object(Bucket="kilm", Key=f"sizes/kb/part-{i}.jsonl", Body=b"x" * (10 + i))
    s3_server.put_object(Bucket="kilm", Key="sizes/dump.xml.bz2", Body=b"y" * 7)
    uris = [f"s3://kilm/sizes/kb/part-{i}.jsonl" for i in range(5)] + ["s3://kilm/sizes/dump.xml.bz2"]
    assert storage.file_sizes(uris) == {u: storage.file_size(u) for u in uris} == {
        **{f"s3://kilm/sizes/kb/part-{i}.jsonl": 10 + i for i in range(5)}, "s3://kilm/sizes/dump.xml.bz2": 7}
    local = tmp_path / "kb"
    local.mkdir()
    for i in range(3):
        (local / f"part-{i}.jsonl").write_bytes(b"z" * (i + 1))
    paths = [str(local / f"part-{i}.jsonl") for i in range(3)]
    assert storage.file_sizes(paths) == {p: i + 1 for i, p in enumerate(paths)}
    storage.write_bytes("s3://kilm/markers/a/b/c.json", b"{}")
    keys = [o["Key"] for o in s3_server.list_objects_v2(Bucket="kilm", Prefix="markers/")["Contents"]]
    assert keys == ["markers/a/b/c.json"]
    assert storage.s3_filesystem() is storage.s3_filesystem()  # one client per process and settings
