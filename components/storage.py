"""Where a run's artifacts live: a local folder, a shared mount, or object storage (s3://, gs://, abfs://, ...).

    location("runs/tiny")            -> pathlib.Path("runs/tiny")           (a local folder: exactly as before)
    location("s3://bucket/runs/x")   -> RemotePath("s3://bucket/runs/x")    (the same small Path API, on pyarrow.fs)

Every stage takes its folders from `Spec.run_dir`, which is `location(output_dir)`, and reads and writes them with
the Path methods both kinds share (`/`, name, parent, is_file, is_dir, read_text, write_text, glob, unlink) or with
the few helpers here that need a filesystem handle (Parquet, copying folders, Ray Train's storage). No stage looks
at a URI scheme: that is decided here, once.

Filesystems come from pyarrow.fs (what Ray Train and Ray Data take as `storage_filesystem` / `filesystem`); a scheme
pyarrow does not know is opened with fsspec and wrapped for pyarrow. S3 reads the standard environment variables:
AWS_ENDPOINT_URL (an S3-compatible server), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION. A RemotePath
pickles as its URI: a Ray worker opens the filesystem itself, with its own environment (the job's env_vars).

Files a process must memory-map or hand to a library that only takes local paths (the train file, a checkpoint to
load, the model folder to evaluate) are staged: copied once per node into a local cache named by a content key.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

# The node-local cache of staged copies (train file, model folders); per node, never shared.
STAGE_DIR_ENV = "LLM2VEC_GEN_STAGE_DIR"


class StorageError(RuntimeError):
    """The run's storage cannot be used; one line naming the location, the cause and the fix."""


def is_uri(text: str | os.PathLike) -> bool:
    """True for `scheme://...` other than file://, which is a local path."""
    text = str(text)
    return "://" in text and not text.startswith("file://")


def location(value: str | os.PathLike | RemotePath) -> Path | RemotePath:
    """A local Path, or a RemotePath for a URI (a RemotePath or Path passes through)."""
    if isinstance(value, (Path, RemotePath)):
        return value
    text = str(value)
    if text.startswith("file://"):
        return Path(text.removeprefix("file://"))
    return RemotePath(text) if is_uri(text) else Path(text)


# ------------------------------------------------------------------------------------------- filesystems

_FILESYSTEMS: dict[tuple[str, str], pafs.FileSystem] = {}


def _s3(quick: bool) -> pafs.S3FileSystem:
    """S3 (or an S3-compatible server) from the standard environment variables."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    options: dict[str, Any] = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")}
    if endpoint:
        scheme, _, host = endpoint.rpartition("://")
        options |= {"endpoint_override": host.rstrip("/"), "scheme": scheme or "https"}
    if quick:  # the pre-flight probe: an unreachable endpoint is an answer in seconds, not minutes of retries
        options |= {"connect_timeout": 3, "request_timeout": 10,
                    "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=1)}
    return pafs.S3FileSystem(**{key: value for key, value in options.items() if value is not None})


def filesystem(uri: str, quick: bool = False) -> tuple[pafs.FileSystem, str]:
    """(a pyarrow filesystem, the path inside it) for a URI; cached per scheme and process."""
    scheme = uri.split("://", 1)[0].lower()
    path = uri.split("://", 1)[1].rstrip("/")
    key = (scheme, "quick" if quick else "")
    if key not in _FILESYSTEMS:
        if scheme in ("s3", "s3a"):
            _FILESYSTEMS[key] = _s3(quick)
        else:
            try:
                fs, _ = pafs.FileSystem.from_uri(uri)
            except (ValueError, OSError):  # pyarrow.ArrowInvalid is a ValueError
                import fsspec

                fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(scheme)))
            _FILESYSTEMS[key] = fs
    return _FILESYSTEMS[key], path


def filesystem_and_path(place: Path | RemotePath) -> tuple[pafs.FileSystem | None, str]:
    """What Ray Train's RunConfig(storage_path, storage_filesystem) and pyarrow's readers take: (None, an absolute
    local path) for a local folder, else (the filesystem, the path without its scheme)."""
    if isinstance(place, RemotePath):
        return place.fs, place.path
    return None, str(Path(place).resolve())


class RemotePath:
    """A file or folder on object storage with the part of pathlib.Path's API the stages use."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.scheme = self.uri.split("://", 1)[0]

    # pickles as its URI: the filesystem is opened again, with the environment, where it is used
    def __reduce__(self):
        return (RemotePath, (self.uri,))

    @property
    def fs(self) -> pafs.FileSystem:
        return filesystem(self.uri)[0]

    @property
    def path(self) -> str:
        return self.uri.split("://", 1)[1]

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"RemotePath({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __truediv__(self, part: str | os.PathLike) -> RemotePath:
        return RemotePath(f"{self.uri}/{str(part).strip('/')}")

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.uri.rsplit("/", 1)[0])

    def with_name(self, name: str) -> RemotePath:
        return self.parent / name

    def resolve(self) -> RemotePath:
        return self

    def as_uri(self) -> str:
        return self.uri

    def _type(self) -> pafs.FileType:
        return self.fs.get_file_info(self.path).type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        if self.scheme not in ("s3", "s3a", "gs", "gcs"):  # object stores have no folders (create_dir: a marker)
            self.fs.create_dir(self.path, recursive=True)

    def iterdir(self) -> list[RemotePath]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return [RemotePath(f"{self.scheme}://{info.path}") for info in infos]

    def glob(self, pattern: str) -> list[RemotePath]:
        """One folder level, as the stages use it (`checkpoint_*`, `.*.tmp`)."""
        return [child for child in self.iterdir() if fnmatch.fnmatch(child.name, pattern)]

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        with self.fs.open_output_stream(self.path) as stream:  # one PUT: the object appears whole or not at all
            stream.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())


# ------------------------------------------------------------------------------------- files and folders


def atomic_write_text(path: Path | RemotePath, text: str) -> None:
    """A file that is either absent or whole: a renamed temporary file locally; one PUT on object storage."""
    if isinstance(path, RemotePath):
        path.write_text(text)
        return
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_parquet(table, path: Path | RemotePath) -> None:
    """A Parquet file written atomically (see atomic_write_text)."""
    if isinstance(path, RemotePath):
        pq.write_table(table, path.path, filesystem=path.fs)
        return
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(table, temporary)
    os.replace(temporary, path)


def read_parquet(path: Path | RemotePath, columns: list[str] | None = None):
    fs, inner = (path.fs, path.path) if isinstance(path, RemotePath) else (None, str(path))
    return pq.read_table(inner, columns=columns, filesystem=fs)


def readable(path: Path | RemotePath):
    """What pyarrow's readers (ParquetFile, ipc) take: the local path, or an open random-access file."""
    return path.fs.open_input_file(path.path) if isinstance(path, RemotePath) else str(path)


def upload(local: str | os.PathLike, target: Path | RemotePath) -> None:
    """Copy a local file or folder to `target` (a folder's files first, so a marker written after it comes last)."""
    local = Path(local)
    if not isinstance(target, RemotePath):
        if local.is_dir():
            shutil.copytree(local, target, dirs_exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, target)
        return
    pafs.copy_files(str(local.resolve()), target.path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=target.fs)


def download(source: Path | RemotePath, local: str | os.PathLike) -> Path:
    """Copy a file or folder to a local path; returns it."""
    local = Path(local)
    if not isinstance(source, RemotePath):
        if Path(source).is_dir():
            shutil.copytree(source, local, dirs_exist_ok=True)
        else:
            shutil.copyfile(source, local)
        return local
    # (copy_files of a folder needs the local folder to exist; of a file, its parent)
    (local if source.is_dir() else local.parent).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(source.path, str(local), source_filesystem=source.fs, destination_filesystem=pafs.LocalFileSystem())
    return local


def stage_root() -> Path:
    return Path(os.environ.get(STAGE_DIR_ENV) or Path(tempfile.gettempdir()) / "llm2vec-gen-ray" / "staged")


def staged(source: str | os.PathLike | RemotePath, key: str) -> Path:
    """A local copy of `source` to memory-map or load, made once per node and `key` (a content key: a new content is a
    new key, so a copy is never stale). A local source is used where it is."""
    source = location(source)
    if not isinstance(source, RemotePath):
        return Path(source)
    target = stage_root() / key / source.name
    if target.exists():
        return target
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
    download(source, partial)
    try:
        os.replace(partial, target)  # another worker on this node may have finished first: either copy is whole
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def drop_staged(key: str) -> None:
    """Remove this node's staged copies under `key` (a finished training's train file)."""
    shutil.rmtree(stage_root() / key, ignore_errors=True)


def remove_tree(path: Path | RemotePath) -> None:
    if isinstance(path, RemotePath):
        try:
            path.fs.delete_dir(path.path)
        except FileNotFoundError:
            pass
        return
    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------- pre-flight


def _cause(err: BaseException) -> str:
    """What an S3 (or other object store) error means, in words."""
    text = str(err)
    lowered = text.lower()
    if any(word in lowered for word in ("couldn't connect", "could not connect", "connection refused", "curlcode: 7",
                                       "resolve host", "curlcode: 6", "timeout", "timed out", "curlcode: 28")):
        return "the endpoint is unreachable (check AWS_ENDPOINT_URL and the network)"
    if any(word in lowered for word in ("invalidaccesskeyid", "signaturedoesnotmatch", "access_denied", "accessdenied",
                                       "forbidden", "403", "invalidtoken", "unrecognizedclient")):
        return "the credentials were refused (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    if "nosuchbucket" in lowered or "bucket does not exist" in lowered:
        return "the bucket does not exist"
    return text.splitlines()[0][:300] if text else type(err).__name__


def check_reachable(place: Path | RemotePath) -> None:
    """Raise StorageError (one line: the location and the cause) unless a small file can be written, read back and
    deleted at `place`; the bucket (or first path part) must already exist. Writes nothing that stays."""
    if not isinstance(place, RemotePath):
        return
    fs, path = filesystem(place.uri, quick=True)
    bucket = path.split("/", 1)[0]
    try:
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise StorageError(f"output_dir {place}: the bucket '{bucket}' does not exist: create it first")
        probe = f"{path}/.probe-{uuid.uuid4().hex}"
        with fs.open_output_stream(probe) as stream:
            stream.write(b"probe")
        with fs.open_input_stream(probe) as stream:
            stream.read()
        fs.delete_file(probe)
    except StorageError:
        raise
    except Exception as err:  # pyarrow raises OSError with the SDK's message: say what it means
        raise StorageError(f"output_dir {place}: {_cause(err)}") from None


def working_dir_problem(output_dir: str | None, run_dir: Path | RemotePath, working_dir: str | None) -> str | None:
    """Under `ray job submit --working-dir`, a relative output_dir lands inside Ray's per-upload copy of the project:
    the next upload (any edit) is another folder, and every cached stage and checkpoint is silently lost."""
    if working_dir is None or isinstance(run_dir, RemotePath) or Path(run_dir).is_absolute():
        return None
    return (f"output_dir {output_dir or run_dir} is relative, and this job runs in Ray's per-upload copy of the project "
            f"(ray job submit --working-dir): every edit would lose the run; pass --output-dir s3://BUCKET/runs "
            f"(or an absolute path on storage every node mounts)")


def check_shared(place: Path | RemotePath, nodes: list[str]) -> None:
    """On a cluster of several nodes: a task on each alive node writes a probe file into `place`, and this process
    must read every one back; a node-local folder fails with one line. Needs ray initialised."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if len(nodes) < 2:
        return
    probe_dir = location(place) / f".probe-{uuid.uuid4().hex}"
    target = probe_dir if isinstance(probe_dir, RemotePath) else Path(probe_dir).resolve()

    @ray.remote(num_cpus=0)
    def write_probe(folder, node: str) -> str:
        folder = location(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / node).write_text(node)
        return node

    try:
        ray.get([write_probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
            str(target), node) for node in nodes], timeout=120)
        unseen = [node for node in nodes if not (target / node).is_file()]
    except Exception as err:
        raise StorageError(f"output_dir {place}: a node could not write to it ({_cause(err)})") from None
    finally:
        remove_tree(target)
    if unseen:
        raise StorageError(
            f"output_dir {place} is not shared by the cluster's {len(nodes)} nodes (files written on node(s) "
            f"{', '.join(node[:12] for node in unseen)} are not visible here): pass --output-dir s3://BUCKET/runs, or a "
            f"path on a filesystem every node mounts")
