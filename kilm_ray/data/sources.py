"""Where rows come from: dump pages (one read task per dump file or multistream byte range), knowledge-base
lines (one per byte range of a file, ``kilm_ray.data.corpus.ranges``), and the files of a saved stage (the
list its writers reported). Each read task streams; none holds more than a block."""

from __future__ import annotations

import os
from typing import Callable, Iterable, Optional

import pyarrow as pa

from kilm_ray import storage
from kilm_ray.config import KilmConfig
from kilm_ray.data.corpus.dump import ReadUnit, iter_raw_pages
from kilm_ray.data.corpus.ranges import TextRange, iter_range_lines
from kilm_ray.data.rows import KB_LINE_SCHEMA, RAW_SCHEMA, table
from kilm_ray.data.shuffle import light_args

KB_LINES_PER_BLOCK = 20_000
FILES_PER_READ_TASK = 8
STAGE_FILE_ROWS = 2048  # page records per stage file (a few MB of parquet)
# Set to a file path, every stage file a read task opens is appended to it (bench/preprocess_scale.py
# counts the passes over the parse stage's output with it).
TRACE_READS_ENV = "KILM_RAY_TRACE_READS"


def streaming_datasource(makers: list[Callable[[], Iterable[pa.Table]]], schema: pa.Schema, labels: list[str]):
    """A Ray Data datasource with one streaming read task per ``makers`` callable."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class StreamingDatasource(Datasource):
        def estimate_inmemory_data_size(self) -> Optional[int]:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
            return [ReadTask(make, BlockMetadata(num_rows=None, size_bytes=None, input_files=[label], exec_stats=None),
                             schema=schema) for make, label in zip(makers, labels)]

    return StreamingDatasource()


def _read(makers: list, schema: pa.Schema, labels: list[str], cfg: Optional[KilmConfig]):
    import ray.data

    if not makers:
        return ray.data.from_arrow(schema.empty_table())
    args = light_args(cfg) if cfg is not None else {"num_cpus": 0.25}
    return ray.data.read_datasource(streaming_datasource(makers, schema, labels), override_num_blocks=len(makers),
                                    **args)


def _blocks(rows: Iterable[dict], schema: pa.Schema, per_block: int) -> Iterable[pa.Table]:
    batch: list[dict] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= per_block:
            yield table(batch, schema)
            batch = []
    if batch:
        yield table(batch, schema)


def read_raw_pages(units: list[ReadUnit], cfg: KilmConfig):
    """Raw ``<page>`` elements of every read unit (decompressing and cutting at ``<page>``: light work)."""
    c = cfg.corpus

    def rows(unit: ReadUnit) -> Iterable[dict]:
        for raw in iter_raw_pages(unit, c.max_pages, keep_truncated=c.keep_truncated_input):
            yield {"source": raw.source, "index": raw.index, "xml": raw.xml, "error": raw.error}

    makers = [lambda u=u: _blocks(rows(u), RAW_SCHEMA, c.pages_per_block) for u in units]
    return _read(makers, RAW_SCHEMA, [u.label for u in units], cfg)


def read_kb_lines(ranges: list[TextRange], cfg: KilmConfig):
    """Lines of knowledge-base files, one read task per byte range: rows ``(range, line_no, line)``."""
    def rows(i: int, r: TextRange) -> Iterable[dict]:
        for line_no, line in enumerate(iter_range_lines(r), start=1):
            yield {"range": i, "line_no": line_no, "line": line}

    makers = [lambda i=i, r=r: _blocks(rows(i, r), KB_LINE_SCHEMA, KB_LINES_PER_BLOCK) for i, r in enumerate(ranges)]
    return _read(makers, KB_LINE_SCHEMA, [r.label for r in ranges], cfg)


def _parquet_blocks(files: list[str], columns: Optional[list[str]], rows_per_block: int) -> Iterable[pa.Table]:
    import pyarrow.parquet as pq

    trace = os.environ.get(TRACE_READS_ENV)
    for uri in files:
        if trace:
            with open(trace, "a") as f:
                f.write(f"{uri}\n")
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=rows_per_block, columns=columns):
                yield pa.Table.from_batches([batch])


def read_parquet_files(files: list[str], schema: pa.Schema, columns: Optional[list[str]] = None,
                       rows_per_block: int = STAGE_FILE_ROWS, cfg: Optional[KilmConfig] = None):
    """A Ray Dataset of parquet files we know (a stage's record, a manifest): one streaming read task per
    few files. Ray 2.60's ``read_parquet`` starts 32 footer-reading actors (a process each) per call to
    plan the read; on a 2-core node the distributed pipeline's reads started hundreds and the node ran
    out of memory on a 2 k-article corpus. We already know the files and their schema."""
    if columns:
        schema = pa.schema([schema.field(c) for c in columns])
    groups = [files[i:i + FILES_PER_READ_TASK] for i in range(0, len(files), FILES_PER_READ_TASK)]
    makers = [lambda g=g: _parquet_blocks(g, columns, rows_per_block) for g in groups]
    return _read(makers, schema, [g[0] for g in groups], cfg)
