"""Direct preference optimization (DPO, or IPO) of a fine-tuned model on chosen/rejected replies.

    python dpo.py --flagfile=configs/dpo_600m.flags --init_from=runs/600m-sft \\
        --train_data=pairs.jsonl --output_dir=runs/600m-dpo

Training is train.py's loop (`train.fit`: checkpoints, resume, preemption, NaN handling,
--fsdp, logging) with this file's loss; the reference model is --init_from's parameters, frozen.
The numbers are TRL's `DPOTrainer`'s (tests/test_dpo.py checks them against TRL itself).

Inputs are JSON arrays or JSONL files, local or gs://, mixed with weights as in sft.py
(`a.jsonl:0.7,b.jsonl:0.3`). `--format=auto` recognises each record by its shape:

    standard        {"prompt": str, "chosen": str, "rejected": str}            TRL's standard form
    conversational  {"prompt": [messages], "chosen": [messages], "rejected": [...]}  TRL's
    hh_rlhf         {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}  transcripts
    ultrafeedback   {"chosen": [..., assistant], "rejected": [..., assistant]}  whole conversations

A standard prompt written as an HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant:") is read
as that conversation. Transcript texts lose their surrounding spaces. A record whose two
prompts differ, whose two replies are identical, or that is otherwise unusable is counted and
skipped; past --max_bad_fraction of a file the run stops, naming the file and the lines.

Rendering is SFT's (chat_data.render): the tokenizer's chat format (ours: <s>, the system
message, the default when the record brings none, ChatML turns, then the reply; a Hugging Face
model's: its chat template). The log-probabilities, and so the loss, cover the reply's tokens and its
end-of-turn token (<|im_end|>, Llama 3's <|eot_id|>) only. An overlong pair keeps the end of its prompt (at most
--max_prompt_length tokens) and then cuts both replies to --max_length in all; both are counted.

Each pair is two rows (chosen, rejected) of --max_length + 1 tokens that go through the model in
one forward pass; with --pack_pairs, pairs share rows of the model's context instead, as segments
(pair_packing.py: the same numbers, fewer padding tokens). The pairs are prepared once (prepared.py: rendered over the host's cores,
cached in --prepared_dir, by default OUTPUT_DIR/prepared, keyed by the inputs, the tokenizer and
the settings). The reference log-probabilities are computed once before training, in a first
pass, and cached there too, keyed by the pairs' key and --init_from's step, so a resumed run
reads them back (--ref_logps=online computes them at every step instead).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Float, Int

import budget
import chat_formats
import checkpoint
import cli
import pair_packing
import parallel
import prepared
import storage
import train
import train_step
from chat_data import ChatBatches, PackedRows, init_model_config, input_identities, render_and_mix
from chat_formats import PAIR_FORMATS, load_pairs
from model import ModelConfig, Transformer, next_token_logps
from pair_packing import PairBatches, PairRows, pair_row, render_pair, to_rows
from tokenizer import DEFAULT_SYSTEM, PAD_ID, Tokenizer

LOSSES = ("sigmoid", "ipo")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")


# --------------------------------------------------------------------------------------------
# Log-probabilities and the losses.


@dataclasses.dataclass(frozen=True)
class LossConfig:
    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"--loss={self.loss!r}: expected one of {', '.join(LOSSES)}")
        if not self.beta > 0:
            raise ValueError(f"--beta={self.beta} must be positive")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label_smoothing={self.label_smoothing} must be in [0, 0.5)")


def sequence_logps(model: Transformer, tokens: Int[Array, "n 2 length"], weights: Float[Array, "n 2 seq"],
                   mesh: Mesh | None = None) -> Float[Array, "n 2"]:
    """Summed log-probability of the weighted targets of each sequence: chosen and rejected of
    every pair go through one forward pass (the pairs axis and the pair axis flattened)."""
    flat = tokens.reshape(-1, tokens.shape[-1])
    logps = next_token_logps(model, flat, mesh=mesh)
    return jnp.sum(logps * weights.reshape(flat.shape[0], -1), axis=-1).reshape(tokens.shape[:2])


def pair_losses(config: LossConfig, policy: Float[Array, "n 2"], reference: Float[Array, "n 2"],
                lengths: Float[Array, "n 2"]) -> Float[Array, " n"]:
    """Per-pair loss from summed log-probabilities (chosen, rejected) and reply lengths."""
    ratios = policy - reference
    if config.loss == "ipo":
        # TRL's IPO: log-ratios averaged per reply token, squared distance to 1 / (2 beta).
        per_token = ratios / jnp.maximum(lengths, 1.0)
        return (per_token[:, 0] - per_token[:, 1] - 1 / (2 * config.beta)) ** 2
    margin = config.beta * (ratios[:, 0] - ratios[:, 1])
    # Conservative DPO: the preference label is wrong with probability label_smoothing.
    return (-(1 - config.label_smoothing) * jax.nn.log_sigmoid(margin)
            - config.label_smoothing * jax.nn.log_sigmoid(-margin))


def pair_metrics(config: LossConfig, policy: Float[Array, "n 2"], reference: Float[Array, "n 2"]
                 ) -> dict[str, Float[Array, " n"]]:
    """TRL's per-pair metrics, under its names."""
    rewards = config.beta * jax.lax.stop_gradient(policy - reference)
    return {"rewards/chosen": rewards[:, 0], "rewards/rejected": rewards[:, 1],
            "rewards/accuracies": (rewards[:, 0] > rewards[:, 1]).astype(jnp.float32),
            "rewards/margins": rewards[:, 0] - rewards[:, 1],
            "logps/chosen": jax.lax.stop_gradient(policy[:, 0]),
            "logps/rejected": jax.lax.stop_gradient(policy[:, 1])}


class PairLoss(eqx.Module):
    """train.fit's loss over a micro-batch of pairs: (summed pair loss, pairs, summed metrics).
    Reference log-probabilities come from the batch, or from `reference` (frozen) when given.
    A module, not a closure: train_step.make_train_step passes `reference`'s arrays to the jitted step
    as arguments (train_step.split_loss), where a closure would bake the whole model into it."""
    config: LossConfig = eqx.field(static=True)
    reference: Transformer | None = None

    def __call__(self, model: Transformer, micro: dict[str, Array], key, mesh: Mesh | None = None):
        del key  # DPO compares log-probabilities: no dropout, as TRL's reference forward
        policy = batch_logps(model, micro, mesh)
        if self.reference is None:
            ref = micro["reference_logps"].reshape(-1, 2)
        else:
            ref = jax.lax.stop_gradient(batch_logps(self.reference, micro, mesh))
        real = micro["pairs"].reshape(-1)
        losses = pair_losses(self.config, policy, ref, reply_lengths(micro))
        metrics = {k: jnp.sum(v * real) for k, v in pair_metrics(self.config, policy, ref).items()}
        return jnp.sum(losses * real), jnp.sum(real), metrics


def make_loss_fn(config: LossConfig, reference: Transformer | None = None) -> train_step.LossFn:
    return PairLoss(config, reference)


def batch_logps(model: Transformer, batch: dict[str, Array], mesh: Mesh | None) -> Float[Array, "pairs 2"]:
    """(chosen, rejected) log-probabilities of a batch's pairs: unpacked (PairBatches) or packed
    (pair_packing.PackedPairBatches: every slot of every row, used or not)."""
    if "segment_ids" in batch:
        return pair_packing.packed_logps(model, batch, mesh)
    return sequence_logps(model, batch["tokens"], batch["weights"], mesh)


def reply_lengths(batch: dict[str, Array]) -> Float[Array, "pairs 2"]:
    if "segment_ids" in batch:
        return pair_packing.per_pair(batch["weights"], batch["target_segments"], batch["pairs"].shape[-1])
    return batch["weights"].sum(-1)


def pair_batches(rows: PairRows | PackedRows, reference_logps: np.ndarray | None, *args, **kwargs
                 ) -> ChatBatches:
    """PairBatches over unpacked rows, pair_packing.PackedPairBatches over packed ones."""
    kind = pair_packing.PackedPairBatches if isinstance(rows, PackedRows) else PairBatches
    return kind(rows, reference_logps, *args, **kwargs)


def reference_shape(rows: PairRows | PackedRows) -> tuple[int, ...]:
    """Of the reference log-probabilities: [pairs, 2], or [rows, slots, 2] when packed."""
    if isinstance(rows, PackedRows):
        return rows.num_rows, pair_packing.slots_of(rows), 2
    return rows.num_rows, 2


@functools.cache
def _reference_forward(mesh) -> Callable:
    """Jitted once per mesh: (model, [1, rows, ...] batch) -> replicated [pairs, 2] log-probs."""
    return jax.jit(lambda m, b: batch_logps(m, {k: v[0] for k, v in b.items()}, mesh),
                   out_shardings=NamedSharding(mesh, P()))


def reference_logps(model: Transformer, rows: PairRows | PackedRows, batch_size: int, mesh) -> np.ndarray:
    """Every pair's (chosen, rejected) log-probabilities under `model` (reference_shape), in one
    pass over the rows; each process reads its part of every batch, and every process gets all."""
    from tqdm import tqdm

    forward = _reference_forward(mesh)
    source = pair_batches(rows, None, 0, batch_size, shuffle=False, process_index=jax.process_index(),
                          process_count=jax.process_count())
    shape, out = reference_shape(rows), []
    for step in tqdm(range(source.num_batches), desc="reference log-probabilities", disable=None):
        batch = source.batch(step)
        values = np.asarray(jax.device_get(forward(model, parallel.global_batch(batch, 1, mesh))))
        out.append(values.reshape(-1, *shape[1:]))
    return np.concatenate(out)[: rows.num_rows] if out else np.zeros((0, *shape[1:]), np.float32)


def abstract_reference(model_config: ModelConfig, mesh) -> Transformer:
    """The reference model's shapes, replicated on `mesh` as main() places it; allocates nothing."""
    shapes = eqx.filter_eval_shape(Transformer, model_config, jax.random.key(0))
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes)


def compile_step(model_config: ModelConfig, config: train.TrainConfig, mesh, loss_config: LossConfig,
                 max_length: int, online: bool):
    """DPO's train step compiled for `mesh` (budget.CompileFn): on stored log-probabilities, or
    with the reference model's arrays as arguments (online), so its memory counts."""
    reference = abstract_reference(model_config, mesh) if online else None
    return train_step.compile_step(model_config, config, mesh, make_loss_fn(loss_config, reference), pair_row(max_length))


def compile_reference_pass(model_config: ModelConfig, config: train.TrainConfig, mesh, max_length: int):
    """The stored reference pass (reference_logps' program) compiled for `mesh` on the step's
    micro-batches (main() runs it at --batch_size / --grad_accum pairs a batch)."""
    row = {k: v for k, v in pair_row(max_length).items() if k != "reference_logps"}
    micro = dataclasses.replace(config, batch_size=config.batch_size // config.grad_accum, grad_accum=1)
    batch = train_step.abstract_batch(model_config, micro, mesh, row)
    return _reference_forward(mesh).lower(abstract_reference(model_config, mesh), batch).compile()


# --------------------------------------------------------------------------------------------
# Files to rows.


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train_data: tuple[str, ...]  # "path" or "path:weight" each
    max_length: int
    max_prompt_length: int
    format: str = "auto"
    system_prompt: str = DEFAULT_SYSTEM
    max_bad_fraction: float = 0.0
    validation_fraction: float = 0.0
    seed: int = 0
    pack: int = 0  # tokens per packed row of pairs (pair_packing.py); 0: two rows per pair

    def __post_init__(self):
        if not self.train_data:
            raise ValueError("--train_data is required: JSON or JSONL files of preference pairs")
        if self.pack and self.pack < 2 * self.max_length:
            raise ValueError(f"--pack_pairs: rows of {self.pack} tokens cannot hold a pair of two "
                             f"--max_length={self.max_length} sequences: the model's context must be at least "
                             f"2 x --max_length")
        if self.format not in PAIR_FORMATS:
            raise ValueError(f"--format={self.format!r}: expected one of {', '.join(PAIR_FORMATS)}")
        if not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(f"--max_prompt_length={self.max_prompt_length} must be in [1, "
                             f"--max_length={self.max_length})")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"--max_bad_fraction={self.max_bad_fraction} must be in [0, 1]")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"--validation_fraction={self.validation_fraction} must be in [0, 1)")


def cache_parts(config: DataConfig, tokenizer: Tokenizer) -> dict:
    """What the pairs of `config` depend on: the prepared-rows cache's key."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "train_data"}
    return prepared.key_parts("dpo pairs", input_identities(config.train_data), tokenizer.model_bytes, settings)


def prepare(config: DataConfig, tokenizer: Tokenizer, workers: int = 1, cache: prepared.Cache | None = None
            ) -> tuple[PairRows, PairRows | None, list[chat_formats.FileStats]]:
    """(training rows, held-out rows or None, per-file stats; rows packed as pair_packing.py
    says when `config.pack`): load, render (over `workers`
    processes), cut, hold out, mix; or all of it read back from `cache` when prepared before
    with the same key. The stats' `truncated` counts pairs whose prompt or replies were cut;
    `dropped`, pairs whose prompt left no room; `supervised_tokens`, reply tokens in the mix."""
    build = functools.partial(_prepare, config, tokenizer, workers)
    if cache is None:
        return build()
    return prepared.cached_rows(cache, cache_parts(config, tokenizer), "prepared pairs",
                                PackedRows if config.pack else PairRows, build)


def _prepare(config: DataConfig, tokenizer: Tokenizer, workers: int
             ) -> tuple[PairRows, PairRows | None, list[chat_formats.FileStats]]:
    load = functools.partial(load_pairs, fmt=config.format, max_bad_fraction=config.max_bad_fraction,
                             default_system=config.system_prompt)
    render_one = functools.partial(render_pair, max_length=config.max_length,
                                   max_prompt_length=config.max_prompt_length)
    train_pairs, held_out, all_stats = render_and_mix(
        config.train_data, load, render_one, tokenizer, workers, lambda p: len(p.chosen) + len(p.rejected),
        config.validation_fraction, config.seed)
    if config.pack:
        to_split = functools.partial(pair_packing.pack_pairs, length=config.pack)
    else:
        to_split = functools.partial(to_rows, max_length=config.max_length)
    return to_split(train_pairs), to_split(held_out) if held_out else None, all_stats


def reference_identity(init_from: str, execution: dict) -> dict:
    """What identifies the reference's log-probabilities: --init_from's newest step (where it
    lives, which step) and the settings it runs with (dtype changes the numbers). A checkpoint
    rewritten in place at the same step is not noticed: --noreuse_prepared recomputes."""
    where = init_from if storage.is_gcs(init_from) else os.path.abspath(init_from)
    return {"init_from": where, "step": checkpoint.latest_step(init_from), "execution": execution}


def stored_reference_logps(splits: dict[str, PairRows], load_reference: Callable[[], Transformer], parts: dict,
                           cache: prepared.Cache, batch_size: int, mesh) -> tuple[dict[str, np.ndarray], str]:
    """({split: log-probabilities}, how): read from `cache` when computed before for the same
    `parts` (the pairs' key and the reference's identity), else computed now with the model
    `load_reference` returns, and stored there for a resumed run. The reference model is loaded
    only to compute them and freed on return: training never holds it (at 2B with --fsdp=64, a
    replicated fp32 copy is 8.6 GB per chip)."""
    # Process 0 decides and shares what it read: every process must take the same branch (the
    # pass below is collective), also when the cache is a local folder only process 0 has.
    what = "reference log-probabilities"
    found = cache.read(parts, what, "computing them") if jax.process_index() == 0 else None
    shapes = {name: reference_shape(rows) for name, rows in splits.items()}
    values = found[0] if found is not None and {k: v.shape for k, v in found[0].items()} == shapes else None
    if jax.process_count() > 1:
        if bool(multihost_utils.broadcast_one_to_all(np.asarray(values is not None))):
            values = jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(
                values if values is not None else {k: np.zeros(v, np.float32) for k, v in shapes.items()}))
        else:
            values = None
    if values is not None:
        return values, f"read from {cache.path(parts)}"
    model = load_reference()
    values = {name: reference_logps(model, rows, batch_size, mesh) for name, rows in splits.items()}
    del model
    cache.store(parts, values, {}, what)
    return values, f"computed and stored in {cache.path(parts)}"


def summary_table(stats: Sequence[chat_formats.FileStats], rows: PairRows | PackedRows) -> str:
    """One line per file and a total: read, skipped, cut, held out, mixed."""
    text = chat_formats.stats_table(stats, "pairs", "cut", "reply tokens", dropped_why=(
        "the prompt, even cut to --max_prompt_length, left no room for a reply token in --max_length"))
    filled = (rows.tokens != PAD_ID).sum() / max(rows.tokens.size, 1)
    if isinstance(rows, PackedRows):
        return text + (f"\n{sum(s.mixed for s in stats):,} pairs packed in {rows.num_rows:,} rows of "
                       f"{rows.tokens.shape[-1]:,} tokens, {filled:.1%} filled")
    return text + f"\n{rows.num_rows:,} pairs in rows of {rows.tokens.shape[-1]:,} tokens, {filled:.1%} filled"


# --------------------------------------------------------------------------------------------
# The command line.

FLAGS = flags.FLAGS
# TRL's and Zephyr's DPO recipe; a --flagfile on the command line still wins.
DPO_DEFAULTS = {"learning_rate": 5e-7, "warmup_steps": 0, "weight_decay": 0.0, "grad_clip": 1.0, "min_lr_ratio": 0.0,
                "eval_every": 100, "batch_size": 64}


def define_flags() -> None:
    """train.py's flags (model, optimization, run, logging) plus DPO's own."""
    train.define_flags()
    prepared.define_flags()
    flags.DEFINE_enum("format", "auto", PAIR_FORMATS, "Record shape of --train_data (auto: by each record's keys).")
    flags.DEFINE_string("system_prompt", DEFAULT_SYSTEM, "System message of pairs that bring none.")
    flags.DEFINE_float("max_bad_fraction", 0.01, "Share of a file's records that may be bad (skipped "
                       "and counted); above it the run stops naming them. 0: any bad record fails.",
                       lower_bound=0, upper_bound=1)
    flags.DEFINE_enum("loss", "sigmoid", LOSSES, "sigmoid: DPO (Rafailov et al.); ipo: IPO (Azar et al.).")
    flags.DEFINE_float("beta", 0.1, "Strength of the pull to the reference (DPO's beta, IPO's tau).")
    flags.DEFINE_float("label_smoothing", 0.0, "Conservative DPO: the chance a preference label is "
                       "wrong, in [0, 0.5) (sigmoid loss only).")
    flags.DEFINE_integer("max_length", 1024, "Tokens of prompt + reply; longer replies are cut.", lower_bound=2)
    flags.DEFINE_integer("max_prompt_length", 512, "Tokens of the prompt kept (its end) when a pair is too long.",
                         lower_bound=1)
    flags.DEFINE_enum("ref_logps", "stored", ["stored", "online"], "stored: the reference's "
                      "log-probabilities computed once before training and kept in --prepared_dir; "
                      "online: computed at every step (one more forward pass per step).")
    flags.DEFINE_bool("pack_pairs", False, "Pack pairs into shared rows of the model's context with "
                      "segment ids (pair_packing.py; needs 2 x --max_length <= the context); --batch_size "
                      "then counts rows, each holding as many whole pairs as fit.")
    flags.DEFINE_float("epochs", 1.0, "Passes over the pairs, setting --steps (0: use --steps).", lower_bound=0)
    flags.DEFINE_float("warmup_ratio", 0.1, "Warmup as a share of the steps (sets --warmup_steps; "
                       "0: use --warmup_steps).", lower_bound=0, upper_bound=1)
    flags.DEFINE_float("validation_fraction", 0.05, "Share of each file's pairs held out and scored "
                       "every --eval_every steps (unless --validation_data is given).", lower_bound=0, upper_bound=1)
    for name, value in DPO_DEFAULTS.items():
        FLAGS.set_default(name, value)


def main(argv):
    del argv
    checkpoint.quiet_logging(FLAGS["verbosity"].present)
    checkpoint.use_compilation_cache(FLAGS.compilation_cache_dir)
    if FLAGS.dry_run and FLAGS.hardware:  # as train.py
        budget.prepare_host(FLAGS.hardware)
    try:
        flag_model, config, run = train.configs_from_flags()
        if not run.init_from and not FLAGS.dry_run:  # a dry run may take the shape from the flags
            raise ValueError("--init_from is required: the fine-tuned checkpoint to align (also the reference)")
        if FLAGS.dry_run and FLAGS.pack_pairs:
            raise ValueError("--dry_run compiles the step on unpacked pairs: drop --pack_pairs")
        if not FLAGS.dry_run:
            parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
            parallel.check_batch(config.batch_size, config.grad_accum, jax.device_count())
        model_config, tokenizer, carried = init_model_config(run, flag_model, FLAGS.tokenizer)
        if FLAGS.max_length > model_config.max_seq_len:
            raise ValueError(f"--max_length={FLAGS.max_length} exceeds the model's context of "
                             f"{model_config.max_seq_len}")
        if not FLAGS.train_data:
            raise ValueError("--train_data is required: JSON or JSONL preference pairs, PATH[:WEIGHT],...")
        loss_config = LossConfig(FLAGS.loss, FLAGS.beta, FLAGS.label_smoothing)
        if FLAGS.label_smoothing and FLAGS.loss != "sigmoid":
            raise ValueError("--label_smoothing applies to --loss=sigmoid only")
        held_out = FLAGS.validation_fraction if FLAGS.eval_every and not FLAGS.validation_data else 0.0
        data_config = DataConfig(tuple(FLAGS.train_data.split(",")), FLAGS.max_length, FLAGS.max_prompt_length,
                                 FLAGS.format, FLAGS.system_prompt, FLAGS.max_bad_fraction, held_out, config.seed,
                                 model_config.max_seq_len + 1 if FLAGS.pack_pairs else 0)
        workers = prepared.workers(FLAGS.prepare_workers)
        cache = None if FLAGS.dry_run else prepared.run_cache(
            run.output_dir, FLAGS.prepared_dir, FLAGS.reuse_prepared, jax.process_index())
        rows, validation_rows, stats = prepare(data_config, tokenizer, workers, cache)
        pair_keys = [prepared.digest(cache_parts(data_config, tokenizer))]
        if FLAGS.eval_every and FLAGS.validation_data:
            validation_config = dataclasses.replace(
                data_config, train_data=tuple(FLAGS.validation_data.split(",")), validation_fraction=0.0)
            validation_rows, _, more = prepare(validation_config, tokenizer, workers, cache)
            pair_keys.append(prepared.digest(cache_parts(validation_config, tokenizer)))
            stats += [dataclasses.replace(s, validation=s.mixed, mixed=0, supervised_tokens=0) for s in more]
        if jax.process_index() == 0:
            print(summary_table(stats, rows))
        if FLAGS.epochs:
            config = _with_steps(config, math.ceil(FLAGS.epochs * rows.num_rows / config.batch_size))
        if FLAGS.warmup_ratio:
            config = _with_steps(config, config.steps, int(FLAGS.warmup_ratio * config.steps))
        online = FLAGS.ref_logps == "online"
        if FLAGS.dry_run:  # the step, and what the reference costs: its pass before, or its arrays in the step
            step = functools.partial(compile_step, loss_config=loss_config, max_length=FLAGS.max_length, online=online)
            before = [] if online else [("reference pass", functools.partial(compile_reference_pass,
                                                                             max_length=FLAGS.max_length))]
            return train_step.dry_run(model_config, config, run.fsdp, FLAGS.hardware, FLAGS.assumed_mfu,
                                 FLAGS.peak_tflops, step, before=before,
                                 workload=budget.Workload(2, FLAGS.max_length, extra_forward=online))
        mesh = parallel.make_mesh(run.fsdp)
        execution = {k: getattr(model_config, k) for k in checkpoint.EXECUTION_FIELDS}

        def load_reference() -> Transformer:
            reference, _, _ = checkpoint.load(run.init_from, model_overrides={**execution, "dropout": 0.0})
            return jax.device_put(reference, NamedSharding(mesh, P()))

        where = dict(process_index=jax.process_index(), process_count=jax.process_count())
        ref_train = ref_valid = None
        if not online:  # the reference lives only while its log-probabilities are computed, if they are
            splits = {"train": rows, **({"validation": validation_rows} if validation_rows is not None else {})}
            parts = {"kind": "dpo reference log-probabilities", "version": prepared.VERSION, "pairs": pair_keys,
                     "reference": reference_identity(run.init_from, execution)}
            logps, _ = stored_reference_logps(splits, load_reference, parts, cache,
                                              config.batch_size // config.grad_accum, mesh)
            ref_train, ref_valid = logps["train"], logps.get("validation")
        source = pair_batches(rows, ref_train, config.seed, config.batch_size, config.grad_accum, **where)
        validation = None
        if validation_rows is not None and run.eval_every:
            validation = pair_batches(validation_rows, ref_valid, config.seed, config.batch_size, config.grad_accum,
                                      shuffle=False, **where)  # scored in the step's micro-batches
            run = dataclasses.replace(run, eval_batches=validation.num_batches)
        loss_fn = make_loss_fn(loss_config, load_reference() if online else None)
        settings = {**dataclasses.asdict(data_config), **dataclasses.asdict(loss_config),
                    "ref_logps": FLAGS.ref_logps, "epochs": FLAGS.epochs,
                    "pairs": sum(s.mixed for s in stats), "rows": rows.num_rows,
                    "files": [s.to_dict() for s in stats]}
        evaluations = train.evaluators(run, mesh, validation, tokenizer.model_bytes, loss_fn)
        train.fit(model_config, config, run, source, evaluations, tokenizer.model_bytes,
                  train.resolved_config(model_config, config, run, dpo=settings, **carried), title="dpo", loss_fn=loss_fn)
        if jax.process_index() == 0:
            print(learning_summary(os.path.join(run.metrics_dir, "metrics.jsonl")))
    except train.TrainingStopped as e:
        sys.exit(f"dpo.py: training stopped: {e}")


def learning_summary(metrics_path: str) -> str:
    """One line: reward accuracy and margin on the training pairs, first logged interval -> last.
    DPO learns when the accuracy rises above 0.5 and the margins grow."""
    with open(metrics_path) as f:
        logged = [r for r in map(json.loads, f) if "rewards/accuracies" in r]
    if not logged:
        return f"dpo: no training metrics in {metrics_path}"
    first, last = logged[0], logged[-1]
    return (f"dpo on the training pairs, step {first['step']} -> {last['step']}: rewards/accuracies "
            f"{first['rewards/accuracies']:.2f} -> {last['rewards/accuracies']:.2f}, rewards/margins "
            f"{first['rewards/margins']:.2f} -> {last['rewards/margins']:.2f}")


def _with_steps(config: train.TrainConfig, steps: int, warmup: int | None = None) -> train.TrainConfig:
    warmup = config.warmup_steps if warmup is None else warmup
    try:
        return dataclasses.replace(config, steps=steps, warmup_steps=min(warmup, steps - 1))
    except ValueError as e:
        raise ValueError(f"--epochs={FLAGS.epochs:g} at --batch_size={config.batch_size} gives {steps} "
                         f"steps: {e}") from None


if __name__ == "__main__":
    define_flags()
    cli.run(main)
