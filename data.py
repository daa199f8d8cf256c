"""The corpus pipeline: raw text to packed token shards, as Ray tasks, on one machine or a cluster.

    python data.py prepare --input=PATTERN[,PATTERN...] --output=DIR_OR_GS_URI --tokenizer=MODEL \\
        --seq_len=2048 --num_shards=N [--languages=en:0.7,fr:0.3,code:0.05] [--code_sources=stack]
        [--num_cpus=N | --ray_address=auto|HOST:PORT]

Without --ray_address the command starts a local Ray with --num_cpus CPUs (default: all);
with it, it joins a running cluster (scripts/tpu.sh starts one on a TPU VM's hosts). Input
formats are documents.py's; the shard format and the stream train.py reads are stream.py's.

A document's id is (input file index in the order given, record index in the file). Stages,
each a set of Ray tasks whose outputs are files under OUTPUT/_stages/ (local or gs://), each
written whole and atomically, the last one of a task marking it done:
1. map, one task per input file: read (malformed records are skipped and counted up to
   --max_bad_fraction of all records; at 0 the first one fails the run naming file and line);
   clean (NFC, control characters other than tab and newline stripped; documents outside
   [--min_chars, --max_chars] dropped; prose needs --min_alnum letters and digits among its
   non-whitespace characters, code --min_code_alnum and documents.code_line_rule); sha256;
   MinHash (rensa, --num_perm, word 5-grams) cut into LSH bands (datasketch's choice of bands
   for --near_dup_threshold); language ID (fastText lid.176 on the whole document, kept at
   --min_language_confidence; code, i.e. records with lang `code` and sources named in
   --code_sources, skips it); tokenize the documents whose language is kept (`<s> text </s>`,
   code `<s><|code|> text <|endcode|></s>`). Writes the tokens, the signatures, one metadata
   row per cleaned document, and its exact-hash and band keys sorted by key.
2. dedup, one task per key range (--num_partitions of the 64-bit key space): documents sharing an
   exact key are exact duplicates; documents sharing a band key are candidates, kept as a pair
   when their estimated Jaccard similarity reaches --near_dup_threshold (a bucket collision
   alone is not a duplicate). Every pair is found whatever file, task or node holds its ends.
3. components, one task: connected components of the pairs (scipy); each keeps its smallest id.
   Its memory grows with the duplicate pairs, not with the corpus.
4. mixture: per-language token shares from --languages (`en:0.7,fr:0.3`; names without weights
   keep natural shares) and per-source weights (--source_weights=wiki:2,oscar:0.5), reached
   by up/down-sampling that keeps the total token count: a kept document of language l and
   source weight w is emitted floor(x) + [u < frac(x)] times, x = w * share_l * T / (sum over
   language l of w * tokens), with u drawn from (--seed, id).
5. pack, one task per train shard: copy c of document id goes to shard hash(seed, id, c) mod
   --num_shards; a shard shuffles its copies (seed, shard), concatenates them and cuts records of
   seq_len + 1 tokens (the last partial one dropped). max(1, round(--validation_fraction * n))
   of all n records, spread over the shards' tails, form the validation split.
Output bytes depend only on the inputs and the settings, not on CPU, node or partition counts,
nor on task retries. Memory: the driver holds per-task summaries, never per-document state; a
map task holds one input file's metadata (tokens are written as they come), a dedup task one key
range, a pack task one shard. A rerun of the same command resumes: finished stage files are
kept (no finished input file is read again) and finished shards are not rewritten; OUTPUT/_run.json,
created first and exclusively, refuses a run with other settings into the same output.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Sequence

import google_crc32c
import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

import documents
from storage import (expand_inputs, file_size, is_gcs, join, read_bytes, read_json, read_ranges,
                     write_bytes)
from stream import MANIFEST, token_dtype
from tokenizer import BOS_ID, CODE_ID, ENDCODE_ID, EOS_ID, Tokenizer

USAGE = """Prepare a corpus: clean, deduplicate (exact and MinHash LSH, corpus-wide), language-ID,
mix and pack raw text into token shards for train.py, as Ray tasks (a local Ray, or
--ray_address of a cluster). Example:
  python data.py prepare --input=samples/*.txt --output=runs/shards --tokenizer=tok.model \\
      --seq_len=128 --num_shards=4 --languages=en:0.7,fr:0.3
See the docstring of data.py for the stages and guarantees."""

RUN_FILE = "_run.json"
STAGE_DIR = "_stages"
STAGES = ("read", "cleaned", "exact_dedup", "near_dedup", "language_kept")
VOLATILE_KEYS = ("stage_cpu_seconds", "stage_wall_seconds", "wall_seconds")  # timings only
KEY_INDEX = 4096  # key-range boundaries indexed per map output: up to this many partitions
REPO = os.path.dirname(os.path.abspath(__file__))


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
    # Where and how wide it runs: no byte of the output depends on these.
    num_cpus: int = 0  # local Ray's CPUs (0: every core); ignored with ray_address
    ray_address: str | None = None
    num_partitions: int = 16


ENGINE_ONLY = ("output", "inputs", "num_cpus", "ray_address", "num_partitions")


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


def check_config(config: PrepareConfig) -> None:
    problems = []
    if config.seq_len < 1:
        problems.append(f"--seq_len={config.seq_len} must be positive")
    if config.num_shards < 1:
        problems.append(f"--num_shards={config.num_shards} must be positive")
    if not 0 <= config.validation_fraction < 1:
        problems.append(f"--validation_fraction={config.validation_fraction} must be in [0, 1)")
    if not 0 <= config.max_bad_fraction <= 1:
        problems.append(f"--max_bad_fraction={config.max_bad_fraction} must be in [0, 1]")
    if config.block_records < 1:
        problems.append(f"--block_records={config.block_records} must be positive")
    if not 1 <= config.num_partitions <= KEY_INDEX:
        problems.append(f"--num_partitions={config.num_partitions} must be in [1, {KEY_INDEX}]")
    if not 0 < config.near_dup_threshold <= 1:
        problems.append(f"--near_dup_threshold={config.near_dup_threshold} must be in (0, 1]")
    if problems:
        raise ValueError("; ".join(problems))


# ----------------------------------------------------------------------------- ids and draws
def make_ids(split: int, rows: np.ndarray) -> np.ndarray:
    """uint64 ids ordered like (input file, record): the file index above the file's row."""
    return (np.uint64(split) << np.uint64(32)) | rows.astype(np.uint64)


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
def map_split(config: PrepareConfig, tokenizer_bytes: bytes, split: int, path: str) -> dict:
    """Reads, cleans, hashes, MinHashes, language-IDs and tokenizes one input file; writes its
    stage files (the metadata last); returns its summary."""
    tokenizer = Tokenizer.from_bytes(tokenizer_bytes)
    code_sources = set(config.code_sources)
    wanted = {lang for lang, _ in config.languages}
    dtype = token_dtype(tokenizer.vocab_size)
    seconds = dict.fromkeys(("read", "clean", "minhash", "language_id", "tokenize"), 0.0)
    summary = {"read": 0, "bad": 0, "bad_examples": [], "input_bytes": 0}
    langs: list[str] = []
    sources: list[str] = []
    rows = {k: [] for k in ("record", "lang", "confidence", "source", "tokens")}
    digests, signatures, token_parts = [], [], []
    record = -1
    clock = time.perf_counter()
    for item in documents.iter_documents(path):
        record += 1
        if isinstance(item, documents.BadRecord):
            if config.max_bad_fraction == 0:
                raise ValueError(f"{item.where}: {item.problem} (--max_bad_fraction=0: any bad record "
                                 "fails the run; raise it to skip and count them)")
            summary["bad"] += 1
            if len(summary["bad_examples"]) < 5:
                summary["bad_examples"].append(f"{item.where}: {item.problem}")
            continue
        summary["read"] += 1
        summary["input_bytes"] += len(item.text.encode())
        t0 = time.perf_counter()
        seconds["read"] += t0 - clock
        is_code = item.lang == documents.CODE or item.source in code_sources
        text = documents.clean_text(item.text)
        keep = documents.keep_after_cleaning(text, is_code, config.min_chars, config.max_chars,
                                             config.min_alnum, config.min_code_alnum)
        t1 = time.perf_counter()
        seconds["clean"] += t1 - t0
        if not keep:
            clock = time.perf_counter()
            continue
        digests.append(hashlib.sha256(text.encode()).digest())
        if config.dedup:
            signatures.append(documents.minhash(text, config.num_perm))
        t2 = time.perf_counter()
        if is_code:
            lang, score = documents.CODE, 1.0
        elif config.language_id:
            lang, score = documents.detect_language(text)
        else:
            lang, score = item.lang or "und", 1.0
        t3 = time.perf_counter()
        ids = []
        if lang in wanted and score >= config.min_language_confidence:
            ids = tokenizer.encode(text)
            ids = [BOS_ID, CODE_ID, *ids, ENDCODE_ID, EOS_ID] if is_code else [BOS_ID, *ids, EOS_ID]
            token_parts.append(np.asarray(ids, dtype))
        seconds["minhash"] += t2 - t1
        seconds["language_id"] += t3 - t2
        seconds["tokenize"] += time.perf_counter() - t3
        if lang not in langs:
            langs.append(lang)
        if item.source not in sources:
            sources.append(item.source)
        for key, value in (("record", record), ("lang", langs.index(lang)), ("confidence", score),
                           ("source", sources.index(item.source)), ("tokens", len(ids))):
            rows[key].append(value)
        clock = time.perf_counter()
    seconds["read"] += time.perf_counter() - clock
    n = len(digests)
    tokens = np.array(rows["tokens"], np.int64)
    write_bytes(stage(config, f"map-{split:05d}.tokens"),
                np.concatenate(token_parts or [np.zeros(0, dtype)]).tobytes())
    keys, key_index = np.zeros((0, 2), np.uint64), np.zeros(KEY_INDEX + 1, np.int64)
    if config.dedup and n:
        sigs = np.stack(signatures)
        write_bytes(stage(config, f"map-{split:05d}.sigs"), sigs.tobytes())
        started = time.perf_counter()
        bands, band_rows = documents.lsh_bands(config.near_dup_threshold, config.num_perm)
        exact = np.frombuffer(b"".join(d[:8] for d in digests), "<u8") & ~np.uint64(1)  # even
        per_doc = np.concatenate([exact[:, None], documents.band_keys(sigs, bands, band_rows)], axis=1)
        ids_ = np.repeat(make_ids(split, np.arange(n)), per_doc.shape[1])
        keys = np.stack([per_doc.ravel(), ids_], axis=1)
        keys = keys[np.lexsort((keys[:, 1], keys[:, 0]))]
        bounds = (np.arange(KEY_INDEX + 1, dtype=np.float64) * 2.0**64 / KEY_INDEX)
        key_index = np.searchsorted(keys[:, 0].astype(np.float64), bounds).astype(np.int64)
        key_index[-1] = len(keys)
        seconds["minhash"] += time.perf_counter() - started
    write_bytes(stage(config, f"map-{split:05d}.keys"), keys.astype("<u8").tobytes())
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    summary.update(langs=langs, sources=sources, seconds=seconds, rows=n, node=node)
    save_npz(stage(config, f"map-{split:05d}.meta.npz"),
             record=np.array(rows["record"], np.int64), lang=np.array(rows["lang"], np.int32),
             confidence=np.array(rows["confidence"], np.float32),
             source=np.array(rows["source"], np.int32), tokens=tokens,
             token_offsets=np.concatenate([[0], np.cumsum(tokens)]), key_index=key_index,
             summary=np.array(json.dumps(summary)))
    return summary


# ----------------------------------------------------------------------------- 2. dedup
def dedup_partition(config: PrepareConfig, num_splits: int, part: int) -> dict:
    """Exact and verified near-duplicate pairs among the keys of one key range; writes them."""
    started = time.perf_counter()
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
                signature[i] = np.frombuffer(blob, np.uint32)
        for group in bands:
            sigs = np.stack([signature[int(i)] for i in group])
            for i in range(len(group) - 1):  # each pair verified: a bucket collision is no proof
                similar = (sigs[i + 1:] == sigs[i]).mean(axis=1) >= config.near_dup_threshold
                if similar.any():
                    others = group[i + 1:][similar]
                    pairs.append(np.stack([np.full(len(others), group[i], np.uint64), others], axis=1))
    pairs = np.unique(np.concatenate(pairs), axis=0) if pairs else np.zeros((0, 2), np.uint64)
    save_npz(stage(config, f"dedup-{part:05d}-of-{config.num_partitions:05d}.npz"),
             pairs=pairs, exact_removed=np.unique(exact_removed))
    return {"pairs": len(pairs), "seconds": time.perf_counter() - started}


# ----------------------------------------------------------------------------- 3. components
def components(config: PrepareConfig, num_splits: int) -> dict:
    """Connected components of all pairs; writes, per input file, the rows removed (exact
    duplicates apart), each component keeping its smallest id."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    started = time.perf_counter()
    parts = [load_npz(stage(config, f"dedup-{p:05d}-of-{config.num_partitions:05d}.npz"))
             for p in range(config.num_partitions)]
    pairs = np.concatenate([p["pairs"] for p in parts])
    exact_removed = np.unique(np.concatenate([p["exact_removed"] for p in parts]))
    ids, inverse = np.unique(pairs, return_inverse=True)
    inverse = inverse.reshape(-1, 2)
    graph = coo_matrix((np.ones(len(pairs), np.int8), (inverse[:, 0], inverse[:, 1])),
                       shape=(len(ids), len(ids)))
    _, label = connected_components(graph, directed=False)
    smallest = np.full(label.max() + 1 if len(label) else 0, len(ids))
    np.minimum.at(smallest, label, np.arange(len(ids)))  # ids are sorted: first index = smallest id
    removed = ids[smallest[label] != np.arange(len(ids))]
    for split in range(num_splits):
        mine = lambda a: (a[(a >> np.uint64(32)) == split] & np.uint64(0xFFFFFFFF)).astype(np.int64)  # noqa: E731
        save_npz(stage(config, f"removed-{split:05d}.npz"), removed=mine(removed),
                 exact_removed=mine(exact_removed))
    summary = {"pairs": len(pairs), "documents_in_pairs": len(ids), "removed": len(removed),
               "seconds": time.perf_counter() - started}
    write_bytes(stage(config, "components.json"), json.dumps(summary).encode())
    return summary


# ----------------------------------------------------------------------------- 4. mixture
@dataclasses.dataclass(frozen=True)
class Kept:
    """One input file's documents after dedup and language ID."""

    rows: np.ndarray  # row index in the file's stage files
    lang: list[str]
    source: list[str]
    tokens: np.ndarray


def kept_documents(config: PrepareConfig, split: int, meta: dict) -> tuple[Kept, dict]:
    """The kept documents of one file, and its count per stage and language."""
    n = len(meta["record"])
    langs = np.array(meta["summary"]["langs"] or [""])[meta["lang"]] if n else np.zeros(0, str)
    if config.dedup:
        removed = load_npz(stage(config, f"removed-{split:05d}.npz"))
        exact_kept = ~np.isin(np.arange(n), removed["exact_removed"])
        near_kept = ~np.isin(np.arange(n), removed["removed"])
    else:
        exact_kept = near_kept = np.ones(n, bool)
    language_kept = near_kept & (meta["tokens"] > 0)
    counts = {stage_: {lang: int(np.sum(mask & (langs == lang))) for lang in np.unique(langs).tolist()}
              for stage_, mask in (("cleaned", np.ones(n, bool)), ("exact_dedup", exact_kept),
                                   ("near_dedup", near_kept), ("language_kept", language_kept))}
    rows = np.flatnonzero(language_kept)
    sources = np.array(meta["summary"]["sources"] or [""])[meta["source"][rows]]
    return Kept(rows, langs[rows].tolist(), sources.tolist(), meta["tokens"][rows]), counts


def language_totals(config: PrepareConfig, split: int) -> dict:
    """Tokens and source-weighted tokens per language of one file's kept documents, and its
    stage counts."""
    meta = load_meta(config, split)
    kept, counts = kept_documents(config, split, meta)
    weights = dict(config.source_weights)
    totals: dict = {}
    for lang, source, tokens in zip(kept.lang, kept.source, kept.tokens.tolist()):
        entry = totals.setdefault(lang, [0, 0.0])
        entry[0] += tokens
        entry[1] += weights.get(source, 1.0) * tokens
    return {"totals": totals, "counts": counts}


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


def emitted(config: PrepareConfig, split: int, kept: Kept, factors: dict) -> tuple[np.ndarray, np.ndarray]:
    """(kept-document index, shard) per emitted copy of one file's kept documents."""
    weights = dict(config.source_weights)
    x = np.array([weights.get(s, 1.0) * factors[lang] for lang, s in zip(kept.lang, kept.source)])
    ids = make_ids(split, kept.rows)
    u = uniform(draw(config.seed, 0, ids)) if len(ids) else np.zeros(0)
    copies = (np.floor(x) + (u < x - np.floor(x))).astype(np.int64) if len(x) else np.zeros(0, np.int64)
    doc = np.repeat(np.arange(len(ids)), copies)
    copy = np.arange(len(doc)) - np.repeat(np.cumsum(copies) - copies, copies)
    shard = (draw(config.seed, 1, ids[doc], copy) % np.uint64(config.num_shards)).astype(np.int64)
    return doc, shard


def plan_split(config: PrepareConfig, split: int, factors: dict) -> dict:
    """Tokens per shard, and documents and tokens emitted per language and source, of one file."""
    meta = load_meta(config, split)
    kept, _ = kept_documents(config, split, meta)
    doc, shard = emitted(config, split, kept, factors)
    tokens = kept.tokens[doc]
    out = {"shard_tokens": np.bincount(shard, tokens, config.num_shards).astype(np.int64).tolist(),
           "languages": {}, "sources": {}}
    for key, names in (("languages", kept.lang), ("sources", kept.source)):
        for i, t in zip(doc.tolist(), tokens.tolist()):
            entry = out[key].setdefault(names[i], {"documents": 0, "tokens": 0})
            entry["documents"] += 1
            entry["tokens"] += t
    return out


# ----------------------------------------------------------------------------- 5. pack
def shard_entry(name: str, data: bytes, sequences: int) -> dict:
    # crc32c as GCS reports it (base64, big-endian), so a stream can check an object unread.
    crc32c = base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()
    return {"name": name, "sequences": sequences, "sha256": hashlib.sha256(data).hexdigest(), "crc32c": crc32c}


def pack_shard(config: PrepareConfig, num_splits: int, factors: dict, dtype: str, shard: int,
               validation_records: int) -> dict:
    """Train shard `shard`: its copies shuffled, concatenated and cut; its last
    `validation_records` records go to a validation part."""
    started = time.perf_counter()
    dtype = np.dtype(dtype)
    pieces = []  # token arrays in (file, document, copy) order, shuffled below
    for split in range(num_splits):
        meta = load_meta(config, split)
        kept, _ = kept_documents(config, split, meta)
        doc, where = emitted(config, split, kept, factors)
        rows = kept.rows[doc[where == shard]]
        offsets = meta["token_offsets"] * dtype.itemsize
        unique = np.unique(rows)
        data = read_ranges(stage(config, f"map-{split:05d}.tokens"),
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
              "seconds": time.perf_counter() - started}
    write_bytes(stage(config, f"pack-{shard:05d}.json"), json.dumps(result).encode())
    return result


def validation_shard(config: PrepareConfig, sequences: int) -> dict:
    """The validation parts of the train shards, in shard order, as one shard."""
    data = b"".join(read_bytes(stage(config, f"validation-{s:05d}.bin")) for s in range(config.num_shards))
    name = "validation-00000-of-00001.bin"
    write_bytes(join(config.output, name), data)
    return shard_entry(name, data, sequences)


# ----------------------------------------------------------------------------- the driver
def _settings(config: PrepareConfig, files: list[str], tokenizer: Tokenizer) -> dict:
    """Everything that shapes the output: a rerun with equal settings writes the same bytes."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ENGINE_ONLY}
    settings["languages"] = {lang: share for lang, share in config.languages}
    settings["source_weights"] = dict(config.source_weights)
    settings["tokenizer_sha256"] = hashlib.sha256(tokenizer.model_bytes).hexdigest()
    settings["input_files"] = [{"path": f, "bytes": file_size(f)} for f in files]
    return json.loads(json.dumps(settings))  # as read back from _run.json: lists, not tuples


def _claim_output(output: str, settings: dict) -> dict | None:
    """The finished manifest if this exact run is done; refuse an output holding another run."""
    # The claim is exclusive (link / if_generation_match=0): of two runs started at once into
    # one output, the second reads the first's settings and resumes with it or is refused.
    write_bytes(join(output, RUN_FILE), json.dumps(settings, indent=1).encode(), exclusive=True)
    for name in (MANIFEST, RUN_FILE):
        previous = read_json(join(output, name))
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


def connect_ray(config: PrepareConfig) -> None:
    """Joins --ray_address, or starts a local Ray; a process already connected stays so."""
    import ray

    if ray.is_initialized():
        return
    if config.ray_address:
        ray.init(address=config.ray_address, log_to_driver=False, logging_level="WARNING")
    else:
        # address="local": a new instance even when another Ray runs on this machine. Stage
        # outputs are files, not objects: a small object store is enough.
        ray.init(address="local", num_cpus=config.num_cpus or os.cpu_count(), include_dashboard=False,
                 object_store_memory=256 << 20, log_to_driver=False, logging_level="WARNING",
                 _node_ip_address="127.0.0.1")


def task_environment() -> dict:
    """What a task needs of the driver's environment: this repository on the path (on a cluster,
    the same checkout at the same path on every host: tasks import data.py and its neighbours by
    name), and a storage emulator if one is set."""
    env = {"PYTHONPATH": REPO}
    if "STORAGE_EMULATOR_HOST" in os.environ:
        env["STORAGE_EMULATOR_HOST"] = os.environ["STORAGE_EMULATOR_HOST"]
    return env


def run_stage(name: str, function, calls: list[tuple], sizes: list[int] | None = None,
              unit: str = "task") -> list:
    """Runs function(*args) for each call as Ray tasks (retried if a worker dies), with a
    progress bar; returns the results in call order. A task's own error is raised here as is."""
    import ray

    # SPREAD: every node reads and writes its share of files from the start, instead of the
    # head taking tasks until it is busy.
    task = ray.remote(max_retries=5)(function).options(runtime_env={"env_vars": task_environment()},
                                                         scheduling_strategy="SPREAD")
    futures = [task.remote(*args) for args in calls]
    position = {f: i for i, f in enumerate(futures)}
    results: list = [None] * len(futures)
    sizes = sizes or [1] * len(calls)
    scale = unit == "B"
    with tqdm(total=sum(sizes), desc=name, unit=unit, unit_scale=scale, disable=None) as bar:
        pending = list(futures)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            i = position[done[0]]
            try:
                results[i] = ray.get(done[0])
            except ray.exceptions.RayTaskError as e:
                raise (e.cause if isinstance(e.cause, Exception) else e) from None
            bar.update(sizes[i])
    return results


def prepare(config: PrepareConfig) -> dict:
    """Runs the pipeline of the module docstring; returns the manifest (also in OUTPUT)."""
    start = time.time()
    check_config(config)
    files = expand_inputs(config.inputs)
    tokenizer = Tokenizer.load(config.tokenizer)
    settings = _settings(config, files, tokenizer)
    finished = _claim_output(config.output, settings)
    if finished is not None:
        print(f"{config.output} already holds this run's shards and manifest: nothing to do")
        return finished
    connect_ray(config)
    import ray

    walls: dict = {}
    tokenizer_ref = ray.put(tokenizer.model_bytes)

    # 1. map: the files without a finished metadata file.
    t = time.time()
    todo = [k for k in range(len(files)) if file_size(stage(config, f"map-{k:05d}.meta.npz")) is None]
    run_stage("map", map_split, [(config, tokenizer_ref, k, files[k]) for k in todo],
              [settings["input_files"][k]["bytes"] or 1 for k in todo], unit="B")
    summaries = [load_meta(config, k)["summary"] for k in range(len(files))]
    walls["map"] = time.time() - t
    bad = sum(s["bad"] for s in summaries)
    records = sum(s["read"] for s in summaries) + bad
    if bad and bad > config.max_bad_fraction * records:
        examples = "; ".join(e for s in summaries for e in s["bad_examples"])
        raise ValueError(f"{bad} of {records} records are malformed, more than "
                         f"--max_bad_fraction={config.max_bad_fraction}: {examples}")

    # 2-3. dedup and components.
    seconds = {k: sum(s["seconds"][k] for s in summaries) for k in summaries[0]["seconds"]}
    if config.dedup and file_size(stage(config, "components.json")) is None:
        t = time.time()
        parts = [p for p in range(config.num_partitions)
                 if file_size(stage(config, f"dedup-{p:05d}-of-{config.num_partitions:05d}.npz")) is None]
        dedup = run_stage("dedup", dedup_partition, [(config, len(files), p) for p in parts])
        seconds["dedup"] = sum(d["seconds"] for d in dedup)
        walls["dedup"] = time.time() - t
        t = time.time()
        seconds["components"] = run_stage("components", components, [(config, len(files))])[0]["seconds"]
        walls["components"] = time.time() - t

    # 4. mixture.
    t = time.time()
    stats = run_stage("mixture", language_totals, [(config, k) for k in range(len(files))])
    totals: dict = {}
    counts = dict.fromkeys(STAGES, 0)
    counts["read"] = records - bad
    by_language: dict = {s: {} for s in STAGES[1:]}
    for entry in stats:
        for lang, (tokens, weighted) in entry["totals"].items():
            into = totals.setdefault(lang, [0, 0.0])
            into[0] += tokens
            into[1] += weighted
        for stage_, per in entry["counts"].items():
            for lang, c in per.items():
                by_language[stage_][lang] = by_language[stage_].get(lang, 0) + c
                counts[stage_] += c
    if not totals:
        raise ValueError(f"no document survived the filters (counts: {counts}); check --languages "
                         "and the cleaning thresholds")
    factors = mixture_factors(config, totals)
    plans = run_stage("plan", plan_split, [(config, k, factors) for k in range(len(files))])
    walls["mixture"] = time.time() - t

    # 5. pack: the validation records spread over the shards' tails, in proportion.
    record_len = config.seq_len + 1
    per_shard = np.sum([p["shard_tokens"] for p in plans], axis=0) // record_len
    n = int(per_shard.sum())
    n_val = max(1, round(config.validation_fraction * n)) if config.validation_fraction > 0 and n > 1 else 0
    val = per_shard * n_val // max(n, 1)
    for s in np.argsort(-(per_shard - val), kind="stable")[: n_val - int(val.sum())]:
        val[s] += 1
    if (per_shard - val).min() < 1:
        raise ValueError(f"the corpus packs into {n} records of {record_len} tokens ({n_val} held out "
                         f"for validation), too few to fill --num_shards={config.num_shards} shards: "
                         "lower --num_shards or --seq_len, or add data")
    t = time.time()
    dtype = token_dtype(tokenizer.vocab_size).str
    record_bytes = record_len * np.dtype(dtype).itemsize
    shards: list = [read_json(stage(config, f"pack-{s:05d}.json")) for s in range(config.num_shards)]
    todo = [s for s, r in enumerate(shards) if r is None or file_size(
        join(config.output, r["entry"]["name"])) != r["entry"]["sequences"] * record_bytes]
    for s, result in zip(todo, run_stage("pack", pack_shard, [
            (config, len(files), factors, dtype, s, int(val[s])) for s in todo])):
        shards[s] = result
    validation = ([run_stage("validation", validation_shard, [(config, n_val)])[0]] if n_val else [])
    seconds["pack"] = sum(r["seconds"] for r in shards)
    walls["pack"] = time.time() - t

    def merged(key):
        out: dict = {}
        for plan in plans:
            for name, entry in plan[key].items():
                into = out.setdefault(name, {"documents": 0, "tokens": 0})
                into["documents"] += entry["documents"]
                into["tokens"] += entry["tokens"]
        return dict(sorted(out.items()))

    manifest = {
        "seq_len": config.seq_len,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype,
        "tokenizer": settings["tokenizer_sha256"],
        "shards": [r["entry"] for r in shards],
        "sequences": int(n - n_val),
        "tokens": int((n - n_val) * record_len),
        "documents": counts,
        "languages": merged("languages"),
        "sources": merged("sources"),
        "settings": settings,
        "record_len": record_len,
        "block_records": config.block_records,
        "bad_records": bad,
        "dropped_tail_tokens": sum(r["dropped_tail_tokens"] for r in shards),
        "validation": {"shards": validation, "sequences": int(n_val), "tokens": int(n_val * record_len)},
        "documents_by_language": {s: dict(sorted(v.items())) for s, v in by_language.items()},
        "input_bytes": sum(s["input_bytes"] for s in summaries),
        "stage_cpu_seconds": {k: round(v, 3) for k, v in seconds.items()},
        "stage_wall_seconds": {k: round(v, 3) for k, v in walls.items()},
        "wall_seconds": round(time.time() - start, 3),
    }
    write_bytes(join(config.output, MANIFEST), json.dumps(manifest, indent=1).encode())
    print(summary_table(manifest))
    return manifest


def summary_table(manifest: dict) -> str:
    """Documents per stage and language, tokens, shards, throughput."""
    languages = sorted({lang for stage_ in manifest["documents_by_language"].values() for lang in stage_})
    shown = [lang for lang in languages if lang in manifest["languages"]] or languages[:4]
    header = f"{'stage':<14}{'documents':>12}" + "".join(f"{lang:>10}" for lang in shown)
    lines = [header, "-" * len(header)]
    for stage_, count in manifest["documents"].items():
        per = manifest["documents_by_language"].get(stage_, {})
        lines.append(f"{stage_:<14}{count:>12,}" + "".join(
            f"{per.get(lang, 0):>10,}" if stage_ != "read" else f"{'':>10}" for lang in shown))
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


# ----------------------------------------------------------------------------- CLI
def define_flags() -> None:
    flags.DEFINE_list("input", None, "Input files: paths, globs or gs:// globs of .jsonl[.gz|.zst] "
                      "(field 'text', optional 'lang', 'source'), .parquet (same columns), "
                      ".txt[.gz|.zst] (a document is a run of lines ended by a blank line), or code "
                      "files (.py, .js, ...: one document each); hf:NAME[:CONFIG]:SPLIT streams a "
                      "Hugging Face dataset (online).")
    flags.DEFINE_string("output", None, "Output directory or gs://bucket/prefix for shards + manifest.json "
                        "(stage files go to OUTPUT/_stages).")
    flags.DEFINE_string("tokenizer", None, "SentencePiece .model (tokenizer.py).")
    flags.DEFINE_integer("seq_len", 2048, "Model context; records hold seq_len + 1 tokens.")
    flags.DEFINE_integer("num_shards", 8, "Train shard files (one pack task each).")
    flags.DEFINE_string("languages", "en:0.7,fr:0.3", "Languages kept, with target token shares "
                        "(en:0.7,fr:0.3,code:0.05) or without (en,fr: natural shares); 'code' is code.")
    flags.DEFINE_string("source_weights", "", "Per-source sampling weights, e.g. wiki:2,oscar:0.5 "
                        "(default 1); the source is the 'source' field or the file name.")
    flags.DEFINE_list("code_sources", [], "Sources that hold code (like records with lang 'code'): no "
                      "language ID, the code cleaning rule, encoded <s><|code|> ... <|endcode|></s>.")
    flags.DEFINE_integer("min_chars", 100, "Drop documents shorter than this (characters).")
    flags.DEFINE_integer("max_chars", 500_000, "Drop documents longer than this (characters).")
    flags.DEFINE_float("min_alnum", 0.70, "Drop prose whose letters+digits are a smaller share "
                       "of its non-whitespace characters.")
    flags.DEFINE_float("min_code_alnum", 0.25, "The same for code (StarCoder's threshold), which also "
                       "needs lines of at most 1,000 characters and 100 on average.")
    flags.DEFINE_boolean("dedup", True, "Exact (sha256) and near (MinHash LSH) deduplication, corpus-wide.")
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
    flags.DEFINE_integer("num_cpus", 0, "CPUs of the local Ray this command starts (0: every core).")
    flags.DEFINE_string("ray_address", None, "Join this Ray cluster instead (auto, or HOST:PORT of "
                        "its head; scripts/tpu.sh starts one on a TPU VM's hosts).")
    flags.DEFINE_integer("num_partitions", 16, "Dedup tasks (key ranges); changes no output byte.")


def config_from_flags(argv: Sequence[str]) -> PrepareConfig:
    FLAGS = flags.FLAGS
    if len(argv) != 2 or argv[1] != "prepare":
        raise ValueError(f"expected the command `prepare`, got {' '.join(argv[1:]) or 'none'} "
                         "(python data.py prepare --input=... --output=... --tokenizer=...)")
    for name in ("input", "output", "tokenizer"):
        if not FLAGS[name].value:
            raise ValueError(f"--{name} is required (see --help)")
    if not os.path.isfile(FLAGS.tokenizer) and not is_gcs(FLAGS.tokenizer):
        raise FileNotFoundError(f"--tokenizer={FLAGS.tokenizer}: no such file")
    return PrepareConfig(
        inputs=tuple(FLAGS.input), output=FLAGS.output, tokenizer=FLAGS.tokenizer,
        seq_len=FLAGS.seq_len, num_shards=FLAGS.num_shards,
        languages=parse_languages(FLAGS.languages),
        source_weights=parse_source_weights(FLAGS.source_weights),
        code_sources=tuple(FLAGS.code_sources), min_chars=FLAGS.min_chars, max_chars=FLAGS.max_chars,
        min_alnum=FLAGS.min_alnum, min_code_alnum=FLAGS.min_code_alnum, dedup=FLAGS.dedup,
        num_perm=FLAGS.num_perm, near_dup_threshold=FLAGS.near_dup_threshold,
        language_id=FLAGS.language_id, min_language_confidence=FLAGS.min_language_confidence,
        validation_fraction=FLAGS.validation_fraction, block_records=FLAGS.block_records,
        seed=FLAGS.seed, max_bad_fraction=FLAGS.max_bad_fraction, num_cpus=FLAGS.num_cpus,
        ray_address=FLAGS.ray_address, num_partitions=FLAGS.num_partitions)


def fail(message: str) -> None:
    """A usage error: one line, exit status 2."""
    print(f"data.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    if any(arg in ("-h", "-?", "--help", "--helpshort") for arg in argv[1:]):
        print(f"{USAGE}\n\n{flags.FLAGS.module_help(__name__)}")  # this file's flags, not absl's
        sys.exit(0)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(str(e))


def main(argv: Sequence[str]) -> None:
    try:
        prepare(config_from_flags(argv))
    except (ValueError, FileNotFoundError) as e:  # bad flags or inputs: say which, no traceback
        fail(str(e))


if __name__ == "__main__":
    # Ray workers find task functions by module name: run them from `data`, not `__main__`.
    import data

    data.define_flags()
    app.run(data.main, flags_parser=data.parse_flags)
