"""Fine-tuning data that sft.py and dpo.py share: conversations rendered to tokens and a loss
mask, files mixed by weight, packed rows and the batch order; and the model a fine-tuning run
starts from (--init_from), whose tokenizer renders its rows.

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

Mixing: `--train_data=a.jsonl:0.7,b.json:0.3` gives each file a share of the training
conversations. The mix holds as many conversations as the files together (N); file i contributes
round(share_i * N): whole copies of the file, then a seeded random subset of it without repeats.
Without weights every file is taken once, as is. Weights need not sum to 1 (they are normalised)
and must be given for all files or none.

Packing: conversations are packed into rows of seq_len + 1 tokens by best-fit decreasing, each
with its own segment id (1, 2, ... per row; padding is 0), so attention stays within a
conversation and positions restart (model.py). `packing=False` puts one conversation per row.
A conversation longer than a row is cut after its last assistant turn that fits, or dropped if
its first assistant turn does not fit (`overlong="drop"` drops every one): a cut never leaves
part of an assistant turn. Both are counted and reported.

Batches (`ChatBatches`): the batch of step s is a pure function of (seed, s): epoch e visits the
packed rows in a permutation seeded by (seed, e), as stream.py does for pretraining records.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
from jaxtyping import Bool, Int

import checkpoint
import cli
import prepared
import resume
import stream
import train
from chat_formats import FileStats
from model import ModelConfig
from tokenizer import PAD_ID, Tokenizer

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
# The model a fine-tuning run starts from.


def init_model_config(run: train.RunConfig, from_flags: ModelConfig, tokenizer_path: str | None
                      ) -> tuple[ModelConfig, Tokenizer, dict]:
    """The --init_from checkpoint's (or Hugging Face folder's) model with this run's execution
    settings, its tokenizer, and what the run config carries on from it (an import's files); or,
    without --init_from, the flags' model and --tokenizer (`tokenizer_path`)."""
    if not run.init_from:
        return from_flags, train.load_tokenizer(tokenizer_path, from_flags.vocab_size), {}
    model_config, tokenizer_bytes, saved = resume.init_from_model(run.init_from, from_flags, set())
    imported = checkpoint.imported_of(saved)
    return (model_config, resume.init_tokenizer(tokenizer_path, run.init_from, tokenizer_bytes),
            {checkpoint.IMPORTED: imported} if imported else {})
