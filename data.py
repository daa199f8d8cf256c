"""The corpus pipeline's driver and command: raw text to packed token shards, in local worker
processes or on a Ray cluster.

    python data.py prepare --input=PATTERN[,PATTERN...] --output=DIR_OR_GS_URI --tokenizer=MODEL \\
        --seq_len=2048 --num_shards=N [--languages=en:0.7,fr:0.3,code:0.05] [--code_sources=stack]
        [--num_cpus=N | --ray_address=auto|HOST:PORT]
    python data.py prepare --flagfile=configs/corpus_report.flags --input=MIRROR --output=... --tokenizer=...

This file turns the flags into a PrepareConfig, checks settings, inputs and tokenizer before any
worker starts, claims the output (OUTPUT/_run.json), hands each stage's tasks to an executor
(executors.py: local processes, or Ray with --ray_address), and writes the manifest and the
end-of-run table. The tasks are stages.py's (map, dedup, components, encode) and mixture.py's
(mixture, pack). docs/data.md (Data pipeline) says what each stage does and what the output
guarantees; input formats are documents.py's, the shard format and the stream train.py reads are
stream.py's.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import os
import time
from collections.abc import Sequence

import numpy as np
from absl import flags

import cli
import documents
import executors
from mixture import (bin_members, boundary_bins, group_targets, group_totals, mixture_report, mixture_thresholds,
                     pack_shard, plan_split, validation_shard)
from prepare_config import (ENGINE_ONLY, PrepareConfig, parse_languages, parse_pairs, parse_source_tokens,
                            parse_source_weights, parse_sources)
from stages import (KEY_INDEX, STAGE_DIR, Split, components, dedup_partition, encode_split, layout, load_meta,
                    map_split, split_bases, stage)
from storage import expand_inputs, file_size, join, read_bytes, read_json, remove, write_bytes
from stream import MANIFEST, token_dtype
from tokenizer import Tokenizer
from tokenizer_files import open_tokenizer, tokenizer_from_bytes

USAGE = """Prepare a corpus: clean, deduplicate (exact and MinHash LSH, corpus-wide), language-ID,
mix and pack raw text into token shards for train.py, in local worker processes (or on the Ray
cluster at --ray_address). Example:
  python data.py prepare --input=samples/*.txt --output=runs/shards --tokenizer=tok.model \\
      --seq_len=128 --num_shards=4 --languages=en:0.7,fr:0.3
See docs/data.md for the stages and guarantees."""

RUN_FILE = "_run.json"
SPLITS_FILE = "splits.json"  # under _stages: the map tasks' inputs, in id order
STAGES = ("read", "cleaned", "exact_dedup", "near_dedup", "language_kept")
VOLATILE_KEYS = ("stage_cpu_seconds", "stage_wall_seconds", "wall_seconds")  # timings only


def input_files(config: PrepareConfig) -> list[tuple[str, str | None]]:
    """(file, source) of every input: --input's patterns (sources from the records or file names),
    or, with --source, each source's patterns under each --input root (a mirror's directory or
    gs:// prefix), each source matching some file and no file two sources."""
    if not config.sources:
        return [(f, None) for f in expand_inputs(config.inputs)]
    out, owner = [], {}
    for name, patterns in config.sources:
        found = []
        for pattern in patterns:
            for root in config.inputs:
                try:
                    found += expand_inputs([pattern if "://" in pattern or os.path.isabs(pattern)
                                            else join(root, pattern)])
                except FileNotFoundError:
                    continue
        if not found:
            raise FileNotFoundError(f"--source={name}={','.join(patterns)}: matches no file under --input="
                                    f"{','.join(config.inputs)}")
        for f in found:
            if owner.setdefault(f, name) != name:
                raise ValueError(f"{f} matches the patterns of two sources, {owner[f]} and {name}")
            out.append((f, name))
    return out


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
    if not config.split_mb > 0:
        problems.append(f"--split_mb={config.split_mb} must be positive")
    if config.language_id_chars < 0:
        problems.append(f"--language_id_chars={config.language_id_chars} must be 0 (all) or positive")
    if config.short_sources not in ("repeat", "report"):
        problems.append(f"--short_sources={config.short_sources}: expected repeat or report")
    if config.source_tokens and any(share is not None for _, share in config.languages):
        problems.append(f"--source_tokens and the shares of --languages={','.join(f'{l}:{s}' for l, s in config.languages)} "
                        "both fix the mixture: name the languages kept without shares (e.g. --languages=en,fr,code)")
    if config.source_tokens and config.source_weights:
        problems.append("--source_tokens and --source_weights both fix the mixture: give one")
    named = [name for name, _ in config.sources]
    if named and config.source_tokens and set(named) != {name for name, _ in config.source_tokens}:
        problems.append(f"--source_tokens names {sorted(n for n, _ in config.source_tokens)} but --source "
                        f"defines {sorted(named)}: give every source a target")
    if problems:
        raise ValueError("; ".join(problems))


# ----------------------------------------------------------------------------- the driver
def _settings(config: PrepareConfig, files: list[tuple[str, str | None]], sizes: list[int],
              tokenizer: Tokenizer) -> dict:
    """Everything that shapes the output: a rerun with equal settings writes the same bytes."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ENGINE_ONLY}
    settings["languages"] = {lang: share for lang, share in config.languages}
    for key in ("source_weights", "source_tokens", "text_fields"):
        settings[key] = dict(getattr(config, key))
    settings["tokenizer_sha256"] = hashlib.sha256(tokenizer.model_bytes).hexdigest()
    settings["input_files"] = [{"path": f, "bytes": size, **({"source": source} if source else {})}
                               for (f, source), size in zip(files, sizes)]
    return json.loads(json.dumps(settings))  # as read back from _run.json: lists, not tuples


def _claim_output(output: str, settings: dict, split_mb: float) -> tuple[bool, dict | None]:
    """Claims the output for this run: (whether this call created the claim, the finished
    manifest if this exact run is done); refuses an output holding another run."""
    # The claim is exclusive (link / if_generation_match=0): of two runs started at once into
    # one output, the second reads the first's settings and resumes with it or is refused. The
    # split size changes no output byte, but a partial run's stage files are numbered by its
    # splits: it resumes with the same --split_mb only.
    claim = dict(settings, split_mb=split_mb)
    try:
        claimed = write_bytes(join(output, RUN_FILE), json.dumps(claim, indent=1).encode(), exclusive=True)
    except OSError as e:
        raise ValueError(f"--output={output}: cannot write there ({e.strerror or e})") from None
    for name, ours in ((MANIFEST, settings), (RUN_FILE, claim)):
        previous = read_json(join(output, name))
        if previous is None:
            continue
        theirs = previous.get("settings", previous)
        if theirs != ours:
            diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            raise ValueError(
                f"--output={output} already holds a {'finished' if name == MANIFEST else 'partial'} "
                f"run with other settings (differing: {', '.join(diff)}): choose another --output "
                "or delete it")
        if name == MANIFEST:
            return claimed, previous
    return claimed, None


def check_inputs(config: PrepareConfig, files: list[tuple[str, str | None]]) -> list[int]:
    """Each input's size, once documents.check_input found it there, readable and of a known
    format, its source's text field there (threads: on gs:// each check is a request or two)."""
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda f: documents.check_input(f[0], layout(config, *f).text_field), files))


def load_tokenizer(path: str) -> Tokenizer:
    """Ours (a SentencePiece .model) or a model's own Hugging Face tokenizer (tokenizer.json, with the
    config files beside it, or their folder); on gs://, the one file."""
    if "://" not in path and (os.path.isdir(path) or path.endswith(".json")):
        try:
            return open_tokenizer(path)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"--tokenizer={path}: {str(e).splitlines()[0]}") from None
    try:
        data = read_bytes(path)
    except (FileNotFoundError, IsADirectoryError):
        raise FileNotFoundError(f"--tokenizer={path}: file not found (expected a SentencePiece .model, "
                                "as tokenizer.py writes, or a Hugging Face tokenizer.json)") from None
    try:
        return tokenizer_from_bytes(data)
    except (RuntimeError, ValueError) as e:  # sentencepiece's parse error, or not one of ours
        raise ValueError(f"--tokenizer={path}: not a julian SentencePiece model or a Hugging Face tokenizer.json "
                         f"({str(e).split(chr(10))[0].strip()})") from None


def open_executor(config: PrepareConfig) -> executors.Executor:
    if config.ray_address:
        return executors.RayExecutor(config.ray_address)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return executors.LocalExecutor(config.num_cpus or cores)


def _release_output(config: PrepareConfig) -> None:
    """Undoes a claim whose run finished no map task: nothing there is worth resuming, and a
    claim left behind would refuse the next run with other inputs."""
    try:
        expand_inputs([stage(config, "map-*.meta.npz")])
        return  # finished map outputs: kept for a rerun of the same command
    except FileNotFoundError:
        pass
    remove(join(config.output, STAGE_DIR))
    remove(join(config.output, RUN_FILE))


def prepare(config: PrepareConfig) -> dict:
    """Runs the pipeline of docs/data.md; returns the manifest (also in OUTPUT). Settings,
    inputs and tokenizer are checked before any worker starts; a run that fails before a map task
    finished leaves nothing in OUTPUT that a next run would have to match."""
    started = time.time()
    check_config(config)
    tokenizer = load_tokenizer(config.tokenizer)
    if (config.code_sources or any(lang == documents.CODE for lang, _ in config.languages)) \
            and not tokenizer.has_code_wrappers:
        print(f"--tokenizer={config.tokenizer} has no <|code|>/<|endcode|> tokens: code documents are "
              "tokenized as text, without the wrappers")
    files = input_files(config)
    sizes = check_inputs(config, files)
    settings = _settings(config, files, sizes, tokenizer)
    claimed, finished = _claim_output(config.output, settings, config.split_mb)
    if finished is not None:
        print(f"{config.output} already holds this run's shards and manifest: nothing to do")
        return finished
    try:
        bands = documents.lsh_bands(config.near_dup_threshold, config.num_perm)
        with open_executor(config) as executor:
            return _pipeline(config, executor, bands, files, tokenizer, settings, started)
    except BaseException:
        if claimed:
            _release_output(config)
        raise


def _pipeline(config: PrepareConfig, executor: executors.Executor, bands: tuple[int, int],
              files: list[tuple[str, str | None]], tokenizer: Tokenizer, settings: dict, started: float) -> dict:
    run = executor.map
    walls: dict = {}

    # 1. map: the splits without a finished metadata file.
    t = time.time()
    split_bytes = max(1, int(config.split_mb * 1e6))
    splits = [Split(k, f, start, end, source) for k, (f, source) in enumerate(files)
              for start, end in documents.byte_ranges(f, settings["input_files"][k]["bytes"], split_bytes,
                                                      layout(config, f, source).book)]
    write_bytes(stage(config, SPLITS_FILE), json.dumps([dataclasses.asdict(s) for s in splits]).encode())
    todo = [i for i in range(len(splits)) if file_size(stage(config, f"map-{i:05d}.meta.npz")) is None]
    sizes = [(s.end if s.end is not None else settings["input_files"][s.file]["bytes"] or 1) - s.start
             for s in splits]
    run("map", map_split, [(config, bands, i, splits[i]) for i in todo], [sizes[i] for i in todo], unit="B")
    summaries = [load_meta(config, i)["summary"] for i in range(len(splits))]
    bases = split_bases(splits, summaries)
    walls["map"] = time.time() - t
    bad = sum(s["bad"] for s in summaries)
    records = sum(s["read"] for s in summaries) + bad
    if bad and bad > config.max_bad_fraction * records:
        examples = "; ".join(itertools.islice((  # the first five, with the file's line numbers
            f"{path}:{unit}{line + lines_before}: {problem}" for s, (_, _, lines_before) in zip(summaries, bases)
            for path, unit, line, problem in s["bad_examples"]), 5))
        raise ValueError(f"{bad} of {records} records are malformed, more than "
                         f"--max_bad_fraction={config.max_bad_fraction}: {examples}")

    # 2-3. dedup and components.
    seconds = {k: sum(s["seconds"][k] for s in summaries) for k in summaries[0]["seconds"]}
    if config.dedup and file_size(stage(config, "components.json")) is None:
        t = time.time()
        parts = [p for p in range(config.num_partitions)
                 if file_size(stage(config, f"dedup-{p:05d}-of-{config.num_partitions:05d}.npz")) is None]
        dedup = run("dedup", dedup_partition, [(config, len(splits), p) for p in parts])
        seconds["dedup"] = sum(d["seconds"] for d in dedup)
        walls["dedup"] = time.time() - t
        t = time.time()
        seconds["components"] = run("components", components, [(config, len(splits))])[0]["seconds"]
        walls["components"] = time.time() - t

    # 4. encode: language ID and tokens of the survivors.
    t = time.time()
    tokenizer_ref = executor.share(tokenizer.model_bytes)
    todo = [i for i in range(len(splits)) if file_size(stage(config, f"encode-{i:05d}.npz")) is None]
    run("encode", encode_split, [(config, tokenizer_ref, i) for i in todo], [sizes[i] for i in todo], unit="B")
    walls["encode"] = time.time() - t

    # 5. mixture: tokens available per (source, language), the targets, the thresholds.
    t = time.time()
    stats = run("mixture", group_totals, [(config, i, bases[i][:2]) for i in range(len(splits))])
    available: dict = {}
    histograms: dict = {}
    counts = dict.fromkeys(STAGES, 0)
    counts["read"] = records - bad
    by_source: dict = {stage_: {} for stage_ in STAGES[1:]}
    by_language: dict = {"near_dedup": {}, "language_kept": {}}
    for entry in stats:
        for key, value in entry["seconds"].items():  # the encode tasks', finished in this run or before
            seconds[key] = seconds.get(key, 0.0) + value
        for group, (tokens, documents_, histogram) in entry["groups"].items():
            into = available.setdefault(group, [0, 0])
            into[0] += tokens
            into[1] += documents_
            histograms[group] = histograms.get(group, 0) + histogram
        for into, key in ((by_source, "by_source"), (by_language, "by_language")):
            for stage_, per in entry["counts"][key].items():
                for name, c in per.items():
                    into[stage_][name] = into[stage_].get(name, 0) + c
    counts.update({stage_: sum(per.values()) for stage_, per in by_source.items()})
    if not available:
        raise ValueError(f"no document survived the filters (counts: {counts}); check --languages "
                         "and the cleaning thresholds")
    unknown = sorted({name for name, _ in config.source_tokens} - {s for s, _ in available})
    if unknown:
        raise ValueError(f"--source_tokens names sources that hold no kept document: {', '.join(unknown)} "
                         f"(sources found: {', '.join(sorted({s for s, _ in available}))})")
    tokens_available = {g: a[0] for g, a in available.items()}
    targets = group_targets(config, tokens_available)
    bins = boundary_bins(targets, tokens_available, histograms)
    members = run("thresholds", bin_members, [(config, i, bases[i][:2], bins) for i in range(len(splits))])
    mixture = mixture_thresholds(bins, members)
    plans = run("plan", plan_split, [(config, i, bases[i][:2], mixture) for i in range(len(splits))])
    walls["mixture"] = time.time() - t

    # 6. pack: the validation records spread over the shards' tails, in proportion.
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
    for s, result in zip(todo, run("pack", pack_shard, [
            (config, [b[:2] for b in bases], mixture, dtype, s, int(val[s])) for s in todo])):
        shards[s] = result
    validation = ([run("validation", validation_shard, [(config, n_val)])[0]] if n_val else [])
    seconds["pack"] = sum(r["seconds"] for r in shards)
    walls["pack"] = time.time() - t

    manifest = {
        "seq_len": config.seq_len,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype,
        "tokenizer": settings["tokenizer_sha256"],
        "shards": [r["entry"] for r in shards],
        "sequences": int(n - n_val),
        "tokens": int((n - n_val) * record_len),
        "documents": counts,
        **mixture_report(config, available, targets, plans),
        "settings": settings,
        "record_len": record_len,
        "block_records": config.block_records,
        "bad_records": bad,
        "quality_dropped": sum(s["quality_dropped"] for s in summaries),
        "dropped_tail_tokens": sum(r["dropped_tail_tokens"] for r in shards),
        "validation": {"shards": validation, "sequences": int(n_val), "tokens": int(n_val * record_len)},
        "documents_by_source": {s: dict(sorted(v.items())) for s, v in by_source.items()},
        "documents_by_language": {s: dict(sorted(v.items())) for s, v in by_language.items()},
        "input_bytes": sum(s["input_bytes"] for s in summaries),
        "stage_cpu_seconds": {k: round(v, 3) for k, v in seconds.items()},
        "stage_wall_seconds": {k: round(v, 3) for k, v in walls.items()},
        "wall_seconds": round(time.time() - started, 3),
    }
    write_bytes(join(config.output, MANIFEST), json.dumps(manifest, indent=1).encode())
    print(summary_table(manifest))
    return manifest


def summary_table(manifest: dict) -> str:
    """Documents per stage and source, the mixture per source and language, tokens, shards,
    throughput."""
    sources = sorted(manifest["documents_by_source"]["cleaned"])
    header = f"{'stage':<14}{'documents':>12}" + "".join(f"{name[:11]:>12}" for name in sources)
    lines = [header, "-" * len(header)]
    for stage_, count in manifest["documents"].items():
        per = manifest["documents_by_source"].get(stage_, {})
        lines.append(f"{stage_:<14}{count:>12,}" + "".join(
            f"{per.get(name, 0):>12,}" if stage_ != "read" else f"{'':>12}" for name in sources))
    total = max(1, sum(e["tokens"] for e in manifest["sources"].values()))
    header = f"{'tokens':<22}{'target':>16}{'available':>16}{'written':>16}{'share':>7}{'epochs':>8}  short by"
    lines += ["", header, "-" * len(header)]
    for name, entry in manifest["sources"].items():
        target = f"{entry['target_tokens']:,}" if entry["target_tokens"] is not None else "-"
        short = f"{entry['short_tokens']:,}" if entry["short_tokens"] else ""
        lines.append(f"{name[:22]:<22}{target:>16}{entry['available_tokens']:>16,}{entry['tokens']:>16,}"
                     f"{entry['tokens'] / total:>7.1%}{entry['epochs']:>8.2f}  {short}")
        for lang, per in entry["languages"].items():
            lines.append(f"  {lang[:20]:<20}{'':>16}{per['available_tokens']:>16,}{per['tokens']:>16,}"
                         f"{per['tokens'] / total:>7.1%}")
    for lang, entry in manifest["languages"].items():
        lines.append(f"{'all ' + lang:<22}{'':>16}{entry['available_tokens']:>16,}{entry['tokens']:>16,}"
                     f"{entry['tokens'] / total:>7.1%}")
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
                      "Hugging Face dataset (online). With --source: the root directories (or gs:// "
                      "prefixes) of the sources' patterns.")
    flags.DEFINE_multi_string("source", [], "NAME=PATTERN (repeatable): the files of source NAME, a glob under "
                              "each --input root (configs/corpus_report.flags names the report's five).")
    flags.DEFINE_string("text_fields", "", "Per source, the JSONL field or Parquet column holding the text when "
                        "it is not 'text', e.g. oscar:content,stack:content.")
    flags.DEFINE_list("book_sources", [], "Sources whose .txt files are one book each (Project Gutenberg): the "
                      "licence header and footer removed, cut at blank lines into parts of at most --max_chars.")
    flags.DEFINE_list("trusted_language_sources", [], "Sources whose records carry fastText lid.176's own "
                      "answer (OSCAR 2301's metadata.identification, FineWeb-Edu's language_score): used "
                      "instead of running it again.")
    flags.DEFINE_list("drop_quality_warnings", [], "Drop records whose OSCAR metadata.quality_warnings holds "
                      "one of these (tiny, short_sentences, header, footer, noisy).")
    flags.DEFINE_string("source_tokens", "", "Token target per source after dedup and language ID, e.g. "
                        "wikipedia:5.5B,oscar:15B,fineweb_edu:8B,gutenberg:1B,stack:2B (sources without one "
                        "keep their size; --languages then without shares).")
    flags.DEFINE_enum("short_sources", "repeat", ["repeat", "report"], "A source holding fewer tokens than its "
                      "target: repeat its documents to reach it (epochs in the manifest), or write it once "
                      "and report by how much it falls short.")
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
    flags.DEFINE_integer("language_id_chars", documents.LANGUAGE_ID_CHARS, "Language ID reads the first this "
                         "many characters of a document (0: all of it; its cost grows with the text read).")
    flags.DEFINE_float("validation_fraction", 0.005, "Share of records held out for validation "
                       "(at least one when > 0).")
    flags.DEFINE_integer("block_records", 16, "The stream shuffles blocks of this many consecutive "
                         "records (large ranged reads on gs://).")
    flags.DEFINE_integer("seed", 0, "Seed of the mixture's sampling and the document shuffle.")
    flags.DEFINE_float("max_bad_fraction", 0.0, "Skip and count malformed records up to this share "
                       "of all records; 0 fails on the first, naming file and line.")
    flags.DEFINE_integer("num_cpus", 0, "Local worker processes (0: one per core).")
    flags.DEFINE_string("ray_address", None, "Run the tasks on this Ray cluster instead (auto, or HOST:PORT "
                        "of its head; scripts/tpu.sh starts one on a TPU VM's hosts).")
    flags.DEFINE_integer("num_partitions", 16, "Dedup tasks (key ranges); changes no output byte.")
    flags.DEFINE_float("split_mb", 64, "Map tasks read uncompressed .jsonl and .txt files in byte ranges of "
                       "about this many MB (compressed, Parquet and code files whole); changes no output "
                       "byte. 64: ~50 MB of tokens and metadata per task, ~2.5 minutes per task at 0.44 MB/s "
                       "per core, enough tasks to keep a cluster's cores busy, at most one split per core "
                       "lost when a run is killed (docs/data.md: Splits).")


def config_from_flags(argv: Sequence[str]) -> PrepareConfig:
    FLAGS = flags.FLAGS
    if len(argv) != 2 or argv[1] != "prepare":
        raise ValueError(f"expected the command `prepare`, got {' '.join(argv[1:]) or 'none'} "
                         "(python data.py prepare --input=... --output=... --tokenizer=...)")
    for name in ("input", "output", "tokenizer"):
        if not FLAGS[name].value:
            raise ValueError(f"--{name} is required (see --help)")
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
        ray_address=FLAGS.ray_address, num_partitions=FLAGS.num_partitions, split_mb=FLAGS.split_mb,
        language_id_chars=FLAGS.language_id_chars, sources=parse_sources(FLAGS.source),
        text_fields=parse_pairs(FLAGS.text_fields, "text_fields", "oscar:content,stack:content"),
        book_sources=tuple(FLAGS.book_sources), trusted_language_sources=tuple(FLAGS.trusted_language_sources),
        drop_quality_warnings=tuple(FLAGS.drop_quality_warnings),
        source_tokens=parse_source_tokens(FLAGS.source_tokens), short_sources=FLAGS.short_sources)


def main(argv: Sequence[str]) -> None:
    try:
        prepare(config_from_flags(argv))
    except ConnectionError as e:  # Ray's, for --ray_address; cli.run reports it as a usage error
        raise ValueError(f"--ray_address={flags.FLAGS.ray_address}: {e} (a cluster started with token "
                         "authentication, the default, needs RAY_AUTH_MODE=token in this command's "
                         "environment too)") from e


if __name__ == "__main__":
    define_flags()
    cli.run(main, summary=USAGE)
