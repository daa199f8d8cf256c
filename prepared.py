"""Prepared once: sft.py's and dpo.py's rows, rendered over the host's cores and cached next to
the run, so that a resumed or repeated run loads them in seconds instead of rendering again.

Rendering (`Renderer`) is the slow part of a start (one thread renders ~5,000 conversations/s;
loading the JSON and packing are ~20x faster), so it alone is spread over a process pool:
records go out in chunks, each worker loads the SentencePiece model once, and the results come
back in order, so the rows are byte-identical to rendering in this process. The pool's
processes come from a fork server (multiprocessing's "forkserver"), not a fork of this process:
by the time a script renders, JAX and Orbax run threads here, and a forked copy of a threaded
process may deadlock. The fork server imports the script (as multiprocessing's "spawn" does), so
a script that renders over several processes keeps its top level under
`if __name__ == "__main__":`, as sft.py and dpo.py do. A file of at most one chunk is rendered
in this process (a pool's start costs more than it saves).

The cache (`Cache`) holds one entry per key under --prepared_dir (default OUTPUT_DIR/prepared),
local or gs://. The key is a hash of everything that changes the rows (`key_parts`):
  * each input's identity: locally its absolute path, size and modification time in ns (not a
    hash of its content: a 5 GB corpus would cost seconds to hash at every start, and a file
    rewritten in place changes its mtime); on GCS the object's generation and MD5, which GCS
    changes on every write;
  * the tokenizer model's bytes (their SHA-256);
  * every setting of the rows (lengths, weights, seed, held-out share, packing, cuts, format,
    system prompt), and VERSION, raised whenever the code changes what rows hold.
An entry is a folder: key.json (the key's parts, readable: a miss names what differs from the
closest cached entry), one .npy per array, and done.json, written last, with each array's shape,
dtype and CRC-32. Every file is written atomically (a temporary then a rename; GCS objects
appear whole), and an entry without done.json is not trusted: a killed prepare leaves nothing a
later run reads. A damaged entry (a missing array, another shape or checksum) is reported in one
line and prepared again. On a multi-host run every process reads the cache (or prepares the
same rows itself) and only process 0 writes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import time
import uuid
import zlib
from collections.abc import Callable, Sequence

import numpy as np
from absl import flags
from google.api_core import exceptions as gcs_errors

import storage
from chat_formats import FileStats
from tokenizer import Tokenizer
from tokenizer_files import tokenizer_from_bytes

VERSION = 1  # raise when rendering, mixing or packing change what the rows hold
CHUNK = 512  # records per task sent to a worker


def define_flags() -> None:
    """The flags sft.py and dpo.py share for preparing their rows."""
    flags.DEFINE_integer("prepare_workers", 0, "Processes rendering the conversations or pairs "
                         "(0: one per core of this host; 1: in this process).")
    flags.DEFINE_string("prepared_dir", "", "Cache of prepared rows (and DPO's reference "
                        "log-probabilities), keyed by the inputs, the tokenizer and the settings; "
                        "local or gs://. Default: OUTPUT_DIR/prepared.")
    flags.DEFINE_bool("reuse_prepared", True, "Load rows prepared before with the same key; "
                      "--noreuse_prepared prepares them again and overwrites the entry.")


def workers(requested: int) -> int:
    """--prepare_workers: 0 means the cores this process may run on."""
    if requested < 0:
        raise ValueError(f"--prepare_workers={requested} must be >= 0 (0: one per core)")
    if requested:
        return requested
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# --------------------------------------------------------------------------------------------
# Rendering over a process pool.

_worker_tokenizer: Tokenizer | None = None


def _start_worker(model_bytes: bytes) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer_from_bytes(model_bytes)


def _render_chunk(render_one: Callable, records: list) -> tuple[list, float]:
    started = time.process_time()
    return [render_one(_worker_tokenizer, record) for record in records], time.process_time() - started


class Renderer:
    """`render(render_one, records)`: [render_one(tokenizer, record) for record in records], in
    this process or over `workers` processes. render_one must be picklable (a module-level
    function, or a functools.partial of one). `cpu_seconds` adds up the rendering's CPU time
    in all processes (benchmarks/sft_start.py)."""

    def __init__(self, tokenizer: Tokenizer, workers: int = 1, chunk: int | None = None):
        self.tokenizer, self.workers, self.chunk = tokenizer, workers, chunk or CHUNK
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self.cpu_seconds = 0.0

    def render(self, render_one: Callable, records: Sequence, desc: str = "render") -> list:
        from tqdm import tqdm

        bar = tqdm(total=len(records), desc=desc, disable=None, leave=False)
        with bar:
            if self.workers <= 1 or len(records) <= self.chunk:
                out, started = [], time.process_time()
                for record in records:
                    out.append(render_one(self.tokenizer, record))
                    bar.update()
                self.cpu_seconds += time.process_time() - started
                return out
            if self._pool is None:
                context = multiprocessing.get_context("forkserver")
                # The fork server imports render_one's module (and the script's) once, before it
                # forks the workers, rather than each worker on its own; this takes effect when
                # this process starts its fork server, on the first pool.
                module = getattr(render_one, "func", render_one).__module__
                context.set_forkserver_preload(["__main__", module])
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    self.workers, mp_context=context, initializer=_start_worker,
                    initargs=(self.tokenizer.model_bytes,))
            chunks = [list(records[i: i + self.chunk]) for i in range(0, len(records), self.chunk)]
            out = []
            for results, seconds in self._pool.map(_render_chunk, [render_one] * len(chunks), chunks):
                out += results
                self.cpu_seconds += seconds
                bar.update(len(results))
            return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Renderer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# The key.


def file_identity(path: str) -> dict:
    """What identifies one input file's content cheaply (see the module docstring)."""
    if storage.is_gcs(path):
        blob = storage.gcs_blob(path)
        try:
            storage.gcs_retry()(blob.reload)()
        except gcs_errors.NotFound:
            return {"path": path, "missing": True}
        return {"path": path, "size": blob.size, "generation": blob.generation, "md5": blob.md5_hash}
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return {"path": os.path.abspath(path), "missing": True}
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def key_parts(kind: str, inputs: list[dict], tokenizer_bytes: bytes, settings: dict) -> dict:
    """The cache key's parts: `kind` of rows, inputs (file_identity and how each is used), the
    tokenizer, the settings; JSON-serializable."""
    return {"kind": kind, "version": VERSION, "inputs": inputs,
            "tokenizer": hashlib.sha256(tokenizer_bytes).hexdigest(), "settings": settings}


def digest(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _leaves(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _leaves(item, f"{prefix}.{key}" if prefix else key).items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _leaves(item, f"{prefix}[{i}]").items()}
    return {prefix: value}


# --------------------------------------------------------------------------------------------
# Entries: a folder of .npy arrays, committed by done.json.


class CorruptEntry(ValueError):
    """A committed entry whose arrays do not match its done.json."""


def _checksum(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).view(np.uint8).reshape(-1))


def _write_array(path: str, array: np.ndarray) -> None:
    if storage.is_gcs(path):
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        storage.write_bytes(path, buffer.getvalue())
        return
    # Straight to a local file (no second copy in memory: rows can be gigabytes), then renamed.
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_array(path: str) -> np.ndarray:
    if storage.is_gcs(path):
        return np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)
    return np.load(path, allow_pickle=False)


def _remove(path: str) -> None:
    if storage.is_gcs(path):
        try:
            storage.gcs_blob(path).delete()
        except gcs_errors.NotFound:
            pass
    elif os.path.exists(path):
        os.remove(path)


def write_entry(path: str, parts: dict, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write an entry; it counts only once done.json, written last, is there."""
    done = storage.join(path, "done.json")
    _remove(done)  # an entry being rewritten is not trusted meanwhile
    storage.write_bytes(storage.join(path, "key.json"), json.dumps(parts, indent=1, sort_keys=True).encode())
    described = {}
    for name, array in arrays.items():
        _write_array(storage.join(path, f"{name}.npy"), array)
        described[name] = {"shape": list(array.shape), "dtype": array.dtype.str, "crc32": _checksum(array)}
    storage.write_bytes(done, json.dumps({"arrays": described, "meta": meta}).encode())


def read_entry(path: str) -> tuple[dict[str, np.ndarray], dict] | None:
    """(arrays, meta) of a committed entry, None when there is none; CorruptEntry when its
    arrays are missing or differ from what done.json recorded."""
    done = storage.read_json(storage.join(path, "done.json"))
    if done is None:
        return None
    arrays = {}
    for name, expected in done["arrays"].items():
        file = storage.join(path, f"{name}.npy")
        try:
            array = _read_array(file)
        except (OSError, ValueError, EOFError) as e:  # missing, truncated, not an .npy
            raise CorruptEntry(f"{file}: {e}") from None
        if list(array.shape) != expected["shape"] or array.dtype.str != expected["dtype"]:
            raise CorruptEntry(f"{file}: {array.dtype.str} {list(array.shape)}, done.json says "
                               f"{expected['dtype']} {expected['shape']}")
        if _checksum(array) != expected["crc32"]:
            raise CorruptEntry(f"{file}: its CRC-32 differs from done.json's")
        arrays[name] = array
    return arrays, done["meta"]


@dataclasses.dataclass(frozen=True)
class Cache:
    """Entries under `directory`; `reuse`: read them (else prepare again and overwrite);
    `write`: store what was prepared (process 0 only); `log`: where the one-line reports go."""
    directory: str
    reuse: bool = True
    write: bool = True
    log: Callable[[str], None] = print

    def path(self, parts: dict) -> str:
        return storage.join(self.directory, digest(parts))

    def read(self, parts: dict, what: str, doing: str = "preparing") -> tuple[dict[str, np.ndarray], dict] | None:
        """The entry of `parts` if reusable, logging a hit or why it missed (then `doing` them)."""
        path = self.path(parts)
        if not self.reuse:
            self.log(f"{what}: not reusing the cache (--noreuse_prepared): {doing}")
            return None
        try:
            found = read_entry(path)
        except CorruptEntry as e:
            self.log(f"{what}: the cache entry {path} is damaged ({e}): {doing} again")
            return None
        if found is not None:
            self.log(f"{what}: cache hit ({path})")
            return found
        self.log(f"{what}: cache miss ({self.why_missed(parts)}): {doing}")
        return None

    def store(self, parts: dict, arrays: dict[str, np.ndarray], meta: dict, what: str) -> None:
        """Write the entry of `parts` (when `write`); a cache that cannot be written costs the next
        start its preparation, not this run: reported, not raised."""
        if not self.write:
            return
        try:
            write_entry(self.path(parts), parts, arrays, meta)
        except (OSError, gcs_errors.GoogleAPICallError) as e:
            self.log(f"{what}: could not store them in {self.path(parts)} ({e}); the next start "
                     "prepares them again")
            return
        self.log(f"{what}: stored in {self.path(parts)}")

    def get_or_build(self, parts: dict, build: Callable[[], tuple[dict[str, np.ndarray], dict]], what: str
                     ) -> tuple[dict[str, np.ndarray], dict]:
        """The cached (arrays, meta) of `parts`, or build() stored for the next run."""
        found = self.read(parts, what)
        if found is not None:
            return found
        arrays, meta = build()
        self.store(parts, arrays, meta, what)
        return arrays, meta

    def why_missed(self, parts: dict) -> str:
        """The parts in which the closest cached entry of the same kind differs, or why none."""
        try:
            keys = storage.expand_inputs([storage.join(self.directory, "*/key.json")])
        except FileNotFoundError:
            return f"no entry in {self.directory}"
        ours, best = _leaves(parts), None
        for key in keys[:50]:
            other = _leaves(storage.read_json(key) or {})
            if other.get("kind") != parts["kind"]:
                continue
            differ = sorted(k for k in ours.keys() | other.keys() if ours.get(k) != other.get(k))
            if best is None or len(differ) < len(best):
                best = differ
        if best is None:
            return f"no entry of {parts['kind']} in {self.directory}"
        if not best:  # same key: its done.json is missing
            return "the entry was never completed"
        shown = ", ".join(best[:4]) + (f" and {len(best) - 4} more" if len(best) > 4 else "")
        return f"the closest entry differs in {shown}"


def cached_rows(cache: Cache, parts: dict, what: str, row_type: type, build: Callable[[], tuple]) -> tuple:
    """(training rows, held-out rows or None, per-file stats) as build() returns them, or read back
    from `cache`: each split's `row_type` fields (arrays) are stored as SPLIT.FIELD.npy."""
    fields = [field.name for field in dataclasses.fields(row_type)]

    def stored() -> tuple[dict[str, np.ndarray], dict]:
        train, validation, stats = build()
        arrays = {f"{split}.{name}": getattr(rows, name) for split, rows in (("train", train), ("validation", validation))
                  if rows is not None for name in fields}
        return arrays, {"stats": [s.to_dict() for s in stats]}

    arrays, meta = cache.get_or_build(parts, stored, what)
    train, validation = (row_type(**{name: arrays[f"{split}.{name}"] for name in fields})
                         if f"{split}.{fields[0]}" in arrays else None for split in ("train", "validation"))
    return train, validation, [FileStats.from_dict(s) for s in meta["stats"]]


def run_cache(output_dir: str, prepared_dir: str, reuse: bool, process_index: int) -> Cache:
    """The cache of a run's flags: --prepared_dir or OUTPUT_DIR/prepared; process 0 writes and logs."""
    return Cache(prepared_dir or storage.join(output_dir, "prepared"), reuse, write=process_index == 0,
                 log=print if process_index == 0 else (lambda _: None))
