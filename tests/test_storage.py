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
