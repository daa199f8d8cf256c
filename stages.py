"""The tasks of data.py's corpus pipeline, one function per stage (data.py's docstring says what
each does and guarantees), and the stage files they share under OUTPUT/_stages/. Each task takes
the frozen PrepareConfig, reads and writes files (local or gs://, whole and atomic, the last one
of a task marking it done), and returns a small summary: none holds the whole corpus."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import sys
import time

import google_crc32c
import numpy as np
import zstandard
from absl import logging

import documents
from storage import file_size, join, read_bytes, read_ranges, write_bytes
from stream import token_dtype
from tokenizer import Tokenizer

STAGE_DIR = "_stages"
KEY_INDEX = 4096  # key-range boundaries indexed per map output: up to this many partitions
MAP_BATCH_DOCUMENTS, MAP_BATCH_BYTES = 128, 1 << 20  # a map task's documents per stage call


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
    code_sources: tuple[str, ...] = ()
    min_chars: int = 100
    max_chars: int = 500_000
    min_alnum: float = 0.70
    min_code_alnum: float = 0.25
    dedup: bool = True
    num_perm: int = 128
    near_dup_threshold: float = 0.8
    language_id: bool = True
    min_language_confidence: float = 0.8
    validation_fraction: float = 0.005
    block_records: int = 16
    seed: int = 0
    max_bad_fraction: float = 0.0
    language_id_chars: int = documents.LANGUAGE_ID_CHARS  # 0: the whole document
    # Sources: named file patterns, each source's layout, its target in tokens.
    sources: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (name, patterns under the --input roots)
    text_fields: tuple[tuple[str, str], ...] = ()  # (source, field or column holding the text)
    book_sources: tuple[str, ...] = ()  # .txt files of one book each (Project Gutenberg)
    trusted_language_sources: tuple[str, ...] = ()  # their records' own lid.176 label is used
    drop_quality_warnings: tuple[str, ...] = ()  # records with one of these OSCAR warnings are dropped
    source_tokens: tuple[tuple[str, float], ...] = ()  # (source, target tokens)
    short_sources: str = "repeat"  # a source short of its target: "repeat" it, or "report" the gap
    # Where and how wide it runs: no byte of the output depends on these.
    num_cpus: int = 0  # local worker processes (0: one per core); ignored with ray_address
    ray_address: str | None = None
    num_partitions: int = 16
    split_mb: float = 64.0


# Engine settings, and the input patterns (the files they match, with their sources, are settings).
ENGINE_ONLY = ("output", "inputs", "sources", "num_cpus", "ray_address", "num_partitions", "split_mb")


@dataclasses.dataclass(frozen=True)
class Split:
    """One map task's input: bytes [start, end) of input file `file` (documents.byte_ranges), and
    the --source it belongs to (None: sources from the records or the file name)."""

    file: int
    path: str
    start: int = 0
    end: int | None = None
    source: str | None = None


def layout(config: PrepareConfig, path: str, source: str | None) -> documents.Layout:
    """How the file's source holds its documents: the source's text field, whether it is books."""
    name = source or documents.source_name(path)
    return documents.Layout(source=source, text_field=dict(config.text_fields).get(name, "text"),
                            book=name in config.book_sources, book_chars=config.max_chars)


# ----------------------------------------------------------------------------- ids and draws
def make_ids(split: int, rows: np.ndarray) -> np.ndarray:
    """uint64 ids ordered like (input file, record): the split's index above its row. Splits are
    numbered in (file, byte range) order and rows in file order: within the pipeline these ids
    order documents as the (file, record) ids of the docstring do, so the smallest is the first
    occurrence in file order whatever the split size. Draws use document_ids instead."""
    return (np.uint64(split) << np.uint64(32)) | rows.astype(np.uint64)


def document_ids(base: tuple[int, int], rows: np.ndarray) -> np.ndarray:
    """The ids the draws of (seed, id) use: the file index above the document's row in the whole
    file. `base`: (file, rows of the file's earlier splits), from split_bases; the same values
    whatever the split size, hence the same output bytes."""
    return make_ids(base[0], base[1] + rows)


def split_bases(splits: list[Split], summaries: list[dict]) -> list[tuple[int, int, int]]:
    """Per split: (file, cleaned rows, lines) of the earlier splits of its file."""
    out, before = [], {}
    for split, summary in zip(splits, summaries):
        rows, lines = before.get(split.file, (0, 0))
        out.append((split.file, rows, lines))
        before[split.file] = (rows + summary["rows"], lines + summary["lines"])
    return out


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that scatters neighbouring ids."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def draw(seed: int, purpose: int, ids: np.ndarray, copy: np.ndarray | int = 0) -> np.ndarray:
    """uint64 hash of (seed, purpose, id, copy): a document's draws, whatever task computes them."""
    with np.errstate(over="ignore"):
        salt = _mix64(np.array([seed * 1_000_003 + purpose], np.uint64))[0]
        return _mix64(_mix64(ids ^ salt) + np.asarray(copy, np.uint64))


def uniform(bits: np.ndarray) -> np.ndarray:
    return (bits >> np.uint64(11)).astype(np.float64) / float(1 << 53)


# ----------------------------------------------------------------------------- stage files
def stage(config: PrepareConfig, name: str) -> str:
    return join(join(config.output, STAGE_DIR), name)


def save_npz(path: str, **arrays) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes(path, buffer.getvalue())


def load_npz(path: str) -> dict:
    with np.load(io.BytesIO(read_bytes(path)), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def load_meta(config: PrepareConfig, split: int) -> dict:
    meta = load_npz(stage(config, f"map-{split:05d}.meta.npz"))
    meta["summary"] = json.loads(str(meta["summary"]))
    return meta


# ----------------------------------------------------------------------------- 1. map
def _index(names: list, name) -> int:
    """`name`'s index in `names`, appended when new: the stage files hold small integers."""
    try:
        return names.index(name)
    except ValueError:
        names.append(name)
        return len(names) - 1


def map_split(config: PrepareConfig, bands: tuple[int, int], split: int, where: Split) -> dict:
    """Reads, cleans, hashes and MinHashes one input split (a file or a byte range of one);
    writes its stage files (the cleaned texts, the signatures, the dedup keys, the metadata
    last); returns its summary. Nothing costly: language ID and tokenization wait for
    deduplication (encode_split). `bands`: documents.lsh_bands of the config, computed once by
    the driver (the optimiser takes ~0.4 s of CPU). Line numbers of bad records count from the
    split's first line (the driver adds the earlier splits' `lines`), except in the error raised
    at --max_bad_fraction=0, which counts the file's lines before it."""
    task_started = time.process_time()
    code_sources = set(config.code_sources)
    drop_warnings = set(config.drop_quality_warnings)
    # CPU seconds (time.process_time), so that other processes on the same cores do not count.
    seconds = dict.fromkeys(("read", "clean", "hash", "minhash"), 0.0)
    summary = {"read": 0, "bad": 0, "bad_examples": [], "input_bytes": 0, "file": where.file,
               "quality_dropped": 0, "sources": [], "hints": []}
    rows = {k: [] for k in ("record", "source", "hint", "hint_score", "code")}
    texts, digests, signatures = [], [], []
    batch: list[str] = []

    def flush():
        # Each stage over a batch of documents rather than all stages per document: sha256 and
        # rensa each stay in the CPU's caches for a batch (benchmarks/README.md).
        t0 = time.process_time()
        encoded = [text.encode() for text in batch]
        texts.extend(encoded)
        digests.extend(hashlib.sha256(blob).digest() for blob in encoded)
        t1 = time.process_time()
        if config.dedup:
            signatures.extend(documents.minhash(text, config.num_perm) for text in batch)
        seconds["hash"] += t1 - t0
        seconds["minhash"] += time.process_time() - t1
        batch.clear()

    record = -1
    batch_bytes = 0
    clock = time.process_time()
    for item in documents.iter_documents(where.path, where.start, where.end, tally := {},
                                         layout(config, where.path, where.source)):
        record += 1
        if isinstance(item, documents.BadRecord):
            if config.max_bad_fraction == 0:
                line = documents.line_number(item.path, item.offset) if where.start else item.line
                raise ValueError(f"{item.path}:{item.unit}{line}: {item.problem} (--max_bad_fraction=0: "
                                 "any bad record fails the run; raise it to skip and count them)")
            summary["bad"] += 1
            if len(summary["bad_examples"]) < 5:
                summary["bad_examples"].append([item.path, item.unit, item.line, item.problem])
            continue
        summary["read"] += 1
        size = len(item.text.encode())
        summary["input_bytes"] += size
        t0 = time.process_time()
        seconds["read"] += t0 - clock
        is_code = item.lang == documents.CODE or item.source in code_sources
        text = documents.clean_text(item.text)
        if drop_warnings.intersection(item.warnings):
            summary["quality_dropped"] += 1
        elif documents.keep_after_cleaning(text, is_code, config.min_chars, config.max_chars,
                                           config.min_alnum, config.min_code_alnum):
            batch.append(text)
            batch_bytes += size
            for key, value in (("record", record), ("source", _index(summary["sources"], item.source)),
                               ("hint", _index(summary["hints"], item.lang)),
                               ("hint_score", np.nan if item.lang_score is None else item.lang_score),
                               ("code", is_code)):
                rows[key].append(value)
        clock = time.process_time()
        seconds["clean"] += clock - t0
        if len(batch) >= MAP_BATCH_DOCUMENTS or batch_bytes >= MAP_BATCH_BYTES:
            flush()
            batch_bytes = 0
            clock = time.process_time()
    seconds["read"] += time.process_time() - clock
    flush()
    n = len(digests)
    started = time.process_time()
    # The cleaned texts, for the survivors' language ID and tokenization after dedup: zstd's
    # fastest level costs ~1% of the map's CPU and shrinks them ~3x.
    write_bytes(stage(config, f"map-{split:05d}.text.zst"), zstandard.ZstdCompressor(level=1).compress(b"".join(texts)))
    text_offsets = np.concatenate([[0], np.cumsum([len(t) for t in texts], dtype=np.int64)])
    keys, key_index = np.zeros((0, 2), np.uint64), np.zeros(KEY_INDEX + 1, np.int64)
    seconds["hash"] += time.process_time() - started
    if config.dedup and n:
        sigs = np.stack(signatures)
        write_bytes(stage(config, f"map-{split:05d}.sigs"), sigs.tobytes())
        started = time.process_time()
        bands, band_rows = bands
        exact = np.frombuffer(b"".join(d[:8] for d in digests), "<u8") & ~np.uint64(1)  # even
        per_doc = np.concatenate([exact[:, None], documents.band_keys(sigs, bands, band_rows)], axis=1)
        ids_ = np.repeat(make_ids(split, np.arange(n)), per_doc.shape[1])
        keys = np.stack([per_doc.ravel(), ids_], axis=1)
        keys = keys[np.lexsort((keys[:, 1], keys[:, 0]))]
        bounds = (np.arange(KEY_INDEX + 1, dtype=np.float64) * 2.0**64 / KEY_INDEX)
        key_index = np.searchsorted(keys[:, 0].astype(np.float64), bounds).astype(np.int64)
        key_index[-1] = len(keys)
        seconds["minhash"] += time.process_time() - started
    write_bytes(stage(config, f"map-{split:05d}.keys"), keys.astype("<u8").tobytes())
    ray = sys.modules.get("ray")  # a Ray worker's; local workers never import it
    node = ray.get_runtime_context().get_node_id() if ray and ray.is_initialized() else None
    # The rest of the task: the stage files; the metadata file's own write apart.
    seconds["map_other"] = time.process_time() - task_started - sum(seconds.values())
    summary.update(seconds=seconds, rows=n, node=node, lines=tally["lines"])
    save_npz(stage(config, f"map-{split:05d}.meta.npz"),
             record=np.array(rows["record"], np.int64), source=np.array(rows["source"], np.int32),
             hint=np.array(rows["hint"], np.int32), hint_score=np.array(rows["hint_score"], np.float32),
             code=np.array(rows["code"], bool), text_offsets=text_offsets, key_index=key_index,
             summary=np.array(json.dumps(summary)))
    return summary


# ----------------------------------------------------------------------------- 2. dedup
def _distinct(rows: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(axis=0, return_index, return_inverse) of signatures given as big-endian bytes
    (their byte order is their uint32 order): (first index of each distinct row, in sorted
    order; each row's distinct index). np.unique's per-call cost on a bucket of 2 was ~80% of
    the dedup stage."""
    order = sorted(range(len(rows)), key=rows.__getitem__)  # stable: a kind's first row leads
    first, kind = [], np.empty(len(rows), np.int64)
    for j in order:
        if not first or rows[j] != rows[first[-1]]:
            first.append(j)
        kind[j] = len(first) - 1
    return np.array(first, np.int64), kind


def dedup_partition(config: PrepareConfig, num_splits: int, part: int) -> dict:
    """Exact and verified near-duplicate pairs among the keys of one key range; writes them."""
    started = time.process_time()
    lo, hi = part * KEY_INDEX // config.num_partitions, (part + 1) * KEY_INDEX // config.num_partitions
    chunks = []
    for split in range(num_splits):
        index = load_npz(stage(config, f"map-{split:05d}.meta.npz"))["key_index"]
        a, b = int(index[lo]), int(index[hi])
        if b > a:
            data = read_bytes(stage(config, f"map-{split:05d}.keys"), a * 16, (b - a) * 16)
            chunks.append(np.frombuffer(data, "<u8").reshape(-1, 2))
    keys = np.concatenate(chunks) if chunks else np.zeros((0, 2), np.uint64)
    keys = keys[np.lexsort((keys[:, 1], keys[:, 0]))]
    starts = np.flatnonzero(np.r_[True, keys[1:, 0] != keys[:-1, 0]]) if len(keys) else np.zeros(0, int)
    sizes = np.diff(np.r_[starts, len(keys)])
    group_keys = keys[starts[sizes > 1], 0]
    groups = [keys[s:s + k, 1] for s, k in zip(starts[sizes > 1], sizes[sizes > 1])]
    exact = [g for g, key in zip(groups, group_keys) if not key & 1]  # even keys: sha256
    bands = [g for g, key in zip(groups, group_keys) if key & 1]
    pairs = [np.stack([g[np.zeros(len(g) - 1, int)], g[1:]], axis=1) for g in exact]
    exact_removed = np.concatenate([g[1:] for g in exact]) if exact else np.zeros(0, np.uint64)
    if bands:
        needed = np.unique(np.concatenate(bands))
        signature = {}
        for split in np.unique(needed >> np.uint64(32)):
            ids = needed[(needed >> np.uint64(32)) == split]
            rows = (ids & np.uint64(0xFFFFFFFF)).astype(np.int64)
            size = config.num_perm * 4
            data = read_ranges(stage(config, f"map-{int(split):05d}.sigs"),
                               [(r * size, (r + 1) * size) for r in rows.tolist()])
            for i, blob in zip(ids.tolist(), data):
                signature[i] = np.frombuffer(blob, "<u4").astype(">u4").tobytes()
        for group in bands:
            # Equal signatures (copies, boilerplate repeated thousands of times) are one node for
            # the comparisons, each member linked to the first of its kind: a bucket's cost grows
            # with its distinct signatures squared, not its members.
            first, kind = _distinct([signature[i] for i in group.tolist()])
            sigs = np.frombuffer(b"".join(signature[int(group[f])] for f in first), ">u4").reshape(len(first), -1)
            pairs.append(np.stack([group[first[kind]], group], axis=1)[first[kind] != np.arange(len(group))])
            heads = group[first]
            for i in range(len(sigs) - 1):  # each pair verified: a bucket collision is no proof
                similar = (sigs[i + 1:] == sigs[i]).mean(axis=1) >= config.near_dup_threshold
                if similar.any():
                    others = heads[i + 1:][similar]
                    pairs.append(np.stack([np.full(len(others), heads[i], np.uint64), others], axis=1))
    pairs = np.unique(np.concatenate(pairs), axis=0) if pairs else np.zeros((0, 2), np.uint64)
    save_npz(stage(config, f"dedup-{part:05d}-of-{config.num_partitions:05d}.npz"),
             pairs=pairs, exact_removed=np.unique(exact_removed))
    return {"pairs": len(pairs), "seconds": time.process_time() - started}


# ----------------------------------------------------------------------------- 3. components
def smallest_in_component(edges: np.ndarray, n: int) -> np.ndarray:
    """For nodes 0..n-1 and int64 edges [m, 2]: the smallest node of each one's connected
    component. Each round links every node to its neighbours' smallest label, then halves the
    paths (label[label]): rounds grow with the log of a component's diameter. (scipy's
    connected_components did this; importing scipy.sparse cost more CPU than the stage.)"""
    label = np.arange(n)
    a, b = edges[:, 0], edges[:, 1]
    while True:
        linked = label.copy()
        np.minimum.at(linked, a, label[b])
        np.minimum.at(linked, b, label[a])
        linked = linked[linked]
        if np.array_equal(linked, label):
            return label
        label = linked


def components(config: PrepareConfig, num_splits: int) -> dict:
    """Connected components of all pairs; writes, per input split, the rows removed (exact
    duplicates apart), each component keeping its smallest id."""
    started = time.process_time()
    parts = [load_npz(stage(config, f"dedup-{p:05d}-of-{config.num_partitions:05d}.npz"))
             for p in range(config.num_partitions)]
    pairs = np.concatenate([p["pairs"] for p in parts])
    exact_removed = np.unique(np.concatenate([p["exact_removed"] for p in parts]))
    ids, inverse = np.unique(pairs, return_inverse=True)  # sorted: the smallest index is the smallest id
    removed = ids[smallest_in_component(inverse.reshape(-1, 2), len(ids)) != np.arange(len(ids))]
    for split in range(num_splits):
        mine = lambda a: (a[(a >> np.uint64(32)) == split] & np.uint64(0xFFFFFFFF)).astype(np.int64)  # noqa: E731
        save_npz(stage(config, f"removed-{split:05d}.npz"), removed=mine(removed),
                 exact_removed=mine(exact_removed))
    summary = {"pairs": len(pairs), "documents_in_pairs": len(ids), "removed": len(removed),
               "seconds": time.process_time() - started}
    write_bytes(stage(config, "components.json"), json.dumps(summary).encode())
    return summary


# ----------------------------------------------------------------------------- 4. encode
def removed_rows(config: PrepareConfig, split: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept after exact dedup, kept after near dedup): boolean masks over the split's rows."""
    if not config.dedup:
        return np.ones(n, bool), np.ones(n, bool)
    removed = load_npz(stage(config, f"removed-{split:05d}.npz"))
    exact_kept = ~np.isin(np.arange(n), removed["exact_removed"])
    return exact_kept, exact_kept & ~np.isin(np.arange(n), removed["removed"])


def encode_split(config: PrepareConfig, tokenizer_bytes: bytes, split: int) -> dict:
    """Language ID and tokenization of one split's documents that survived deduplication (the
    costly per-document work, spent only on them); writes the tokens and, last, a file of their
    languages, confidences and token counts (0: removed, or its language not kept)."""
    started = time.process_time()
    tokenizer = Tokenizer.from_bytes(tokenizer_bytes)
    meta = load_meta(config, split)
    summary = meta["summary"]
    n = len(meta["record"])
    _, kept = removed_rows(config, split, n)
    blob = zstandard.ZstdDecompressor().decompress(read_bytes(stage(config, f"map-{split:05d}.text.zst")),
                                                   max_output_size=int(meta["text_offsets"][-1]))
    offsets = meta["text_offsets"].tolist()
    sources = np.array(summary["sources"] or [""], object)[meta["source"]] if n else []
    hints = [summary["hints"][h] for h in meta["hint"].tolist()]
    trusted = set(config.trusted_language_sources)
    wanted = {lang for lang, _ in config.languages}
    seconds = dict.fromkeys(("language_id", "tokenize"), 0.0)
    langs: list = []
    lang = np.full(n, -1, np.int32)
    confidence = np.zeros(n, np.float32)
    chosen, texts = [], []
    clock = time.process_time()
    for row in np.flatnonzero(kept).tolist():
        text = blob[offsets[row]:offsets[row + 1]].decode()
        score = float(meta["hint_score"][row])
        if meta["code"][row]:
            found = (documents.CODE, 1.0)
        elif not config.language_id:
            found = (hints[row] or "und", 1.0)
        elif sources[row] in trusted and hints[row] and score == score:  # a record's own lid.176 answer
            found = (hints[row], score)
        else:
            found = documents.detect_language(text, config.language_id_chars or None)
        lang[row] = _index(langs, found[0])
        confidence[row] = found[1]
        if found[0] in wanted and found[1] >= config.min_language_confidence:
            chosen.append(row)
            texts.append(text)
    seconds["language_id"] = time.process_time() - clock
    clock = time.process_time()
    dtype = token_dtype(tokenizer.vocab_size)
    # A document is what the tokenizer starts one with (<s>), its text, eos; code inside the
    # <|code|>/<|endcode|> wrappers where the vocabulary has them (data.py says when it has not).
    head, tail = tokenizer.document_prefix, [tokenizer.eos_id]
    code_head, code_tail = ([tokenizer.code_id], [tokenizer.endcode_id]) if tokenizer.has_code_wrappers else ([], [])
    tokens = np.zeros(n, np.int64)
    parts = []
    for row, ids in zip(chosen, tokenizer.encode_batch(texts)):
        ids = [*head, *code_head, *ids, *code_tail, *tail] if meta["code"][row] else [*head, *ids, *tail]
        tokens[row] = len(ids)
        parts.append(np.array(ids, dtype))
    write_bytes(stage(config, f"encode-{split:05d}.tokens"), np.concatenate(parts or [np.zeros(0, dtype)]).tobytes())
    seconds["tokenize"] = time.process_time() - clock
    seconds["encode_other"] = time.process_time() - started - sum(seconds.values())
    save_npz(stage(config, f"encode-{split:05d}.npz"), lang=lang, confidence=confidence, tokens=tokens,
             token_offsets=np.concatenate([[0], np.cumsum(tokens)]),
             summary=np.array(json.dumps({"langs": langs, "seconds": seconds})))
    return {"seconds": seconds}


def load_encoded(config: PrepareConfig, split: int) -> dict:
    encoded = load_npz(stage(config, f"encode-{split:05d}.npz"))
    encoded["summary"] = json.loads(str(encoded["summary"]))
    return encoded


# ----------------------------------------------------------------------------- 5. mixture
HISTOGRAM_BINS = 256  # of each document's draw u, for the mixture's thresholds (mixture_thresholds)


@dataclasses.dataclass(frozen=True)
class Kept:
    """One input split's documents after dedup and language ID."""

    rows: np.ndarray  # row index in the file's stage files
    groups: list[tuple[str, str]]  # the (source, language) groups they fall in, sorted
    group: np.ndarray  # each one's index in `groups`
    tokens: np.ndarray
    u: np.ndarray  # each one's draw from (seed, id), uniform in [0, 1): which copies it gets


def kept_documents(config: PrepareConfig, split: int, base: tuple[int, int]) -> tuple[Kept, dict, dict]:
    """The kept documents of one split (those the encode task tokenized: dedup kept them, and
    their language), and its metadata and encode file. `base`: (file, rows of its earlier
    splits), from split_bases."""
    meta, encoded = load_meta(config, split), load_encoded(config, split)
    rows = np.flatnonzero(encoded["tokens"] > 0)
    # Groups as integer codes of (source, language), named once per split: the pack tasks call
    # this for every split, where a name per document would cost Python work per document.
    langs = encoded["summary"]["langs"]
    codes, inverse = np.unique(meta["source"][rows].astype(np.int64) * len(langs) + encoded["lang"][rows],
                               return_inverse=True)
    names = [(meta["summary"]["sources"][c // len(langs)], langs[c % len(langs)]) for c in codes.tolist()]
    groups = sorted(names)
    position = {group: i for i, group in enumerate(groups)}
    group = np.array([position[name] for name in names], np.int64)[inverse]
    ids = document_ids(base, rows)
    u = uniform(draw(config.seed, 0, ids)) if len(ids) else np.zeros(0)
    return Kept(rows, groups, group, encoded["tokens"][rows], u), meta, encoded


def draw_bins(kept: Kept) -> np.ndarray:
    return np.minimum((kept.u * HISTOGRAM_BINS).astype(np.int64), HISTOGRAM_BINS - 1)


def group_totals(config: PrepareConfig, split: int, base: tuple[int, int]) -> dict:
    """Per (source, language) of one split's kept documents: tokens, documents and the tokens
    per bin of their draws (HISTOGRAM_BINS); its counts per stage and source and per stage and
    language (known after deduplication only: only survivors are language-identified); and its
    encode task's CPU seconds (read here, so that the driver reads no encode file)."""
    kept, meta, encoded = kept_documents(config, split, base)
    bins = draw_bins(kept)
    out = {}
    for i, group in enumerate(kept.groups):
        mask = kept.group == i
        out[group] = (int(kept.tokens[mask].sum()), int(mask.sum()),
                      np.bincount(bins[mask], kept.tokens[mask], HISTOGRAM_BINS).astype(np.int64))
    n = len(meta["record"])
    sources = np.array(meta["summary"]["sources"] or [""], object)[meta["source"]] if n else np.zeros(0, object)
    langs = np.array(encoded["summary"]["langs"] + [""], object)[encoded["lang"]] if n else np.zeros(0, object)
    exact_kept, near_kept = removed_rows(config, split, n)
    language_kept = encoded["tokens"] > 0
    by_source = {stage_: {s: int(np.sum(mask & (sources == s))) for s in sorted(set(sources.tolist()))}
                 for stage_, mask in (("cleaned", np.ones(n, bool)), ("exact_dedup", exact_kept),
                                      ("near_dedup", near_kept), ("language_kept", language_kept))}
    by_language = {stage_: {lang: int(np.sum(mask & (langs == lang))) for lang in encoded["summary"]["langs"]}
                   for stage_, mask in (("near_dedup", near_kept), ("language_kept", language_kept))}
    return {"groups": out, "counts": {"by_source": by_source, "by_language": by_language},
            "seconds": encoded["summary"]["seconds"]}


def group_targets(config: PrepareConfig, available: dict) -> dict:
    """Tokens to write per (source, language) group, from the tokens each holds after dedup and
    language ID. With --source_tokens: each source's target, split over its languages in their
    natural proportions; a short source repeated (x > 1) or, with short_sources="report", written
    once; a source without a target kept as it is. Else: the language shares and source weights
    (mixture_factors), total tokens unchanged."""
    if config.source_tokens:
        targets = dict(config.source_tokens)
        per_source: dict = {}
        for (source, _), tokens in available.items():
            per_source[source] = per_source.get(source, 0) + tokens
        factor = {}
        for source, tokens in per_source.items():
            x = targets[source] / tokens if source in targets else 1.0
            factor[source] = min(x, 1.0) if config.short_sources == "report" else x
        return {(s, lang): factor[s] * tokens for (s, lang), tokens in available.items()}
    weights = dict(config.source_weights)
    totals: dict = {}
    for (source, lang), tokens in available.items():
        entry = totals.setdefault(lang, [0, 0.0])
        entry[0] += tokens
        entry[1] += weights.get(source, 1.0) * tokens
    factors = mixture_factors(config, totals)
    return {(s, lang): weights.get(s, 1.0) * factors[lang] * tokens for (s, lang), tokens in available.items()}


def mixture_factors(config: PrepareConfig, totals: dict) -> dict:
    """Per-language factor f_l (see the docstring): natural shares unless a share is given."""
    all_tokens = sum(t for t, _ in totals.values())
    all_weighted = sum(w for _, w in totals.values()) or 1.0
    factors = {lang: all_tokens / all_weighted for lang in totals}
    for lang, share in config.languages:
        if share is None:
            continue
        if not totals.get(lang, (0, 0))[1]:
            logging.warning("no %s document (of non-zero source weight) survived the filters: its "
                            "share %s cannot be reached", lang, share)
            continue
        factors[lang] = share * all_tokens / totals[lang][1]
    return factors


def boundary_bins(targets: dict, available: dict, histograms: dict) -> dict:
    """Per group: (whole copies every document gets, tokens still to draw, the histogram bin where
    the draws' cumulative tokens reach them, the tokens of the bins below it)."""
    out = {}
    for group, target in targets.items():
        whole = int(target // available[group]) if available[group] else 0
        rest = target - whole * available[group]
        cumulative = np.cumsum(histograms[group])
        b = min(int(np.searchsorted(cumulative, rest)), HISTOGRAM_BINS - 1)
        out[group] = (whole, rest, b, int(cumulative[b - 1]) if b else 0)
    return out


def bin_members(config: PrepareConfig, split: int, base: tuple[int, int], bins: dict) -> dict:
    """Per group: (draw, tokens) of one split's kept documents whose draw falls in the group's
    boundary bin."""
    kept = kept_documents(config, split, base)[0]
    b = draw_bins(kept)
    out = {}
    for i, group in enumerate(kept.groups):
        mask = (kept.group == i) & (b == bins[group][2])
        out[group] = (kept.u[mask], kept.tokens[mask])
    return out


def mixture_thresholds(bins: dict, members: list[dict]) -> dict:
    """Per group: (whole copies, threshold): a document gets one more copy when its draw is
    below the threshold, chosen among the boundary bin's draws so that the tokens drawn come
    nearest the group's target: exact to within one document (a draw per document, each keeping
    or not, would miss it by ~1/sqrt(documents))."""
    out = {}
    for group, (whole, rest, b, below) in bins.items():
        u = np.concatenate([m[group][0] for m in members if group in m] or [np.zeros(0)])
        tokens = np.concatenate([m[group][1] for m in members if group in m] or [np.zeros(0, np.int64)])
        order = np.argsort(u, kind="stable")
        u, reached = u[order], below + np.concatenate([[0], np.cumsum(tokens[order])])
        k = int(np.argmin(np.abs(reached - rest)))  # documents of the bin taken, in draw order
        out[group] = (whole, float(u[k]) if k < len(u) else (b + 1) / HISTOGRAM_BINS)
    return out


def emitted(kept: Kept, mixture: dict) -> tuple[np.ndarray, np.ndarray]:
    """(kept-document index, copy number) per emitted copy of one split's kept documents;
    `mixture`: mixture_thresholds'."""
    whole = np.array([mixture[g][0] for g in kept.groups], np.int64)[kept.group]
    threshold = np.array([mixture[g][1] for g in kept.groups], np.float64)[kept.group]
    copies = whole + (kept.u < threshold)
    doc = np.repeat(np.arange(len(kept.u)), copies)
    copy = np.arange(len(doc)) - np.repeat(np.cumsum(copies) - copies, copies)
    return doc, copy


def plan_split(config: PrepareConfig, split: int, base: tuple[int, int], mixture: dict) -> dict:
    """Tokens per shard, and documents and tokens emitted per (source, language), of one split."""
    kept = kept_documents(config, split, base)[0]
    doc, shard = shards_of(config, base, kept, mixture)
    tokens = kept.tokens[doc]
    copies = np.bincount(kept.group[doc], minlength=len(kept.groups))
    written = np.bincount(kept.group[doc], tokens, len(kept.groups)).astype(np.int64)
    return {"shard_tokens": np.bincount(shard, tokens, config.num_shards).astype(np.int64).tolist(),
            "groups": {g: [int(c), int(t)] for g, c, t in zip(kept.groups, copies, written) if c}}


def shards_of(config: PrepareConfig, base: tuple[int, int], kept: Kept, mixture: dict) -> tuple[np.ndarray, np.ndarray]:
    """(kept-document index, shard) per emitted copy: copy c of document id goes to shard
    hash(seed, id, c) mod num_shards."""
    doc, copy = emitted(kept, mixture)
    ids = document_ids(base, kept.rows)
    shard = (draw(config.seed, 1, ids[doc], copy) % np.uint64(config.num_shards)).astype(np.int64)
    return doc, shard


# ----------------------------------------------------------------------------- 6. pack
def shard_entry(name: str, data: bytes, sequences: int) -> dict:
    # crc32c as GCS reports it (base64, big-endian), so a stream can check an object unread.
    crc32c = base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()
    return {"name": name, "sequences": sequences, "sha256": hashlib.sha256(data).hexdigest(), "crc32c": crc32c}


def pack_shard(config: PrepareConfig, bases: list[tuple[int, int]], mixture: dict, dtype: str, shard: int,
               validation_records: int) -> dict:
    """Train shard `shard`: its copies shuffled, concatenated and cut; its last
    `validation_records` records go to a validation part. `bases`: per split, (file, rows of
    its earlier splits)."""
    started = time.process_time()
    dtype = np.dtype(dtype)
    pieces = []  # token arrays in (file, document, copy) order, whatever the splits; shuffled below
    for split, base in enumerate(bases):
        kept, _, encoded = kept_documents(config, split, base)
        doc, where = shards_of(config, base, kept, mixture)
        rows = kept.rows[doc[where == shard]]
        offsets = encoded["token_offsets"] * dtype.itemsize
        unique = np.unique(rows)
        data = read_ranges(stage(config, f"encode-{split:05d}.tokens"),
                           list(zip(offsets[unique].tolist(), offsets[unique + 1].tolist())))
        tokens = {row: np.frombuffer(blob, dtype) for row, blob in zip(unique.tolist(), data)}
        pieces += [tokens[row] for row in rows.tolist()]
    order = np.random.default_rng([config.seed, 2, shard]).permutation(len(pieces))
    stream = np.concatenate([pieces[i] for i in order] or [np.zeros(0, dtype)])
    record_len = config.seq_len + 1
    n = len(stream) // record_len
    records = stream[: n * record_len].reshape(n, record_len)
    train = records[: n - validation_records].tobytes()
    name = f"train-{shard:05d}-of-{config.num_shards:05d}.bin"
    if file_size(join(config.output, name)) != len(train):  # a finished shard of this run is kept
        write_bytes(join(config.output, name), train)
    write_bytes(stage(config, f"validation-{shard:05d}.bin"), records[n - validation_records:].tobytes())
    entry = shard_entry(name, train, n - validation_records)
    result = {"entry": entry, "dropped_tail_tokens": int(len(stream) - n * record_len),
              "seconds": time.process_time() - started}
    write_bytes(stage(config, f"pack-{shard:05d}.json"), json.dumps(result).encode())
    return result


def validation_shard(config: PrepareConfig, sequences: int) -> dict:
    """The validation parts of the train shards, in shard order, as one shard."""
    data = b"".join(read_bytes(stage(config, f"validation-{s:05d}.bin")) for s in range(config.num_shards))
    name = "validation-00000-of-00001.bin"
    write_bytes(join(config.output, name), data)
    return shard_entry(name, data, sequences)
