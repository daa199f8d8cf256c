"""Files on a local disk or on GCS (gs://bucket/name): whole-file atomic writes, retried ranged
reads, sizes, listings, input globs. Shared by the corpus pipeline (data.py) and the stream
train.py reads (stream.py)."""

from __future__ import annotations

import concurrent.futures
import fnmatch
import glob
import io
import json
import os
import re
import shutil
import uuid
from collections.abc import Sequence


def _gcs_errors():
    # google-cloud-storage is imported on first use: ~0.3 s of CPU that each Ray worker and the
    # driver of a run on local files would otherwise pay at start.
    from google.api_core import exceptions

    return exceptions


def is_gcs(path: str) -> bool:
    return path.startswith("gs://")


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name if is_gcs(base) else os.path.join(base, name)


_clients: dict = {}
# A client's connections must not be shared with a forked process (data.py's local workers).
os.register_at_fork(after_in_child=_clients.clear)


def _gcs_client():
    # Keyed by the emulator address: tests point the same process at different endpoints.
    key = os.environ.get("STORAGE_EMULATOR_HOST")
    if key not in _clients:
        from google.cloud import storage

        _clients[key] = storage.Client()
    return _clients[key]


def gcs_blob(uri: str):
    bucket, _, name = uri[len("gs://"):].partition("/")
    return _gcs_client().bucket(bucket).blob(name)


class ShortRead(ConnectionError):
    """A ranged read returned fewer bytes than asked: retried like a reset connection."""


def gcs_retry():
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_delay(initial=0.05, maximum=4.0, multiplier=2.0).with_timeout(300.0)


def read_bytes(path: str, start: int = 0, length: int | None = None) -> bytes:
    """Bytes [start, start + length) of a local file or gs:// object (all of it by default)."""
    if not is_gcs(path):
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read() if length is None else f.read(length)
        if length is not None and len(data) != length:
            raise ValueError(f"{path}: expected {length} bytes at offset {start}, got {len(data)} "
                             "(truncated file?)")
        return data

    def attempt() -> bytes:
        end = None if length is None else start + length - 1
        data = gcs_blob(path).download_as_bytes(start=start, end=end, checksum=None, retry=None,
                                             timeout=60)
        if length is not None and len(data) != length:
            raise ShortRead(f"{path}: got {len(data)} of {length} bytes at offset {start}")
        return data

    try:
        return gcs_retry()(attempt)()
    except _gcs_errors().NotFound as e:
        raise FileNotFoundError(f"{path} does not exist (or is not readable)") from e


class _GcsRaw(io.RawIOBase):
    """A seekable raw reader of a gs:// object: each read is one retried ranged request
    (read_bytes); io.BufferedReader makes the requests large. The client's own BlobReader has
    no readline of its own (IOBase's reads a byte per call) and no check of short bodies."""

    def __init__(self, path: str, size: int):
        self.path, self.size, self.position = path, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = {0: 0, 1: self.position, 2: self.size}[whence] + offset
        return self.position

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.size - self.position))
        if n:
            buffer[:n] = read_bytes(self.path, self.position, n)
            self.position += n
        return n


def open_read(path: str):
    """A buffered, seekable binary reader of a local file or gs:// object (8 MB ranged reads)."""
    if not is_gcs(path):
        return open(path, "rb")
    size = file_size(path)
    if size is None:
        raise FileNotFoundError(f"{path} does not exist (or is not readable)")
    return io.BufferedReader(_GcsRaw(path, size), buffer_size=8 << 20)


def read_ranges(path: str, ranges: list[tuple[int, int]]) -> list[bytes]:
    """Bytes [a, b) of a file for each (a, b): one open file locally, parallel requests on GCS."""
    if is_gcs(path):
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda r: read_bytes(path, r[0], r[1] - r[0]) if r[1] > r[0] else b"", ranges))
    out = []
    with open(path, "rb") as f:
        for a, b in ranges:
            f.seek(a)
            out.append(f.read(b - a))
    return out


def write_bytes(path: str, data: bytes, exclusive: bool = False) -> bool:
    """Write a whole file atomically: readers see the old state or the complete new one. With
    `exclusive`, only if the file does not exist yet; returns whether this call wrote it."""
    if is_gcs(path):  # a GCS object appears only when its upload completes
        if exclusive and file_size(path) is not None:  # the emulator ignores preconditions
            return False
        try:
            gcs_retry()(lambda: gcs_blob(path).upload_from_string(
                data, timeout=300, if_generation_match=0 if exclusive else None))()
        except _gcs_errors().PreconditionFailed:
            return False
        return True
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if not exclusive:
        os.replace(tmp, path)
        return True
    try:
        os.link(tmp, path)  # fails if the path exists, atomically
        return True
    except FileExistsError:
        return False
    finally:
        os.remove(tmp)


def file_size(path: str) -> int | None:
    """Size in bytes, or None when the file does not exist."""
    if is_gcs(path):
        blob = gcs_blob(path)
        try:
            gcs_retry()(blob.reload)()
        except _gcs_errors().NotFound:
            return None
        return blob.size
    return os.path.getsize(path) if os.path.isfile(path) else None


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Files of each pattern (glob, gs:// glob, or hf:NAME), in order; a pattern matching nothing
    is an error."""
    files = []
    for pattern in patterns:
        if pattern.startswith("hf:"):
            matches = [pattern]
        elif is_gcs(pattern):
            bucket, _, name = pattern[len("gs://"):].partition("/")
            prefix = re.split(r"[*?\[]", name, maxsplit=1)[0]
            blobs = _gcs_client().list_blobs(bucket, prefix=prefix)
            matches = sorted(f"gs://{bucket}/{b.name}" for b in blobs if fnmatch.fnmatchcase(b.name, name))
        else:
            matches = sorted(glob.glob(pattern))
        if not matches:
            raise FileNotFoundError(f"--input pattern {pattern!r} matches no file")
        files.extend(matches)
    return files


def remove(path: str) -> None:
    """Deletes a file or a directory tree (on gs://, the object and every object under path/),
    if there."""
    if is_gcs(path):
        bucket, _, name = path[len("gs://"):].partition("/")
        for blob in _gcs_client().list_blobs(bucket, prefix=name):
            if blob.name == name or blob.name.startswith(name.rstrip("/") + "/"):
                gcs_retry()(blob.delete)()
    elif os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def read_json(path: str) -> dict | None:
    """A JSON file's content, or None when it does not exist."""
    if file_size(path) is None:
        return None
    return json.loads(read_bytes(path))
