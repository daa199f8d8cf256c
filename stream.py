"""The shard format that data.py writes, and the stream train.py reads from it.

Shard format
------------
OUTPUT/train-00000-of-0000N.bin, ..., OUTPUT/validation-00000-of-00001.bin: raw little-endian
token ids (uint16 while the vocabulary fits in 65,536 ids, else uint32), no header, a whole
number of records of `record_len = seq_len + 1` ids each. OUTPUT/manifest.json:
    seq_len, vocab_size, dtype ("<u2" or "<u4"), tokenizer (sha256 of the .model bytes),
    shards: [{name, sequences, sha256, crc32c}], sequences, tokens,
    documents: {read, cleaned, exact_dedup, near_dedup, language_kept} (counts after each stage),
    documents_by_source (the same per source), documents_by_language (near_dedup, language_kept),
    languages: {en: {documents, tokens, available_documents, available_tokens}, ...} (written by
    the mixture, every copy; available after dedup and language ID), sources: the same per source
    plus target_tokens (None without one), epochs, short_tokens and per language
    {available_tokens, tokens},
    settings (every flag that shapes the output, and the input files),
    record_len, block_records, bad_records, dropped_tail_tokens,
    validation: {shards, sequences, tokens}.
Atomic: a shard file gets its final name only when complete (local: rename; gs://: an upload
becomes visible only once finished), and manifest.json is written last (data.py).

Stream (what train.py calls)
----------------------------
    stream = open_train_data(spec, tokenizer=tok, seq_len=2048, seed=0, global_batch_size=1024,
                             grad_accum=8, process_index=jax.process_index(),
                             process_count=jax.process_count(), split="train")
    for step, batch in stream.iterate(start_step): ...   # int32 [B / P, seq_len + 1]

`spec` is a manifest (local or gs://, manifest.json or its directory) or comma-separated text
files (TokenRecords: one document per non-empty line, tokenized at start-up; the last
`max(1, round(0.005 n))` records are the validation split). Records are `seq_len + 1` ids:
inputs and the one-shifted targets.

The batch of step s is a pure function of (seed, s): the records are grouped in blocks of
`block_records` consecutive records (the manifest's, 16 by default; 1 for text files), epoch e
visits the blocks in the permutation seeded by (seed, e), and step s takes positions
[s*B, (s+1)*B) of that endless sequence. Resuming needs only the step, on any number of
processes. Blocks make gs:// reads large ranged reads; the price is that a batch holds runs of
up to block_records consecutive records. Rows: the global batch is split into grad_accum
micro-batches of B/grad_accum consecutive rows; process p reads only the p-th contiguous
1/process_count of each micro-batch, concatenated in micro-batch order, so
`batch.reshape(grad_accum, -1, seq_len + 1)` is this process's part of each micro-batch, and
1 process x 4 devices sees the same global arrays as 2 processes x 2 devices. gs:// ranges
are read by a few threads, retried with exponential backoff on 429/5xx, timeouts, resets and
short reads; `iterate` prefetches batches on a background thread.

The stream object: `batch(step)` -> int32 [global_batch_size // process_count, seq_len + 1];
`iterate(start_step)` -> (step, batch) pairs, prefetched a few batches ahead (an error on the
thread is raised in the caller; epoch rollovers are printed); `close()` stops the threads;
`epoch(step)` (epochs seen by the end of step), `num_sequences`, `num_tokens`, `seq_len`,
`manifest` (None for text files), `wait_seconds` (time `iterate`'s caller waited). Opening it
raises ValueError when the manifest's seq_len, vocabulary size or tokenizer sha256 differ from
the model's, when global_batch_size is not divisible by grad_accum x process_count, or when a
shard's size (every shard) or content (local: sha256; gs://: the object's crc32c, unread) is
not the manifest's; FileNotFoundError when the manifest or a shard is missing.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np

from storage import file_size, gcs_blob, gcs_retry, is_gcs, join, read_bytes
from tokenizer import Tokenizer

MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def read_documents(path: str, flag: str = "--train_data") -> list[str]:
    """A text file's non-empty lines (TokenRecords' documents; paragraphs in the bundled sample);
    `flag` names where the path came from in errors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} file {path!r} is not UTF-8 text ({e.reason}): expected text files, "
                         "one document per line, or a data.py manifest") from None



class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class RecordStream:
    """Batches of fixed-length records in a seeded block order (see the module docstring).
    Subclasses say how to read records by index (`_read`)."""

    def __init__(self, *, name: str, num_records: int, record_len: int, seed: int,
                 global_batch_size: int | None, grad_accum: int = 1, process_index: int = 0,
                 process_count: int = 1, block_records: int = 1, manifest: dict | None = None):
        if num_records < 1:
            raise ValueError(f"{name} holds no record of {record_len} tokens")
        if global_batch_size is not None:
            if global_batch_size < 1 or grad_accum < 1 or process_count < 1:
                raise ValueError(f"global batch size {global_batch_size}, grad_accum {grad_accum} and "
                                 f"process count {process_count} must be positive")
            if global_batch_size % (grad_accum * process_count):
                raise ValueError(
                    f"global batch size {global_batch_size} is not divisible by grad_accum "
                    f"({grad_accum}) x process count ({process_count}) = {grad_accum * process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process index {process_index} is outside [0, {process_count})")
        self.name, self.num_sequences, self.record_len = name, num_records, record_len
        self.seed, self.global_batch_size, self.grad_accum = seed, global_batch_size, grad_accum
        self.process_index, self.process_count = process_index, process_count
        self.block_records, self.manifest = block_records, manifest
        self.wait_seconds = 0.0  # time `iterate`'s consumer spent waiting for a batch
        self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._orders_lock = threading.Lock()
        self._stops: list[threading.Event] = []

    @property
    def seq_len(self) -> int:
        return self.record_len - 1

    @property
    def num_tokens(self) -> int:
        return self.num_sequences * self.record_len

    def epoch(self, step: int) -> float:
        """Epochs seen by the end of step `step`."""
        return (step + 1) * self.global_batch_size / self.num_sequences

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's block permutation and where each of its blocks starts in the epoch."""
        with self._orders_lock:  # batch() may run on the prefetch thread and the caller's
            if epoch not in self._orders:
                k, n = self.block_records, self.num_sequences
                perm = np.random.default_rng([self.seed, epoch]).permutation(-(-n // k))
                sizes = np.minimum(k, n - perm * k)
                if len(self._orders) > 4:
                    self._orders.pop(min(self._orders))
                self._orders[epoch] = perm, np.cumsum(sizes) - sizes
            return self._orders[epoch]

    def record_indices(self, positions: np.ndarray) -> np.ndarray:
        """Record index at each position of the endless sequence of epochs."""
        epochs, offsets = np.divmod(positions, self.num_sequences)
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            perm, starts = self._epoch_order(int(epoch))
            mine = epochs == epoch
            block = np.searchsorted(starts, offsets[mine], side="right") - 1
            out[mine] = perm[block] * self.block_records + offsets[mine] - starts[block]
        return out

    def positions(self, step: int) -> np.ndarray:
        """This process's rows of step `step`: its part of each micro-batch, in micro-batch order."""
        micro = self.global_batch_size // self.grad_accum
        part = micro // self.process_count
        first = step * self.global_batch_size + self.process_index * part
        return (first + np.arange(self.grad_accum)[:, None] * micro + np.arange(part)).ravel()

    def batch(self, step: int) -> np.ndarray:
        """int32 [global_batch_size // process_count, seq_len + 1]: this process's rows of step."""
        if self.global_batch_size is None:
            raise ValueError(f"{self.name}: no global_batch_size was given")
        return self._read(self.record_indices(self.positions(step))).astype(np.int32)

    def _read(self, indices: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def iterate(self, start_step: int = 0, prefetch: int = 4) -> Iterator[tuple[int, np.ndarray]]:
        """(step, batch) from start_step on, computed `prefetch` batches ahead on a thread."""
        ready: queue.Queue = queue.Queue(maxsize=prefetch)
        stop = threading.Event()
        self._stops.append(stop)

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def produce():
            step = start_step
            try:
                while put((step, self.batch(step))):
                    step += 1
            except BaseException as e:  # re-raised in the consumer
                put(_Failure(e))

        threading.Thread(target=produce, daemon=True, name=f"prefetch {self.name}").start()
        epoch = start_step * self.global_batch_size // self.num_sequences
        try:
            while True:
                started = time.perf_counter()
                item = ready.get()
                self.wait_seconds += time.perf_counter() - started
                if isinstance(item, _Failure):
                    raise item.error
                step = item[0]
                last = ((step + 1) * self.global_batch_size - 1) // self.num_sequences
                if last > epoch:
                    epoch = last
                    print(f"{self.name}: epoch {epoch} begins during step {step} "
                          f"({self.num_sequences:,} records per epoch)", flush=True)
                yield item
        finally:
            stop.set()

    def close(self) -> None:
        """Stops every prefetch thread of this stream."""
        for stop in self._stops:
            stop.set()


class TokenRecords(RecordStream):
    """Text files tokenized at start-up (one document per non-empty line, `<s> line </s>`), cut
    into records; the last max(1, round(0.005 n)) records are the validation split.

    Also callable the old way: TokenRecords(paths, tokenizer, seq_len, seed).batch(step, batch_size).
    """

    VALIDATION_FRACTION = 0.005

    def __init__(self, paths: Sequence[str], tokenizer: Tokenizer, seq_len: int, seed: int, *,
                 global_batch_size: int | None = None, grad_accum: int = 1, process_index: int = 0,
                 process_count: int = 1, split: str = "train"):
        documents = [doc for path in paths for doc in read_documents(path)]
        ids = [tok for doc in tokenizer.encode_batch(documents, bos=True, eos=True) for tok in doc]
        record_len = seq_len + 1
        n = len(ids) // record_len
        n_val = max(1, round(self.VALIDATION_FRACTION * n)) if n > 1 else 0
        name = "--train_data " + ",".join(paths)
        if n == 0:
            raise ValueError(f"{name} holds {len(ids)} tokens: expected at least seq_len + 1 = "
                             f"{record_len}")
        records = np.asarray(ids[: n * record_len], token_dtype(tokenizer.vocab_size))
        records = records.reshape(n, record_len)
        if split not in ("train", "validation"):
            raise ValueError(f"split={split!r}: expected 'train' or 'validation'")
        self.records = records[: n - n_val] if split == "train" else records[n - n_val:]
        super().__init__(name=name, num_records=len(self.records), record_len=record_len, seed=seed,
                         global_batch_size=global_batch_size, grad_accum=grad_accum,
                         process_index=process_index, process_count=process_count)

    def batch(self, step: int, batch_size: int | None = None) -> np.ndarray:
        if batch_size is None or batch_size == self.global_batch_size:
            return super().batch(step)
        positions = step * batch_size + np.arange(batch_size)
        return self._read(self.record_indices(positions)).astype(np.int32)

    def _read(self, indices: np.ndarray) -> np.ndarray:
        return self.records[indices]


def load_manifest(spec: str) -> tuple[dict, str]:
    """(manifest, the directory its shards are in) of manifest.json or of its directory."""
    path = spec if spec.endswith(".json") else join(spec, MANIFEST)
    try:
        manifest = json.loads(read_bytes(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"no manifest at {path}: run `data.py prepare --output=...` first, "
                                "or give comma-separated text files") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): a manifest is written last, whole") from None
    directory = path.rsplit("/", 1)[0] if is_gcs(path) else os.path.dirname(os.path.abspath(path))
    return manifest, directory


class ShardStream(RecordStream):
    """Records of a prepared dataset's shards (local or gs://); reads only the rows it yields."""

    def __init__(self, spec: str, *, tokenizer: Tokenizer, seq_len: int, seed: int,
                 global_batch_size: int, grad_accum: int = 1, process_index: int = 0,
                 process_count: int = 1, split: str = "train", verify: bool = True,
                 read_threads: int = 8):
        manifest, directory = load_manifest(spec)
        if manifest.get("seq_len") != seq_len:
            raise ValueError(f"{spec} was packed with seq_len={manifest.get('seq_len')}, but the model's "
                             f"context is {seq_len}: prepare it again with --seq_len={seq_len}")
        tokenizer_sha = hashlib.sha256(tokenizer.model_bytes).hexdigest()
        if manifest.get("vocab_size") != tokenizer.vocab_size or manifest.get("tokenizer") != tokenizer_sha:
            raise ValueError(
                f"{spec} was tokenized with another tokenizer (vocab_size {manifest.get('vocab_size')}, "
                f"sha256 {manifest.get('tokenizer')}) than the one given (vocab_size "
                f"{tokenizer.vocab_size}, sha256 {tokenizer_sha}): use the tokenizer it was prepared with")
        if split == "train":
            shards = manifest["shards"]
        elif split == "validation":
            shards = manifest.get("validation", {}).get("shards", [])
            if not shards:
                raise ValueError(f"{spec} holds no validation split (prepare with --validation_fraction > 0)")
        else:
            raise ValueError(f"split={split!r}: expected 'train' or 'validation'")
        self._dtype = np.dtype(manifest["dtype"])
        self._paths = [join(directory, s["name"]) for s in shards]
        counts = np.array([s["sequences"] for s in shards], np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        record_len = manifest["record_len"]
        self._record_bytes = record_len * self._dtype.itemsize
        for path, shard in zip(self._paths, shards):
            _check_shard(path, shard, shard["sequences"] * self._record_bytes, verify)
        self._memmaps: dict[int, np.ndarray] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(read_threads) if is_gcs(directory) else None
        super().__init__(name=f"{spec} ({split})", num_records=int(counts.sum()), record_len=record_len,
                         seed=seed, global_batch_size=global_batch_size, grad_accum=grad_accum,
                         process_index=process_index, process_count=process_count,
                         block_records=manifest.get("block_records", 1), manifest=manifest)

    def _runs(self, indices: np.ndarray) -> list[tuple[int, int, int]]:
        """(shard, first record in the shard, count) for each run of consecutive records."""
        shard = np.searchsorted(self._starts, indices, side="right") - 1
        breaks = np.flatnonzero((np.diff(indices) != 1) | (np.diff(shard) != 0)) + 1
        return [(int(shard[a]), int(indices[a] - self._starts[shard[a]]), int(b - a))
                for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(indices)])]

    def _read_run(self, run: tuple[int, int, int]) -> np.ndarray:
        shard, first, count = run
        if self._pool is None:
            if shard not in self._memmaps:
                self._memmaps[shard] = np.memmap(self._paths[shard], self._dtype, "r").reshape(
                    -1, self.record_len)
            return np.asarray(self._memmaps[shard][first:first + count])
        data = read_bytes(self._paths[shard], first * self._record_bytes, count * self._record_bytes)
        return np.frombuffer(data, self._dtype).reshape(count, self.record_len)

    def _read(self, indices: np.ndarray) -> np.ndarray:
        runs = self._runs(indices)
        parts = self._pool.map(self._read_run, runs) if self._pool else map(self._read_run, runs)
        return np.concatenate(list(parts))

    def close(self) -> None:
        super().close()
        if self._pool:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _check_shard(path: str, shard: dict, expected_bytes: int, verify: bool) -> None:
    """Size always; content (sha256 of a local file, GCS's crc32c of an object) when `verify`."""
    size = file_size(path)
    if size is None:
        raise FileNotFoundError(f"shard {path} named in the manifest does not exist")
    if size != expected_bytes:
        raise ValueError(f"shard {path} holds {size} bytes, but the manifest says {shard['sequences']} "
                         f"records = {expected_bytes} bytes: truncated or replaced; prepare it again")
    if not verify:
        return
    if is_gcs(path):
        blob = gcs_blob(path)
        gcs_retry()(blob.reload)()
        if shard.get("crc32c") and blob.crc32c != shard["crc32c"]:
            raise ValueError(f"shard {path} has crc32c {blob.crc32c}, the manifest says "
                             f"{shard['crc32c']}: the object was replaced; prepare it again")
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    if digest.hexdigest() != shard["sha256"]:
        raise ValueError(f"shard {path} has sha256 {digest.hexdigest()}, the manifest says "
                         f"{shard['sha256']}: corrupted or replaced; prepare it again")


def open_train_data(spec: str, *, tokenizer: Tokenizer, seq_len: int, seed: int,
                    global_batch_size: int, grad_accum: int = 1, process_index: int = 0,
                    process_count: int = 1, split: str = "train") -> RecordStream:
    """The stream of `spec`: a manifest (local or gs://, the file or its directory) or
    comma-separated text files. Raises ValueError / FileNotFoundError on anything inconsistent."""
    common = dict(seed=seed, global_batch_size=global_batch_size, grad_accum=grad_accum,
                  process_index=process_index, process_count=process_count, split=split)
    paths = [p for p in spec.split(",") if p]
    is_manifest = is_gcs(spec) or spec.endswith(".json") or (len(paths) == 1 and os.path.isdir(paths[0]))
    if is_manifest:
        return ShardStream(spec, tokenizer=tokenizer, seq_len=seq_len, **common)
    return TokenRecords(paths, tokenizer, seq_len, **common)

