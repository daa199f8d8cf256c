"""Supervised fine-tuning on ChatML conversations, with the loss on the assistant's tokens only.

    python sft.py --flagfile=configs/sft_600m.flags --init_from=runs/600m \\
        --train_data=chats.jsonl:0.7,fr.json:0.3 --output_dir=runs/600m-sft

Training is train.py's loop (`train.fit`: checkpoints, resume, preemption, logging) and flags;
the model's shape and tokenizer come from the --init_from checkpoint. Here: the data.

Inputs are JSON arrays or JSONL files, local or gs://, in any of chat_formats.py's shapes
(OpenAI messages, ShareGPT, vigogne, Alpaca, Dolly, seed tasks; `--format=auto` recognises each
record); bad records are counted and skipped within --max_bad_fraction.

Mixing: `--train_data=a.jsonl:0.7,b.json:0.3` gives each file a share of the training
conversations. The mix holds as many conversations as the files together (N); file i contributes
round(share_i * N): whole copies of the file, then a seeded random subset of it without repeats.
Without weights every file is taken once, as is. Weights need not sum to 1 (they are normalised)
and must be given for all files or none.

Rendering is the tokenizer's chat format (`Tokenizer.chat_ids`). Ours is the report's ChatML,
    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{...}<|im_end|>\\n
    <|im_start|>assistant\\n{...}<|im_end|>\\n
preceded by <s>: a conversation is a document, as in pretraining and in `generate.py --chat`.
Control tokens are inserted by id; text, whatever it contains, goes through SentencePiece, which
never emits them. A Hugging Face model's tokenizer renders with its own chat template (Llama 3's
<|start_header_id|>role<|end_header_id|>\\n\\n{...}<|eot_id|>, for example), as transformers does.
The loss mask is 1 on each assistant message's reply tokens and on the end-of-turn token that
closes it (<|im_end|>, <|eot_id|>: so the model learns to stop), 0 on system and user turns, role
headers and newlines; with a template, an assistant turn is found by rendering the conversation
prefix by prefix (Tokenizer.chat_turns).

Packing: conversations are packed into rows of seq_len + 1 tokens by best-fit decreasing, each
with its own segment id (1, 2, ... per row; padding is 0), so attention stays within a
conversation and positions restart (model.py). `packing=False` puts one conversation per row.
A conversation longer than a row is cut after its last assistant turn that fits, or dropped if
its first assistant turn does not fit (`overlong="drop"` drops every one): a cut never leaves
part of an assistant turn. Both are counted and reported.

Batches (`ChatBatches`): the batch of step s is a pure function of (seed, s): epoch e visits the
packed rows in a permutation seeded by (seed, e), as stream.py does for pretraining records.

Prepared once (prepared.py): rendering runs over --prepare_workers processes (the same rows as
one), and the packed rows are cached in --prepared_dir (default OUTPUT_DIR/prepared), keyed by
the inputs, the tokenizer and these settings, so a resumed or repeated run loads them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import threading
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
from absl import flags
from jaxtyping import Bool, Int

import budget
import checkpoint
import cli
import parallel
import prepared
import resume
import stream
import train
import train_step
from chat_formats import FORMATS, FileStats, load_conversations, stats_table
from model import ModelConfig
from tokenizer import DEFAULT_SYSTEM, PAD_ID, Tokenizer

OVERLONG = ("truncate", "drop")


# --------------------------------------------------------------------------------------------
# Rendering and the loss mask.


@dataclasses.dataclass(frozen=True)
class Example:
    """One rendered conversation: token ids and the loss mask over them (1 = predict this token)."""
    ids: Int[np.ndarray, " length"]
    mask: Bool[np.ndarray, " length"]


def render(tokenizer: Tokenizer, messages: Sequence[dict], max_tokens: int | None = None,
           overlong: str = "truncate") -> tuple[Example | None, str]:
    """(example, status): status "ok", "truncated" (cut after the last assistant turn that fits
    in `max_tokens`) or "dropped" (example None: no assistant turn fits, or overlong="drop").
    The mask is 1 on each assistant turn's reply and end-of-turn token (Tokenizer.chat_turns)."""
    ids, turns = tokenizer.chat_turns(messages)
    mask = np.zeros(len(ids), bool)
    for start, stop, _ in turns:
        mask[start:stop] = True
    keep = len(ids)
    if max_tokens is not None and keep > max_tokens:
        fitting = [end for _, _, end in turns if end <= max_tokens]
        if overlong == "drop" or not fitting:
            return None, "dropped"
        keep = fitting[-1]
    example = Example(np.asarray(ids[:keep], np.int32), mask[:keep])
    return example, ("ok" if keep == len(ids) else "truncated")


# --------------------------------------------------------------------------------------------
# Mixing several files.


def parse_data_spec(spec: str) -> tuple[str, float | None]:
    """"path" or "path:weight" (a gs:// path keeps its scheme's colon)."""
    path, sep, weight = spec.rpartition(":")
    if sep and "/" not in weight:
        try:
            value = float(weight)
        except ValueError:
            raise ValueError(f"--train_data entry {spec!r}: expected PATH or PATH:WEIGHT with a "
                             f"numeric weight, got {weight!r}") from None
        if not value > 0:
            raise ValueError(f"--train_data entry {spec!r}: the weight must be positive")
        return path, value
    return spec, None


def mix(per_file: Sequence[Sequence[Example]], weights: Sequence[float | None], seed: int
        ) -> list[list[int]]:
    """Indices into each file's examples making up the training mix (see the module docstring)."""
    sizes = [len(examples) for examples in per_file]
    if all(w is None for w in weights):
        return [list(range(n)) for n in sizes]
    if any(w is None for w in weights):
        raise ValueError("--train_data: give a weight to every file or to none")
    total, share = sum(sizes), np.asarray(weights, float) / sum(weights)
    chosen = []
    for i, (n, p) in enumerate(zip(sizes, share)):
        count = int(round(p * total))
        if count and not n:
            raise ValueError(f"--train_data file number {i + 1} has weight {weights[i]} but no "
                             "usable conversation")
        repeats, rest = divmod(count, n) if n else (0, 0)
        extra = np.random.default_rng([seed, i]).choice(n, rest, replace=False) if rest else []
        chosen.append([*range(n)] * repeats + sorted(int(j) for j in extra))
    return chosen


# --------------------------------------------------------------------------------------------
# Packing.


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """Rows of seq_len + 1 tokens, each holding whole conversations.

    segment_ids number the conversations of a row 1, 2, ...; padding is segment 0 with mask 0.
    """
    tokens: Int[np.ndarray, "rows length"]
    segment_ids: Int[np.ndarray, "rows length"]
    mask: Bool[np.ndarray, "rows length"]

    @property
    def num_rows(self) -> int:
        return len(self.tokens)

    @property
    def supervised_tokens(self) -> int:
        return int(self.mask.sum())


def best_fit(sizes: Sequence[int], length: int) -> list[list[int]]:
    """Best-fit decreasing: the indices of `sizes` each row of `length` holds, in filling order."""
    rows: list[list[int]] = []
    by_space: list[list[int]] = [[] for _ in range(length + 1)]  # open rows by tokens left
    has_space = np.zeros(length + 1, bool)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        fits = np.flatnonzero(has_space[sizes[i]:])
        if fits.size:  # the fullest row that still fits: rows fill up
            space = sizes[i] + int(fits[0])
            row = by_space[space].pop()
            has_space[space] = bool(by_space[space])
        else:
            row, space = len(rows), length
            rows.append([])
        rows[row].append(i)
        by_space[space - sizes[i]].append(row)
        has_space[space - sizes[i]] = True
    return rows


def pack(examples: Sequence[Example], seq_len: int, packing: bool = True) -> PackedRows:
    """Best-fit decreasing into rows of seq_len + 1 tokens (inputs plus the last target), or one
    example per row if not `packing`. Every example must fit in a row (see `render`)."""
    length = seq_len + 1
    sizes = [len(e.ids) for e in examples]
    if sizes and max(sizes) > length:
        raise ValueError(f"an example of {max(sizes)} tokens exceeds the row of seq_len + 1 = {length}")
    rows = best_fit(sizes, length) if packing else [[i] for i in range(len(examples))]
    # Stored compactly (a 2.5M-conversation mix is ~0.5M rows of 2,049); batches widen to int32.
    largest = max((int(e.ids.max()) for e in examples), default=0)
    tokens = np.full((len(rows), length), PAD_ID, np.uint16 if largest < 2**16 else np.int32)
    segments = np.zeros((len(rows), length), np.uint16)  # a row holds at most `length` segments
    mask = np.zeros((len(rows), length), bool)
    for r, members in enumerate(rows):
        start = 0
        for segment, i in enumerate(members, 1):
            end = start + sizes[i]
            tokens[r, start:end], mask[r, start:end] = examples[i].ids, examples[i].mask
            segments[r, start:end] = segment
            start = end
    return PackedRows(tokens, segments, mask)


# --------------------------------------------------------------------------------------------
# Batches.


class ChatBatches:
    """The batches of a fine-tuning run: step s -> this process's rows, a pure function of (seed, s).

    The global batch of step s is `global_batch_size` rows of an endless sequence in which epoch e
    visits all packed rows in a permutation seeded by (seed, e) (without `shuffle`: every row
    once, in order, then empty rows). It splits into `grad_accum`
    micro-batches of consecutive rows; process p takes the p-th contiguous part (of
    `process_count`) of each micro-batch, concatenated in micro-batch order, so
    `batch[k].reshape(grad_accum, -1, ...)` is this process's slice of each micro-batch.
    """

    def __init__(self, rows: PackedRows, seed: int, global_batch_size: int, grad_accum: int = 1,
                 process_index: int = 0, process_count: int = 1, shuffle: bool = True):
        if rows.num_rows == 0:
            raise ValueError("no packed rows: every conversation was bad, dropped or held out")
        if global_batch_size % (grad_accum * process_count):
            raise ValueError(f"global batch {global_batch_size} does not split into {grad_accum} "
                             f"micro-batches x {cli.plural(process_count, 'process', 'processes')}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        self.rows, self.seed, self.global_batch_size = rows, seed, global_batch_size
        self.grad_accum, self.process_index, self.process_count = grad_accum, process_index, process_count
        self.shuffle = shuffle
        # An epoch's order, drawn once: a step's rows span at most two epochs.
        self.permutation = functools.lru_cache(maxsize=2)(
            lambda epoch: np.random.default_rng([seed, epoch]).permutation(rows.num_rows))

    @property
    def num_rows(self) -> int:
        return self.rows.num_rows

    @property
    def seq_len(self) -> int:
        """Tokens a row feeds the model (rows hold one more: the last target)."""
        return self.rows.tokens.shape[1] - 1

    @property
    def supervised_tokens(self) -> int:
        """Loss-carrying tokens in one epoch."""
        return self.rows.supervised_tokens

    @property
    def num_batches(self) -> int:
        """Batches that cover every row once (the last one partly)."""
        return -(-self.num_rows // self.global_batch_size)

    def epoch(self, step: int) -> float:
        """Epochs seen once the batch of step `step` (counted from 0) has been trained on."""
        return (step + 1) * self.global_batch_size / self.num_rows

    def global_rows(self, step: int) -> Int[np.ndarray, " global_batch"]:
        """Row indices of step `step`'s global batch; without `shuffle`, the rows in order and
        then -1 (an empty row) past the last, for a held-out pass over each row once."""
        n = self.num_rows
        flat = np.arange(step * self.global_batch_size, (step + 1) * self.global_batch_size)
        if not self.shuffle:
            return np.where(flat < n, flat, -1)
        epochs, offsets = np.divmod(flat, n)
        rows = np.empty_like(flat)
        for epoch in np.unique(epochs):
            rows[epochs == epoch] = self.permutation(int(epoch))[offsets[epochs == epoch]]
        return rows

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """tokens int32 [rows, T+1] (inputs tokens[:, :-1], targets tokens[:, 1:]); segment_ids
        int32 [rows, T] of the inputs; weights float32 [rows, T], the loss weight of each target.
        rows = global_batch_size // process_count."""
        parts = self.global_rows(step).reshape(self.grad_accum, self.process_count, -1)
        local = parts[:, self.process_index].reshape(-1)
        return batch_arrays(self.rows, local)

    def iterate(self, start_step: int = 0, prefetch: int = 4) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(step, batch) from start_step on, computed `prefetch` batches ahead on a thread (as
        pretraining's stream), so their assembly overlaps the steps."""
        for step, batch, _ in stream.prefetched(self.batch, start_step, prefetch, "prefetch chat batches",
                                                threading.Event()):
            yield step, batch


def chat_row(seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """One batch row of batch_arrays, abstract: what train_step.compile_step compiles the step for."""
    return {"tokens": jax.ShapeDtypeStruct((seq_len + 1,), np.int32),
            "segment_ids": jax.ShapeDtypeStruct((seq_len,), np.int32),
            "weights": jax.ShapeDtypeStruct((seq_len,), np.float32)}


def batch_arrays(rows: PackedRows, indices: Int[np.ndarray, " n"]) -> dict[str, np.ndarray]:
    """The model's inputs and loss weights for the packed rows `indices` (see ChatBatches.batch);
    index -1 is an empty row (padding, no loss)."""
    real = indices >= 0
    take = lambda a: np.where(real[:, None], a[np.where(real, indices, 0)], 0)
    tokens, segments, mask = take(rows.tokens), take(rows.segment_ids), take(rows.mask).astype(bool)
    # A target counts only inside its input's conversation (a packed row's first token of the
    # next conversation has mask 0 anyway: it is <s>).
    weights = mask[:, 1:] & (segments[:, 1:] == segments[:, :-1])
    return {"tokens": tokens.astype(np.int32), "segment_ids": segments[:, :-1].astype(np.int32),
            "weights": weights.astype(np.float32)}


# --------------------------------------------------------------------------------------------
# Files to packed rows.


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train_data: tuple[str, ...]  # "path" or "path:weight" each
    seq_len: int
    format: str = "auto"
    system_prompt: str = DEFAULT_SYSTEM
    max_bad_fraction: float = 0.0
    packing: bool = True
    overlong: str = "truncate"
    validation_fraction: float = 0.0  # of each file's conversations, held out before mixing
    seed: int = 0

    def __post_init__(self):
        if not self.train_data:
            raise ValueError("--train_data is required: JSON or JSONL files of conversations")
        if self.format not in FORMATS:
            raise ValueError(f"--format={self.format!r}: expected one of {', '.join(FORMATS)}")
        if self.overlong not in OVERLONG:
            raise ValueError(f"--overlong={self.overlong!r}: expected one of {', '.join(OVERLONG)}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"--max_bad_fraction={self.max_bad_fraction} must be in [0, 1]")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"--validation_fraction={self.validation_fraction} must be in [0, 1)")


def render_and_mix(specs: Sequence[str], load: Callable[[str], tuple[list, FileStats]],
                   render_one: Callable[[Tokenizer, object], tuple[object | None, str]], tokenizer: Tokenizer,
                   workers: int, supervised: Callable[[object], int], validation_fraction: float, seed: int
                   ) -> tuple[list, list, list[FileStats]]:
    """SFT's and DPO's data, up to packing: per file (PATH[:WEIGHT]) load its records, render each
    over `workers` processes (prepared.Renderer: the same items in the same order whatever their
    number) as render_one(tokenizer, record) -> (item or None when dropped, status "ok",
    "dropped" or how it was cut), hold out `validation_fraction` of the items by a permutation
    seeded by (seed, file index), then mix the rest by weight.
    Returns (training items, held-out items, per-file stats)."""
    train_parts, held_out, weights, all_stats = [], [], [], []
    with prepared.Renderer(tokenizer, workers) as renderer:
        for file_index, spec in enumerate(specs):
            path, weight = parse_data_spec(spec)
            records, stats = load(path)
            rendered = []
            for item, status in renderer.render(render_one, records, desc=f"render {path}"):
                stats.dropped += status == "dropped"
                stats.truncated += status not in ("ok", "dropped")
                if item is not None:
                    rendered.append(item)
            order = np.random.default_rng([seed, file_index]).permutation(len(rendered))
            count = int(round(validation_fraction * len(rendered)))
            held_out += [rendered[i] for i in sorted(order[:count])]
            train_parts.append([rendered[i] for i in sorted(order[count:])])
            stats.validation = count
            weights.append(weight)
            all_stats.append(stats)
    train = []
    for part, indices, stats in zip(train_parts, mix(train_parts, weights, seed), all_stats):
        stats.mixed = len(indices)
        stats.supervised_tokens = sum(supervised(part[i]) for i in indices)
        train += [part[i] for i in indices]
    return train, held_out, all_stats


def input_identities(specs: Sequence[str]) -> list[dict]:
    """Each PATH[:WEIGHT] with its file's identity (prepared.file_identity), for a cache key."""
    return [{"spec": spec, **prepared.file_identity(parse_data_spec(spec)[0])} for spec in specs]


def cache_parts(config: DataConfig, tokenizer: Tokenizer) -> dict:
    """What the rows of `config` depend on: the prepared-rows cache's key."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "train_data"}
    return prepared.key_parts("sft rows", input_identities(config.train_data), tokenizer.model_bytes, settings)


def prepare(config: DataConfig, tokenizer: Tokenizer, workers: int = 1, cache: prepared.Cache | None = None
            ) -> tuple[PackedRows, PackedRows | None, list[FileStats]]:
    """(training rows, validation rows or None, per-file stats): load, render (over `workers`
    processes), cut or drop overlong conversations, hold out each file's validation share, mix,
    pack; or all of it read back from `cache` when prepared before with the same key."""
    build = functools.partial(_prepare, config, tokenizer, workers)
    if cache is None:
        return build()
    return prepared.cached_rows(cache, cache_parts(config, tokenizer), "prepared rows", PackedRows, build)


def _prepare(config: DataConfig, tokenizer: Tokenizer, workers: int
             ) -> tuple[PackedRows, PackedRows | None, list[FileStats]]:
    load = functools.partial(load_conversations, fmt=config.format, max_bad_fraction=config.max_bad_fraction,
                             default_system=config.system_prompt)
    render_one = functools.partial(render, max_tokens=config.seq_len + 1, overlong=config.overlong)
    train, validation, all_stats = render_and_mix(config.train_data, load, render_one, tokenizer, workers,
                                                  lambda e: int(e.mask.sum()), config.validation_fraction,
                                                  config.seed)
    valid_rows = pack(validation, config.seq_len, config.packing) if validation else None
    return pack(train, config.seq_len, config.packing), valid_rows, all_stats


def summary_table(stats: Sequence[FileStats], rows: PackedRows, overlong: str = "truncate") -> str:
    """One line per file and a total: what was read, skipped, cut and mixed, and why any were dropped."""
    length = rows.tokens.shape[1]
    why = (f"longer than a row of {length:,} tokens (--overlong=drop; --overlong=truncate keeps the turns "
           "that fit)" if overlong == "drop" else
           f"even the first assistant reply ends past a row of {length:,} tokens (--seq_len)")
    text = stats_table(stats, "conversations", "truncated", "supervised tokens", dropped_why=why)
    filled = rows.tokens.size and (rows.segment_ids > 0).sum() / rows.segment_ids.size
    text += (f"\n{rows.num_rows:,} rows of {length:,} tokens, {filled:.1%} filled, "
             f"{rows.supervised_tokens:,} supervised tokens "
             f"({rows.supervised_tokens / max(rows.tokens.size, 1):.1%} of all)")
    return text


# --------------------------------------------------------------------------------------------
# The command line: train.py's loop, flags and checkpoints.

FLAGS = flags.FLAGS
# The report's SFT optimization (design.md); a --flagfile on the command line still wins.
SFT_DEFAULTS = {"learning_rate": 2e-5, "warmup_steps": 1000, "weight_decay": 0.01, "grad_clip": 1.0,
                "eval_every": 200}


def define_flags() -> None:
    """train.py's flags (model, optimization, run, logging) plus SFT's own."""
    train.define_flags()
    prepared.define_flags()
    flags.DEFINE_enum("format", "auto", FORMATS, "Record shape of --train_data (auto: by each record's keys).")
    flags.DEFINE_string("system_prompt", DEFAULT_SYSTEM, "System message of records that bring none.")
    flags.DEFINE_float("max_bad_fraction", 0.01, "Share of a file's records that may be bad (skipped "
                       "and counted); above it the run stops naming them. 0: any bad record fails.",
                       lower_bound=0, upper_bound=1)
    flags.DEFINE_bool("packing", True, "Pack several conversations per row (segment ids keep them "
                      "apart); --nopacking pads one conversation per row.")
    flags.DEFINE_enum("overlong", "truncate", OVERLONG, "A conversation longer than a row: cut after "
                      "its last assistant turn that fits, or drop it.")
    flags.DEFINE_float("epochs", 0.0, "Train this many passes over the packed rows, setting --steps "
                       "(0: use --steps). The report found less than one epoch best.", lower_bound=0)
    flags.DEFINE_float("validation_fraction", 0.02, "Share of each file's conversations held out for "
                       "the held-out loss every --eval_every steps (unless --validation_data is given).",
                       lower_bound=0, upper_bound=1)
    for name, value in SFT_DEFAULTS.items():
        FLAGS.set_default(name, value)


def init_model_config(run: train.RunConfig, from_flags: ModelConfig) -> tuple[ModelConfig, Tokenizer, dict]:
    """The --init_from checkpoint's (or Hugging Face folder's) model with this run's execution
    settings, its tokenizer, and what the run config carries on from it (an import's files); or,
    without --init_from, the flags' model and --tokenizer."""
    if not run.init_from:
        return from_flags, train.load_tokenizer(FLAGS.tokenizer, from_flags.vocab_size), {}
    model_config, tokenizer_bytes, saved = resume.init_from_model(run.init_from, from_flags, set())
    imported = checkpoint.imported_of(saved)
    return (model_config, resume.init_tokenizer(FLAGS.tokenizer, run.init_from, tokenizer_bytes),
            {checkpoint.IMPORTED: imported} if imported else {})


def main(argv):
    del argv
    checkpoint.quiet_logging(FLAGS["verbosity"].present)
    checkpoint.use_compilation_cache(FLAGS.compilation_cache_dir)
    if FLAGS.dry_run and FLAGS.hardware:  # as train.py
        budget.prepare_host(FLAGS.hardware)
    try:
        flag_model, config, run = train.configs_from_flags()
        if not FLAGS.dry_run:
            parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
            parallel.check_batch(config.batch_size, config.grad_accum, jax.device_count())
        model_config, tokenizer, carried = init_model_config(run, flag_model)
        # Rows of --seq_len tokens when given (at most the model's context), else the context.
        seq_len = FLAGS.seq_len if FLAGS["seq_len"].present else model_config.max_seq_len
        if seq_len > model_config.max_seq_len:
            raise ValueError(f"--seq_len={seq_len} exceeds the model's context of {model_config.max_seq_len}")
        if not FLAGS.train_data:
            raise ValueError("--train_data is required: JSON or JSONL conversation files, PATH[:WEIGHT],...")
        held_out = FLAGS.validation_fraction if FLAGS.eval_every and not FLAGS.validation_data else 0.0
        data_config = DataConfig(
            tuple(FLAGS.train_data.split(",")), seq_len, FLAGS.format, FLAGS.system_prompt,
            FLAGS.max_bad_fraction, FLAGS.packing, FLAGS.overlong, held_out, config.seed)
        workers = prepared.workers(FLAGS.prepare_workers)
        cache = None if FLAGS.dry_run else prepared.run_cache(
            run.output_dir, FLAGS.prepared_dir, FLAGS.reuse_prepared, jax.process_index())
        rows, validation_rows, stats = prepare(data_config, tokenizer, workers, cache)
        if FLAGS.eval_every and FLAGS.validation_data:
            validation_rows, _, more = prepare(dataclasses.replace(
                data_config, train_data=tuple(FLAGS.validation_data.split(",")), validation_fraction=0.0),
                tokenizer, workers, cache)
            stats += [dataclasses.replace(s, validation=s.mixed, mixed=0, supervised_tokens=0) for s in more]
        if jax.process_index() == 0:
            print(summary_table(stats, rows, FLAGS.overlong))
        if FLAGS.epochs:
            steps = math.ceil(FLAGS.epochs * rows.num_rows / config.batch_size)
            try:
                config = dataclasses.replace(config, steps=steps)
            except ValueError as e:
                raise ValueError(f"--epochs={FLAGS.epochs:g} of {rows.num_rows:,} rows at --batch_size="
                                 f"{config.batch_size} is {steps} steps: {e}") from None
        if FLAGS.dry_run:  # sizes, memory and budget of this fine-tuning (steps from --epochs)
            return train_step.dry_run(model_config, config, run.fsdp, FLAGS.hardware, FLAGS.assumed_mfu,
                                 FLAGS.peak_tflops, functools.partial(train_step.compile_step, row=chat_row(seq_len)),
                                 workload=budget.Workload(seq_len=seq_len))
        where = dict(process_index=jax.process_index(), process_count=jax.process_count())
        source = ChatBatches(rows, config.seed, config.batch_size, config.grad_accum, **where)
        validation = None
        if validation_rows is not None and run.eval_every:
            validation = ChatBatches(validation_rows, config.seed, config.batch_size, config.grad_accum, shuffle=False,
                                    **where)  # scored in the step's micro-batches
            run = dataclasses.replace(run, eval_batches=validation.num_batches)  # each row once
        sft_settings = {**dataclasses.asdict(data_config), "epochs": FLAGS.epochs,
                        "rows": rows.num_rows, "supervised_tokens_per_epoch": rows.supervised_tokens,
                        "files": [s.to_dict() for s in stats]}
        evaluations = train.evaluators(run, parallel.make_mesh(run.fsdp), validation, tokenizer.model_bytes)
        train.fit(model_config, config, run, source, evaluations, tokenizer.model_bytes,
                  train.resolved_config(model_config, config, run, sft=sft_settings, **carried), title="sft")
    except train.TrainingStopped as e:
        sys.exit(f"sft.py: training stopped: {e}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
