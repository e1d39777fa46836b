"""The train stage's rows on disk: one uncompressed Arrow IPC file that every worker memory-maps.

    prepare_training_data(spec, teach_folder) -> TrainingData     the driver, once per teach output (cached)
    TrainingData.open(spec, model)             -> TrainingRows     each worker: lengths now, rows on demand

With the run folder on shared storage (components/storage.py), the driver writes the file into its node's stage cache
and uploads it; each node's workers memory-map one local copy, staged on first use under the file's content key.

At the paper's scale (160,000 rows x 4,096 float32 dims, 2.6 GB of targets) the rows must never become Python
objects: as tuples of floats they take ~8x their float32 size, once on the driver, once in the object store and
once per worker. Instead the driver streams the teach stage's Parquet shards, one at a time, into

    <run_dir>/train_data/<key>/rows.arrow    record batches (one per input shard) with the columns
        id               string   the teach output's integer id as 12 digits, so that string order is id order
        id_sha1          fixed_size_binary(20)   sha1 of id: the held-out split (components.training.split_holdout)
        query, response  string
        query_tokens     int32    tokens of the query as collate tokenises it, before the max_query_tokens cap
        response_tokens  int32    tokens of the response, before the EOS and the max_response_tokens cap
        teacher          fixed_size_list<float32>[D]
    <run_dir>/train_data/<key>/meta.json     written last: the file is complete

keyed by the teach output and the tokenizer, so a rerun, a resumed run or every trial of a sweep reuses it and
nobody tokenises the whole table again. Rows with an empty response are left out (they teach nothing), as before.

Workers open the file with a memory map: Arrow reads it zero-copy, and only the pages a worker touches are read
(and counted in its RSS): the token counts and hashes of every row (28 bytes a row), then one micro batch at a
time. Whole-table statistics (the mean target of `loss.center_targets`) are computed by the driver with plain
reads, chunk by chunk, and passed to the workers. On a multi-node cluster the run folder already has to be
shared storage (Ray Train's storage_path, the checkpoints, lives in it), so every worker reads the same file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from components import storage
from components.spec import Spec
from components.stages import ShardedOutput, StageError, content_key
from components.storage import RemotePath

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the file's layout or the token counting changes
FILE, META = "rows.arrow", "meta.json"
TOKENIZE_CHUNK = 4096  # rows tokenised per call: bounds the Python lists of a batch
REQUIRED = ("id", "query", "response", "teacher")


class TrainingDataError(StageError):
    """The teach output cannot be trained on; the message names the file, the row and what is wrong."""


def _schema(dimension: int) -> pa.Schema:
    return pa.schema([
        ("id", pa.string()), ("id_sha1", pa.binary(20)), ("query", pa.string()), ("response", pa.string()),
        ("query_tokens", pa.int32()), ("response_tokens", pa.int32()),
        ("teacher", pa.list_(pa.float32(), dimension)),
    ])


@dataclass(frozen=True)
class TrainingData:
    """A complete training file: what run_train hands to its workers (small: a path and counts, never rows)."""

    path: str
    rows: int
    dimension: int
    fingerprint: str  # of the rows (the teach output's key): part of the training run's name

    def open(self, spec: Spec, model: Any = None, mean: Sequence[float] | None = None) -> TrainingRows:
        return TrainingRows(self, spec, mean)

    @property
    def key(self) -> str:
        """The file's content key: the name of its folder (and of its staged copies on every node)."""
        return storage.location(self.path).parent.name

    def local_path(self) -> str:
        """The file as this node can memory-map it: where it is, or this node's staged copy of shared storage."""
        return str(storage.staged(self.path, self.key))

    def trainer_datasets(self, spec: Spec | None = None) -> dict:
        return {}  # the workers read the file themselves; nothing goes through Ray Data

    def split(self, fraction: float) -> tuple[np.ndarray, np.ndarray]:
        return split_indices(TrainingFile(self.local_path()).id_hashes(), fraction)

    def train_mean(self, spec: Spec) -> list[float]:
        """The training rows' mean teacher vector (see LossSpec.center_targets), read chunk by chunk.

        Plain reads, not the memory map, so that the driver's RSS stays one record batch; the sum runs row after
        row in float64, exactly as numpy's mean over the whole (rows, D) array does (the same bits as before).
        """
        train, _ = self.split(spec.data.holdout_fraction)
        keep = np.zeros(self.rows, dtype=bool)
        keep[train] = True
        total, start = np.zeros(self.dimension), 0
        with pa.OSFile(self.local_path()) as source:
            reader = pa.ipc.open_file(source)
            for index in range(reader.num_record_batches):
                column = reader.get_batch(index).column("teacher")
                chosen = keep[start : start + len(column)]
                start += len(column)
                if chosen.any():
                    values = _vectors(column)[chosen].astype(np.float64)
                    total = np.add.reduce(np.concatenate([total[None], values]), axis=0)
        return (total / len(train)).tolist()


# --------------------------------------------------------------------------------------------- writing


def prepare_training_data(spec: Spec, folder: str | Path) -> TrainingData:
    """The training file of the teach output in `folder` (written now unless an earlier run did)."""
    output = ShardedOutput.load(folder)
    missing = output.missing_shards()
    if missing:
        raise TrainingDataError(f"{output.folder}: incomplete, shards {missing[:5]} missing; rerun the teach stage")
    return _prepare(spec, output.key, lambda: _teach_chunks(output), str(output.folder))


def training_data_from_rows(spec: Spec, rows: Sequence[Any], fingerprint: str) -> TrainingData:
    """The training file of a few in-memory rows (components.training.Row: tests, small experiments)."""
    def chunks() -> Iterator[tuple[str, pa.Table]]:
        ordered = sorted(rows, key=lambda row: row.id)  # id order, as the file always is
        yield "rows", pa.table({
            "id": pa.array([row.id for row in ordered], pa.string()),
            "query": pa.array([row.query for row in ordered], pa.string()),
            "response": pa.array([row.response for row in ordered], pa.string()),
            "teacher": pa.array([list(row.teacher) for row in ordered], pa.list_(pa.float32())),
        })

    return _prepare(spec, fingerprint, chunks, f"rows {fingerprint}")


def _prepare(spec: Spec, fingerprint: str, chunks, source_name: str) -> TrainingData:
    from components.generation import backbone_identity, load_tokenizer

    # Token counts depend on the tokenizer only; the backbone's identity names it (a changed folder, a new key).
    key = content_key({"format": FORMAT, "rows": fingerprint, "backbone": spec.backbone.model_dump(mode="json"),
                       "backbone_fingerprint": backbone_identity(spec.backbone).fingerprint})
    shared = spec.run_dir / "train_data" / key
    meta = shared / META
    if meta.is_file():
        info = json.loads(meta.read_text())
        return TrainingData(str((shared / FILE).resolve()), info["rows"], info["dimension"], fingerprint)
    # On shared storage the file is written into this node's stage cache (its staged copy), then uploaded.
    folder = shared if not isinstance(shared, RemotePath) else storage.stage_root() / key
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(spec.backbone)
    temporary = folder / f".{FILE}.{uuid.uuid4().hex}.tmp"
    writer, rows, skipped, dimension = None, 0, 0, None
    try:
        for label, table in chunks():
            for offset in range(0, table.num_rows, TOKENIZE_CHUNK):  # record batches of bounded size
                piece = table.slice(offset, TOKENIZE_CHUNK)
                batch, empty, dimension = _training_batch(label, piece, offset, tokenizer, dimension)
                skipped += empty
                if not batch.num_rows:
                    continue
                if writer is None:
                    writer = pa.ipc.new_file(str(temporary), _schema(dimension))
                writer.write_batch(batch)
                rows += batch.num_rows
        if writer is None:
            raise TrainingDataError(f"{source_name}: no rows with a non-empty response to train on")
        writer.close()
        writer = None
        os.replace(temporary, folder / FILE)
    finally:
        if writer is not None:
            writer.close()
        temporary.unlink(missing_ok=True)
    info = {"rows": rows, "dimension": dimension, "skipped_empty_responses": skipped, "source": source_name,
            "fingerprint": fingerprint}
    if folder != shared:
        storage.upload(folder / FILE, shared / FILE)
    meta.write_text(json.dumps(info, indent=2))  # last: the file is complete
    log.info("train data: %d rows x %d dims at %s (%d empty responses left out)", rows, dimension, shared, skipped)
    return TrainingData(str((shared / FILE).resolve()), rows, dimension, fingerprint)


def _teach_chunks(output: ShardedOutput) -> Iterator[tuple[str, pa.Table]]:
    """The teach output's shards, one table at a time, checked: names the file and the row of what is wrong."""
    previous = -1
    for path in output.shard_paths():
        table = read_shard(path)
        ids = table.column("id")
        if not pa.types.is_integer(ids.type):
            raise TrainingDataError(f"{path}: column 'id' must hold integers, got {ids.type}")
        if ids.null_count:
            raise TrainingDataError(f"{path}: row {_first(pc.is_null(ids))}: id is null")
        values = ids.to_numpy()
        if len(values) and (values[0] <= previous or (np.diff(values) <= 0).any()):
            raise TrainingDataError(f"{path}: ids are not increasing across the shards (a stage output's shards hold "
                                    f"ids in order); the first out of order is row {_first_unordered(values, previous)}")
        previous = int(values[-1]) if len(values) else previous
        text_ids = pa.array([f"{int(value):012d}" for value in values], pa.string())  # one shard's worth
        yield str(path), table.set_column(table.schema.get_field_index("id"), "id", text_ids)


def read_shard(path: Path | RemotePath) -> pa.Table:
    """One teach shard with the columns training needs; a cut-off or unreadable file is an error naming it."""
    try:
        parquet = pq.ParquetFile(storage.readable(path))
        names = parquet.schema_arrow.names
    except (OSError, pa.ArrowException) as err:
        raise TrainingDataError(f"{path}: not a readable Parquet file ({err}); it was cut off or overwritten. Delete it "
                                f"and the folder's _SUCCESS.json, then rerun the teach stage to write it again") from None
    missing = [column for column in REQUIRED if column not in names]
    if missing:
        raise TrainingDataError(f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(names)}); "
                                f"is this a teach stage output?")
    try:
        return parquet.read(columns=list(REQUIRED))
    except (OSError, pa.ArrowException) as err:
        raise TrainingDataError(f"{path}: cannot read its rows ({err}); it was cut off or overwritten. Delete it "
                                f"and the folder's _SUCCESS.json, then rerun the teach stage to write it again") from None


def _training_batch(label: str, table: pa.Table, offset: int, tokenizer, dimension: int | None
                    ) -> tuple[pa.RecordBatch, int, int | None]:
    """Rows of one input table (from row `offset` of the file `label`) as a record batch of the training file;
    checks types, nulls and the vectors' dimension, and names the file's row of the first problem."""
    for name in ("query", "response"):
        column = table.column(name)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise TrainingDataError(f"{label}: column '{name}' must hold strings, got {column.type}")
        if column.null_count:
            raise TrainingDataError(f"{_where(label, table, offset, _first(pc.is_null(column)))}: {name} is null")
    teacher = table.column("teacher")
    kind = teacher.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)) or not (
            pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type)):
        raise TrainingDataError(f"{label}: column 'teacher' must hold lists of numbers, got {kind}")
    if not table.num_rows:
        return pa.RecordBatch.from_pylist([], schema=_schema(dimension or 1)), 0, dimension
    teacher = teacher.combine_chunks()
    lengths = pc.list_value_length(teacher)
    if dimension is None:
        dimension = lengths[0].as_py()
        if not dimension:
            raise TrainingDataError(f"{_where(label, table, offset, 0)}: the teacher vector is "
                                    f"{'null' if dimension is None else 'empty'}")
    wrong = pc.fill_null(pc.not_equal(lengths, dimension), True)
    if pc.any(wrong).as_py():
        row = _first(wrong)
        got = lengths[row].as_py()
        raise TrainingDataError(f"{_where(label, table, offset, row)}: the teacher vector has "
                                f"{'no value (null)' if got is None else f'{got} dimensions'}, the first row of the "
                                f"data has {dimension}: every vector must come from the same teacher")
    flat = teacher.flatten()
    if flat.null_count:
        row = _first(pc.is_null(flat)) // dimension
        raise TrainingDataError(f"{_where(label, table, offset, row)}: the teacher vector has null values")
    vectors = pa.FixedSizeListArray.from_arrays(flat.cast(pa.float32()), dimension)
    # An empty answer teaches nothing: left out here, as the train stage always has (Python's strip, as before).
    keep = np.array([bool(text.strip()) for text in table.column("response").to_pylist()], dtype=bool)
    columns = {name: table.column(name).combine_chunks().cast(pa.string()) for name in ("id", "query", "response")}
    columns["teacher"] = vectors
    if not keep.all():
        mask = pa.array(keep)
        columns = {name: column.filter(mask) for name, column in columns.items()}
    ids, queries, responses = (columns[name].to_pylist() for name in ("id", "query", "response"))
    query_tokens, response_tokens = token_counts(tokenizer, queries, responses)
    sha1 = pa.array([hashlib.sha1(text.encode()).digest() for text in ids], pa.binary(20))
    batch = pa.RecordBatch.from_arrays(
        [columns["id"], sha1, columns["query"], columns["response"], pa.array(query_tokens, pa.int32()),
         pa.array(response_tokens, pa.int32()), columns["teacher"]],
        schema=_schema(dimension),
    )
    return batch, int((~keep).sum()), dimension


def token_counts(tokenizer, queries: list[str], responses: list[str]) -> tuple[list[int], list[int]]:
    """Tokens of each query (with the tokenizer's own specials, as collate tokenises it) and each response.

    LLM2VecGen.token_lengths is min(query, max_query_tokens) + min(response + 1, max_response_tokens) of these.
    A fast tokenizer's Rust backend counts them without building a Python list of ids per text (6x faster than
    calling the tokenizer, which matters at 160,000 rows); it is what the tokenizer's own call runs, with special
    tokens in the text read as plain text (split_special_tokens) and no truncation or padding.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    query_counts, response_counts = [], []
    for start in range(0, len(queries), TOKENIZE_CHUNK):
        stop = start + TOKENIZE_CHUNK
        if backend is not None and hasattr(backend, "encode_batch_fast"):
            backend.no_truncation()
            backend.no_padding()
            before, backend.encode_special_tokens = backend.encode_special_tokens, True
            try:
                query_counts += [len(row) for row in backend.encode_batch_fast(queries[start:stop], add_special_tokens=True)]
                response_counts += [len(row) for row in backend.encode_batch_fast(responses[start:stop], add_special_tokens=False)]
            finally:
                backend.encode_special_tokens = before
            continue
        query_rows = tokenizer(queries[start:stop], split_special_tokens=True)["input_ids"]
        response_rows = tokenizer(responses[start:stop], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        query_counts += [len(row) for row in query_rows]
        response_counts += [len(row) for row in response_rows]
    return query_counts, response_counts


def _first(mask) -> int:
    return pc.index(mask, True).as_py()


def _where(label: str, table: pa.Table, offset: int, row: int) -> str:
    return f"{label}: row {offset + row} (id {table.column('id')[row].as_py()})"


def _first_unordered(values: np.ndarray, previous: int) -> int:
    if values[0] <= previous:
        return 0
    return int(np.flatnonzero(np.diff(values) <= 0)[0]) + 1


# --------------------------------------------------------------------------------------------- reading


def _vectors(column: pa.FixedSizeListArray) -> np.ndarray:
    """A record batch's teacher column as a (rows, D) float32 view (zero-copy: no page is read until used)."""
    return column.flatten().to_numpy(zero_copy_only=True).reshape(len(column), column.type.list_size)


class TrainingFile:
    """The memory-mapped file: record batches located once; rows fetched by global index, one micro batch at a time.

    Pages of the map that were read stay counted in the process's RSS until the kernel needs them back: over an
    epoch a worker would come to "hold" its share of the file. After every few rows read, the map's pages are
    dropped from this process (madvise MADV_DONTNEED: they stay in the page cache, a later read maps them again),
    so the RSS stays bounded by what a few rows map.
    """

    RELEASE_ROWS = 16

    def __init__(self, path: str | Path):
        self.path = str(path)
        try:
            self.map = pa.memory_map(self.path, "r")
            reader = pa.ipc.open_file(self.map)
            self.batches = [reader.get_batch(index) for index in range(reader.num_record_batches)]
        except (OSError, pa.ArrowException) as err:
            raise TrainingDataError(f"{path}: not a readable training file ({err}); delete its folder to rebuild it") from None
        self.starts = np.cumsum([0, *(batch.num_rows for batch in self.batches)])
        self.vectors = [_vectors(batch.column("teacher")) for batch in self.batches]
        self.map.seek(0)
        self.whole = self.map.read_buffer(self.map.size())  # zero-copy: where the map starts, and its size

    def release(self) -> None:
        """Drop the map's pages from this process's RSS (the data stays in the file and the page cache)."""
        _madvise_dontneed(self.whole.address, self.whole.size)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def numbers(self, name: str) -> np.ndarray:
        """A small numeric column of every row (4 bytes a row), copied out of the map."""
        return np.concatenate([batch.column(name).to_numpy() for batch in self.batches]) if self.batches else np.zeros(0)

    def id_hashes(self) -> np.ndarray:
        """(rows, 20) uint8: the sha1 of every id."""
        parts = [np.frombuffer(batch.column("id_sha1").buffers()[1], dtype=np.uint8)[: 20 * batch.num_rows]
                 for batch in self.batches]
        return (np.concatenate(parts) if parts else np.zeros(0, np.uint8)).reshape(-1, 20)

    def _locate(self, index: int) -> tuple[int, int]:
        chunk = int(np.searchsorted(self.starts, index, side="right")) - 1
        return chunk, int(index - self.starts[chunk])

    def rows(self, indices: Iterable[int]) -> tuple[list[str], list[str], list[str], np.ndarray]:
        """(ids, queries, responses, teacher vectors (n, D) float32) of the rows at these global indices.

        Read RELEASE_ROWS rows at a time, the map's pages dropped after each group: reading one row can map far more
        than the row (the kernel maps whole folios of the page cache, up to 2 MiB: 2,000 scattered held-out rows of
        16 KiB each mapped 2.3 GiB before this), so the pages are released after every few rows, not every few MiB.
        """
        ids, queries, responses, vectors = [], [], [], []
        for count, index in enumerate(indices, 1):
            chunk, local = self._locate(int(index))
            batch = self.batches[chunk]
            ids.append(batch.column(0)[local].as_py())
            queries.append(batch.column(2)[local].as_py())
            responses.append(batch.column(3)[local].as_py())
            vectors.append(self.vectors[chunk][local].copy())  # a copy: outlives the release
            if count % self.RELEASE_ROWS == 0:
                self.release()
        self.release()
        dimension = self.vectors[0].shape[1] if self.vectors else 0
        return ids, queries, responses, (np.stack(vectors) if vectors else np.zeros((0, dimension), np.float32))


def _madvise_dontneed(address: int, size: int) -> None:
    """Unmap the pages of [address, address + size) from this process (Linux; elsewhere a no-op)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux") or not size:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = os.sysconf("SC_PAGE_SIZE")
    start = address - address % page
    if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(size + address - start), 4) != 0:  # 4: MADV_DONTNEED
        log.debug("madvise failed: errno %d", ctypes.get_errno())


def split_indices(hashes: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, held out) row indices, each in id order: components.training.split_holdout's rule on the hashes.

    The round(fraction * n) rows (at least one) whose sha1 of the id is lowest are held out.
    """
    count = len(hashes)
    if fraction <= 0 or count < 2:
        return np.arange(count), np.zeros(0, dtype=np.int64)
    held_count = max(1, round(fraction * count))
    ranked = np.lexsort(hashes[:, ::-1].T)  # byte order of the digests = order of their hex strings; stable
    held = np.zeros(count, dtype=bool)
    held[ranked[:held_count]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


class TrainingRows:
    """One worker's view: the training rows' token lengths (the batch order is built from them) and, on demand,
    the rows of one micro batch, the init sample or the held-out sample, with targets centred when asked."""

    def __init__(self, data: TrainingData, spec: Spec, mean: Sequence[float] | None = None):
        self.file = TrainingFile(data.local_path())
        self.spec = spec
        train, holdout = split_indices(self.file.id_hashes(), spec.data.holdout_fraction)
        self.train = train
        cap = spec.data.holdout_max_rows
        if cap is not None and len(holdout) > cap:  # scored every eval_every steps on one worker: a bounded sample
            order = random.Random(spec.data.seed).sample(range(len(holdout)), cap)
            holdout = np.sort(holdout[order])
        self.holdout = holdout
        limits = (spec.model.max_query_tokens, spec.training.max_response_tokens)
        query = np.minimum(self.file.numbers("query_tokens")[train], limits[0])
        response = np.minimum(self.file.numbers("response_tokens")[train] + 1, limits[1])
        self.lengths: list[int] = (query + response).tolist()  # small ints: what batch_schedule orders by
        self.mean = np.asarray(mean, dtype=np.float64) if mean is not None else None

    def __len__(self) -> int:
        return len(self.train)

    def _targets(self, vectors: np.ndarray) -> np.ndarray:
        # Subtracted in float64 and rounded to float32 by collate, as the rows of lists of floats were before.
        return vectors if self.mean is None else vectors.astype(np.float64) - self.mean

    def batch(self, positions: Sequence[int]) -> tuple[list[str], list[str], np.ndarray]:
        """(queries, responses, targets) of training rows at these positions of the training order."""
        _, queries, responses, vectors = self.file.rows(self.train[list(positions)])
        return queries, responses, self._targets(vectors)

    def holdout_rows(self) -> list[dict]:
        """The held-out sample as row dicts (at most data.holdout_max_rows)."""
        ids, queries, responses, vectors = self.file.rows(self.holdout)
        targets = self._targets(vectors)
        return [{"id": i, "query": q, "response": r, "teacher": t} for i, q, r, t in zip(ids, queries, responses, targets, strict=True)]
