"""Cached, resumable stage outputs, shared by the generation and the teacher stages.

A stage output lives in a folder named by a hash of everything that determines it, so that a re-run with the same
inputs finds it and does nothing:

    <run_dir>/<stage>/<key>/       (run_dir: a local folder or shared storage, components/storage.py)
        inputs.json            what the key is the hash of (for people reading the folder)
        shard-00000.parquet    the rows whose id is in [0, shard_size), sorted by id
        shard-00001.parquet    ...
        _SUCCESS.json          written last, with the stage's counts: its presence means the output is complete

Rows are split into fixed shards by id. Each shard is written to a temporary file and renamed into place (on object
storage: one PUT), so a shard file is either absent or whole, and writing it twice gives the same file. A run that dies (a killed actor,
a killed driver, an error) leaves some shard files; the next run processes only the missing shards, so nothing
is generated twice and no row is lost or duplicated.

The work itself is one Ray Data pipeline per run: the pending shards, one block each -> map_batches(worker class on
an actor pool, one whole shard per call) -> a datasink that writes each shard's file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from ray.data.datasource import Datasink

from components import storage
from components.storage import RemotePath, location

log = logging.getLogger(__name__)

SUCCESS_FILE = "_SUCCESS.json"
INPUTS_FILE = "inputs.json"
# Test hook: the writer raises instead of writing this shard, as if the run died there.
FAIL_AT_SHARD_ENV = "LLM2VEC_GEN_FAIL_AT_SHARD"


class StageError(RuntimeError):
    """A stage output is inconsistent or incomplete; the message names the folder and what is wrong."""


def content_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ActorPool:
    """Where a stage's workers run: `size` actors, each with these resources (GPUs only when asked for)."""

    size: int
    num_cpus: float
    num_gpus: float

    @classmethod
    def of(cls, section: Any) -> ActorPool:
        return cls(section.num_actors, section.num_cpus_per_actor, section.num_gpus_per_actor)


@dataclass(frozen=True)
class ShardedOutput:
    """One stage output: rows with ids 0 .. num_rows - 1, in files of shard_size rows (see the module docstring)."""

    folder: Path | RemotePath
    num_rows: int
    shard_size: int

    @classmethod
    def open(
        cls, stage_dir: Path | RemotePath, inputs: dict[str, Any], num_rows: int, shard_size: int, create: bool = True
    ) -> ShardedOutput:
        """The output folder for `inputs` under `stage_dir`, created with its inputs.json if new (and `create`)."""
        folder = location(stage_dir) / content_key({**inputs, "num_rows": num_rows, "shard_size": shard_size})
        if create and not (folder / INPUTS_FILE).is_file():
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(folder / INPUTS_FILE, json.dumps(
                {**inputs, "num_rows": num_rows, "shard_size": shard_size}, indent=2, default=str))
        return cls(folder=folder, num_rows=num_rows, shard_size=shard_size)

    @classmethod
    def load(cls, folder: str | Path | RemotePath) -> ShardedOutput:
        """A complete output written earlier (its _SUCCESS.json names the row and shard counts)."""
        manifest = read_manifest(folder)
        return cls(folder=location(folder), num_rows=manifest["rows"], shard_size=manifest["shard_size"])

    @property
    def key(self) -> str:
        return self.folder.name

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.shard_size)

    def shard_ids(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_rows))

    def shard_path(self, shard: int) -> Path | RemotePath:
        return self.folder / f"shard-{shard:05d}.parquet"

    def shard_paths(self) -> list[Path | RemotePath]:
        return [self.shard_path(shard) for shard in range(self.num_shards)]

    def missing_shards(self) -> list[int]:
        return [shard for shard in range(self.num_shards) if not self.shard_path(shard).is_file()]

    @property
    def complete(self) -> bool:
        return (self.folder / SUCCESS_FILE).is_file()

    def write_shard(self, shard: int, table: pa.Table) -> Path | RemotePath:
        """Write one whole shard atomically; its rows must be exactly the shard's ids."""
        table = table.sort_by("id")
        expected = self.shard_ids(shard)
        if table.column("id").to_pylist() != list(expected):
            raise StageError(f"{self.folder}: shard {shard} must hold ids {expected.start}..{expected.stop - 1} once "
                             f"each; got {table.num_rows} rows")
        path = self.shard_path(shard)
        storage.write_parquet(table, path)
        return path

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """All rows, in id order."""
        missing = self.missing_shards()
        if missing:
            more = "..." if len(missing) > 5 else ""
            raise StageError(f"{self.folder}: incomplete, shards {missing[:5]}{more} missing")
        return pa.concat_tables([storage.read_parquet(path, columns=columns) for path in self.shard_paths()])

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Check that every row is present once, then mark the output complete with `summary` and the counts."""
        ids = self.read(columns=["id"]).column("id")
        if len(ids) != self.num_rows or pc.count_distinct(ids).as_py() != self.num_rows:
            raise StageError(f"{self.folder}: expected {self.num_rows} distinct ids, found {len(ids)} rows")
        for leftover in self.folder.glob(".*.tmp"):  # from writers that died before their rename
            leftover.unlink(missing_ok=True)
        manifest = {"key": self.key, "rows": self.num_rows, "shards": self.num_shards, "shard_size": self.shard_size,
                    **summary}
        atomic_write_text(self.folder / SUCCESS_FILE, json.dumps(manifest, indent=2))
        return manifest


def read_manifest(folder: str | Path | RemotePath) -> dict[str, Any]:
    path = location(folder) / SUCCESS_FILE
    if not path.is_file():
        raise StageError(f"{folder}: not a complete stage output (no {SUCCESS_FILE})")
    return json.loads(path.read_text())


def atomic_write_text(path: Path | RemotePath, text: str) -> None:
    storage.atomic_write_text(path, text)


# ------------------------------------------------------------------------------------------- running on Ray


class ShardWriter(Datasink):
    """Writes each shard that reaches it as its own file (see ShardedOutput.write_shard)."""

    def __init__(self, output: ShardedOutput, fail_at_shard: int | None = None):
        self.output = output
        self.fail_at_shard = fail_at_shard

    def write(self, blocks: Iterable[pa.Table], ctx) -> list[int]:
        table = pa.concat_tables([block for block in blocks if block.num_rows])
        if not table.num_rows:
            return []
        shards = pc.divide(table.column("id"), self.output.shard_size)
        written = []
        for shard in sorted(set(shards.to_pylist())):
            if shard == self.fail_at_shard:
                raise RuntimeError(f"{FAIL_AT_SHARD_ENV}={shard}: failing before writing shard {shard} (test hook)")
            # Each worker call returns one whole shard, so a shard never arrives split; write_shard checks it.
            self.output.write_shard(shard, table.filter(pc.equal(shards, shard)))
            written.append(shard)
        return written


def run_sharded(
    output: ShardedOutput,
    shard_input: Callable[[int], pa.Table],
    worker: type,
    worker_args: tuple,
    pool: ActorPool,
) -> list[int]:
    """Process the missing shards of `output` on Ray Data; returns the shards written.

    `shard_input(k)` gives the input rows of shard k (with their `id`); `worker(*worker_args)` is constructed once
    per actor and called with one whole shard (a pyarrow table), returning the output rows of that shard.
    """
    import ray
    from ray.data import ActorPoolStrategy

    pending = output.missing_shards()
    if not pending:
        return []
    if not ray.is_initialized():
        from components.ray_env import connect

        connect()  # a local Ray, or the cluster named by RAY_ADDRESS; the hub variables reach every worker
    fail_at = os.environ.get(FAIL_AT_SHARD_ENV)
    log.info("%s: %d of %d shards to process on %d actor(s)", output.folder, len(pending), output.num_shards,
             min(pool.size, len(pending)))
    # One block per shard, handed whole to a worker call (batch_size=None), so that a shard's rows come out together.
    shards = ray.data.from_arrow([shard_input(shard) for shard in pending])
    results = shards.map_batches(
        worker,
        fn_constructor_args=worker_args,
        batch_size=None,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=min(pool.size, len(pending))),
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus or None,
    )
    # Writing a file needs no CPU reservation; with a reservation the writes would wait for the actors to exit.
    results.write_datasink(ShardWriter(output, int(fail_at) if fail_at else None), ray_remote_args={"num_cpus": 0})
    return pending
