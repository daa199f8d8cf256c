"""The tasks of data.py's corpus pipeline up to the survivors' tokens (map, dedup, components,
encode; mixture.py has the mixture and the pack), one function per stage (docs/data.md says what
each does and guarantees), and the ids and stage files that all stages share under
OUTPUT/_stages/. Each task takes the frozen PrepareConfig, reads and writes files (local or gs://,
whole and atomic, the last one of a task marking it done), and returns a small summary: none
holds the whole corpus."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import sys
import time

import numpy as np
import zstandard

import documents
from prepare_config import PrepareConfig
from storage import join, read_bytes, read_ranges, write_bytes
from stream import token_dtype
from tokenizer_files import tokenizer_from_bytes

STAGE_DIR = "_stages"
KEY_INDEX = 4096  # key-range boundaries indexed per map output: up to this many partitions
MAP_BATCH_DOCUMENTS, MAP_BATCH_BYTES = 128, 1 << 20  # a map task's documents per stage call


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


# ----------------------------------------------------------------------------- ids
def make_ids(split: int, rows: np.ndarray) -> np.ndarray:
    """uint64 ids ordered like (input file, record): the split's index above its row. Splits are
    numbered in (file, byte range) order and rows in file order: within the pipeline these ids
    order documents as the (file, record) ids of docs/data.md do, so the smallest is the first
    occurrence in file order whatever the split size. Draws use mixture.document_ids instead."""
    return (np.uint64(split) << np.uint64(32)) | rows.astype(np.uint64)


def split_bases(splits: list[Split], summaries: list[dict]) -> list[tuple[int, int, int]]:
    """Per split: (file, cleaned rows, lines) of the earlier splits of its file."""
    out, before = [], {}
    for split, summary in zip(splits, summaries):
        rows, lines = before.get(split.file, (0, 0))
        out.append((split.file, rows, lines))
        before[split.file] = (rows + summary["rows"], lines + summary["lines"])
    return out


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
    tokenizer = tokenizer_from_bytes(tokenizer_bytes)
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
