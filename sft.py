"""Supervised fine-tuning on ChatML conversations, with the loss on the assistant's tokens only.

    python sft.py --flagfile=configs/sft_600m.flags --init_from=runs/600m \\
        --train_data=chats.jsonl:0.7,fr.json:0.3 --output_dir=runs/600m-sft

Training is train.py's loop (`train.fit`: checkpoints, resume, preemption, logging) and flags;
the model's shape and tokenizer come from the --init_from checkpoint. Here: the data.

Inputs are JSON arrays or JSONL files, local or gs://, in any of chat_formats.py's shapes
(OpenAI messages, ShareGPT, vigogne, Alpaca, Dolly, seed tasks; `--format=auto` recognises each
record); bad records are counted and skipped within --max_bad_fraction.

Rendering (the tokenizer's chat format, the loss on each assistant reply and its end-of-turn
token), mixing the files by weight (`--train_data=a.jsonl:0.7,b.json:0.3`), packing into rows
with segment ids (a conversation longer than a row cut after its last assistant turn that fits,
or dropped) and the batch order are chat_data.py's, shared with dpo.py.

Prepared once (prepared.py): rendering runs over --prepare_workers processes (the same rows as
one), and the packed rows are cached in --prepared_dir (default OUTPUT_DIR/prepared), keyed by
the inputs, the tokenizer and these settings, so a resumed or repeated run loads them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Sequence

import jax
from absl import flags

import budget
import checkpoint
import cli
import parallel
import prepared
import train
import train_step
from chat_data import (OVERLONG, ChatBatches, PackedRows, chat_row, init_model_config, input_identities, pack,
                       render, render_and_mix)
from chat_formats import FORMATS, FileStats, load_conversations, stats_table
from tokenizer import DEFAULT_SYSTEM, Tokenizer

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
        model_config, tokenizer, carried = init_model_config(run, flag_model, FLAGS.tokenizer)
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
