"""Stages 5 and 6 of data.py's corpus pipeline, on what the encode stage kept: the mixture decides
how many copies of each kept document the output holds and which shard gets each copy, so that
every (source, language) group comes within one document of its target (--source_tokens, or the
--languages shares and --source_weights: docs/data.md, the stages); the pack tasks write those
copies into the train and validation shards. A step of its own because only here, after dedup,
language ID and tokenization of the survivors, are the exact token counts known; and every
decision is a draw of (seed, document id) or a threshold found from per-split histograms, so no
task or driver holds per-document state for the whole corpus and no output byte depends on how
the corpus was cut into tasks. The ids and stage files it reads are stages.py's, its settings
prepare_config.py's."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import time

import google_crc32c
import numpy as np
from absl import logging

from prepare_config import PrepareConfig
from stages import load_encoded, load_meta, make_ids, removed_rows, stage
from storage import file_size, join, read_bytes, read_ranges, write_bytes


# ----------------------------------------------------------------------------- draws
def document_ids(base: tuple[int, int], rows: np.ndarray) -> np.ndarray:
    """The ids the draws of (seed, id) use: the file index above the document's row in the whole
    file. `base`: (file, rows of the file's earlier splits), from stages.split_bases; the same
    values whatever the split size, hence the same output bytes."""
    return make_ids(base[0], base[1] + rows)


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
    splits), from stages.split_bases."""
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
    """Per-language factor f_l: a group (s, l) is to hold weight_s * f_l times its tokens;
    natural shares unless a share is given."""
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


def mixture_report(config: PrepareConfig, available: dict, targets: dict, plans: list[dict]) -> dict:
    """The manifest's `languages` and `sources`: per language and per source, the documents and
    tokens written (every copy, before packing cuts the shards' tails), the tokens available after
    dedup and language ID; per source also its target (None without one), its epochs (written over
    available) and, when it holds less than its target and is not repeated (--short_sources=report),
    by how many tokens it falls short; per source and language, tokens available and written."""
    written: dict = {}
    for plan in plans:
        for group, (documents_, tokens) in plan["groups"].items():
            into = written.setdefault(group, [0, 0])
            into[0] += documents_
            into[1] += tokens
    targets_by_source = dict(config.source_tokens)
    languages: dict = {}
    sources: dict = {}
    for (source, lang), (tokens, documents_) in sorted(available.items()):
        done_documents, done_tokens = written.get((source, lang), (0, 0))
        for into, name in ((languages, lang), (sources, source)):
            entry = into.setdefault(name, {"documents": 0, "tokens": 0, "available_documents": 0,
                                           "available_tokens": 0})
            entry["documents"] += done_documents
            entry["tokens"] += done_tokens
            entry["available_documents"] += documents_
            entry["available_tokens"] += tokens
        sources[source].setdefault("languages", {})[lang] = {"available_tokens": tokens, "tokens": done_tokens}
    for name, entry in sources.items():
        target = targets_by_source.get(name)
        entry["target_tokens"] = None if target is None else int(round(target))
        entry["epochs"] = round(entry["tokens"] / entry["available_tokens"], 4)
        short = target is not None and config.short_sources == "report" and entry["available_tokens"] < target
        entry["short_tokens"] = int(round(target)) - entry["available_tokens"] if short else 0
    return {"languages": languages, "sources": sources}


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
