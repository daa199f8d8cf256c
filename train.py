"""Pretrain a Julian model, on one CPU or on every host of a TPU pod.

    python train.py --flagfile=configs/tiny.flags --tokenizer=tok.model --train_data=shards/
    python train.py --flagfile=configs/600m.flags ...      # the same command on every host

One jitted step does everything between two optimizer updates: `lax.scan` over micro-batches
(gradient accumulation), AdamW with both moments stored in --opt_state_dtype, global-norm
clipping, a warmup + cosine learning rate, and a health check that skips the update when the
loss or gradient norm is not finite. The mesh has axes ("data", "fsdp") over all devices of all
processes: the batch is split over every device; parameters and optimizer state are replicated
(--fsdp=1, the report's setup) or sharded over --fsdp devices. Each process reads only its rows.

What makes a 21-day run on preemptible hardware work:
- Resume: a run started again with the same --output_dir continues from the newest complete
  checkpoint, at exactly the batches an uninterrupted run would see (the batch of step s is a
  pure function of the seed and s + data_offset; see stream.py). The relaunch is the same command.
- Preemption: SIGTERM or SIGINT on any process makes every process stop after the same step
  (the step itself carries each process's vote), write a checkpoint, wait for it and exit 0.
- NaNs: a non-finite step is skipped (parameters and moments unchanged). After --max_bad_steps
  in a row, training rolls back to the newest checkpoint and moves the data past the offending
  batches; after --max_rollbacks rollbacks it stops and says where.

Outputs: Orbax checkpoints in --output_dir (see checkpoint.py); in --metrics_dir (default
--output_dir): metrics.jsonl, TensorBoard events under tb/, config.json, loss.png, and with
--profile_steps, an XLA trace under profile/; with --wandb_project, the same to Weights & Biases.

To try another optimizer, change optim.py; to add a loss term, token_loss below (fit takes any
loss function, as dpo.py's). The mesh and shardings are in parallel.py, the MFU peaks and the
dry run in budget.py, the logger, the loss plot, traces and W&B in runlog.py.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray
from tqdm import tqdm

import budget
import checkpoint
import cli
import runlog
import stream
from budget import HARDWARE, device_peak_flops
from layer_ops import ATTENTION_IMPLS
from model import REMAT_POLICIES, ModelConfig, Transformer, cross_entropy, flops_per_token, num_params
from optim import TrainConfig, learning_rate_applied, make_optimizer
from parallel import (AXES, batch_sharding, check_batch, global_batch, initialize_distributed, leaf_sharding, make_mesh,
                      shardings, stop_votes)
from runlog import (IntervalLogger, PhaseTimes, ProfileConfig, ProfileWindow, WandbConfig, check_writable,
                    keep_metrics_until, open_wandb)
from tokenizer import Tokenizer


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defined on demand, not at import: other scripts and the tests import this file."""
    # Model shape (configs/*.flags hold the report's three sizes).
    flags.DEFINE_integer("vocab_size", 50_000, "Vocabulary size; must equal the tokenizer's.")
    flags.DEFINE_integer("d_model", 1280, "Width of the residual stream.")
    flags.DEFINE_integer("n_layers", 18, "Number of transformer blocks.")
    flags.DEFINE_integer("n_heads", 20, "Attention heads; must divide d_model (head dim 64 in the report).")
    flags.DEFINE_integer("n_kv_heads", None, "Key/value heads (grouped-query attention); must divide "
                         "--n_heads. Default: --n_heads (multi-head attention).")
    flags.DEFINE_bool("tie_embeddings", False, "The output projection is the input embedding (transposed).")
    flags.DEFINE_integer("d_ff", 5120, "Hidden width of the SwiGLU MLP.")
    flags.DEFINE_integer("seq_len", 2048, "Training sequence length, and the model's context length.")
    flags.DEFINE_float("rope_theta", 10_000.0, "Rotary embedding base.")
    flags.DEFINE_list("rope_scaling", None, "Llama 3's rotary scaling: factor,low_freq_factor,high_freq_factor,"
                      "original_max_position_embeddings (e.g. 32,1,4,8192). Default: none.")
    flags.DEFINE_float("norm_eps", 1e-6, "RMSNorm epsilon.")
    flags.DEFINE_float("dropout", 0.0, "Residual dropout (the report's table says 0.1); a fresh key per step.")
    flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Activation and matmul dtype.")
    flags.DEFINE_bool("scan_layers", True, "lax.scan over layers (fast compile) instead of unrolling.")
    flags.DEFINE_enum("remat", "none", list(REMAT_POLICIES),
                      "What each block keeps for the backward, the rest recomputed (model.REMAT_SAVES), least "
                      "recomputation first: none; dots (every matmul output but the attention scores); "
                      "dots_except_mlp (not the MLP's gate and up); attention (the q/k/v and output "
                      "projections only); full (only the block's input).")
    flags.DEFINE_enum("attention", "auto", list(ATTENTION_IMPLS),
                      "auto: splash on TPU, flash on GPU, einsum on CPU. splash: TPU Pallas kernel; "
                      "flash: Pallas GPU (Triton) kernel; cudnn: jax.nn.dot_product_attention on "
                      "cuDNN with a segment mask; dot_product: the same on XLA; einsum: plain XLA. "
                      "All honour packed rows' segment ids.")
    # Data.
    flags.DEFINE_string("tokenizer", None, "SentencePiece model (tokenizer.py writes one).")
    flags.DEFINE_string("train_data", None,
                        "A shard manifest from `data.py prepare` (manifest.json or its directory, "
                        "local or gs://), or comma-separated text files (one document per line).")
    flags.DEFINE_string("validation_data", None,
                        "Held-out data for --eval_every, in --train_data's forms; default: the "
                        "manifest's validation split when --train_data is a manifest.")
    # Optimization (defaults: the report's).
    flags.DEFINE_integer("steps", 300_000, "Optimizer steps.")
    flags.DEFINE_integer("batch_size", 64, "Global batch, in sequences per optimizer step, over all hosts.")
    flags.DEFINE_integer("grad_accum", 1, "Micro-batches per step (batch_size must divide evenly).")
    flags.DEFINE_float("learning_rate", 1.2e-3, "Peak learning rate.")
    flags.DEFINE_float("min_lr_ratio", 0.1, "Cosine decay ends at learning_rate * min_lr_ratio.")
    flags.DEFINE_integer("warmup_steps", 3000, "Linear warmup steps from 0 to the peak.")
    flags.DEFINE_float("weight_decay", 0.1, "AdamW weight decay (matmul weights only).")
    flags.DEFINE_float("beta1", 0.9, "AdamW beta1.")
    flags.DEFINE_float("beta2", 0.95, "AdamW beta2.")
    flags.DEFINE_float("adam_eps", 1e-8, "AdamW epsilon.")
    flags.DEFINE_float("grad_clip", 1.0, "Global gradient norm clip.")
    flags.DEFINE_enum("opt_state_dtype", "bfloat16", ["bfloat16", "float32"],
                      "Storage dtype of both AdamW moments (the report: bfloat16; math is fp32).")
    # Parallelism.
    flags.DEFINE_integer("fsdp", 1, "Shard parameters and optimizer state over this many devices "
                         "(1: replicated, the report's setup). Must divide the device count.")
    flags.DEFINE_string("coordinator_address", None,
                        "host:port of process 0, for multi-process runs on CPU/GPU clusters "
                        "(a TPU pod needs none: every host finds the others itself).")
    flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run (with --coordinator_address).")
    flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")
    # Checkpoints and health.
    flags.DEFINE_string("output_dir", "runs/default",
                        "Checkpoints (local or gs://). Started again with the same directory, "
                        "training resumes from its newest complete checkpoint.")
    flags.DEFINE_string("compilation_cache_dir", None, checkpoint.COMPILATION_CACHE_HELP)
    flags.DEFINE_integer("checkpoint_every", 10_000, "Steps between (asynchronous) checkpoints.")
    flags.DEFINE_integer("keep", 3, "Most recent checkpoints to keep.")
    flags.DEFINE_integer("keep_every", 0, "Also keep every checkpoint whose step is a multiple of this (0: none).")
    flags.DEFINE_string("init_from", None,
                        "Start from this checkpoint directory's (or Hugging Face Llama folder's, imported "
                        "on the way in) parameters only: fresh optimizer, step 0, its own warmup. Its shape "
                        "and tokenizer are the run's (model flags given must agree); ignored when "
                        "--output_dir already holds a checkpoint to resume.")
    flags.DEFINE_integer("max_bad_steps", 3,
                         "Consecutive non-finite steps (each skipped) before rolling back to the "
                         "newest checkpoint and moving the data past the offending batches.")
    flags.DEFINE_integer("max_rollbacks", 3, "Rollbacks before the run stops with an error.")
    flags.DEFINE_list("test_nan_batches", [],
                      "Testing only: data positions whose step gets a NaN loss injected.")
    flags.DEFINE_integer("test_sigkill_during_save", -1,
                         "Testing only: SIGKILL this process right after starting the save of this step.")
    # Logging.
    flags.DEFINE_string("metrics_dir", None,
                        "metrics.jsonl, TensorBoard events (tb/), config.json, loss.png; default "
                        "--output_dir, or runs/<its last component> when that is gs://.")
    flags.DEFINE_integer("seed", 0, "Seeds initialization, data order and dropout.")
    flags.DEFINE_integer("log_every", 10, "Steps between log lines.")
    flags.DEFINE_integer("eval_every", 0, "Steps between held-out losses (0: never).")
    flags.DEFINE_integer("eval_batches", 4, "Global batches of --validation_data per held-out loss.")
    flags.DEFINE_list("eval_tasks", [], "lm-eval tasks (evaluate.py) scored every --eval_every steps, "
                      "e.g. hellaswag,piqa, to follow the benchmark curve during training.")
    flags.DEFINE_string("eval_data_dir", None, "Offline task data for --eval_tasks (evaluate.py --data_dir).")
    flags.DEFINE_integer("eval_limit", 0, "Items per task for --eval_tasks (0: all).")
    flags.DEFINE_bool("dry_run", False, "Print sizes, compiled memory and compute budget; train nothing.")
    flags.DEFINE_enum("hardware", "", ["", *HARDWARE],
                      "--dry_run for this pod: compiled by its own compiler (libtpu, the CUDA plugin) on this "
                      "host, memory per chip, kernels, fit, and the time estimate.")
    flags.DEFINE_float("assumed_mfu", 0.4, "For --dry_run's time estimate.")
    flags.DEFINE_float("peak_tflops", 0.0,
                       "bf16 peak TFLOP/s per device for MFU; 0 looks the chip up (CPU: measured once per "
                       "CPU model and core count, kept in ~/.cache/julian).")
    runlog.define_flags()  # --profile_steps, --wandb_project, ...


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where and how a run executes; none of it changes the numbers."""
    output_dir: str
    metrics_dir: str
    fsdp: int = 1
    checkpoint_every: int = 10_000
    keep: int = 3
    keep_every: int = 0
    init_from: str | None = None
    max_bad_steps: int = 3
    max_rollbacks: int = 3
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 4
    eval_tasks: tuple[str, ...] = ()
    eval_data_dir: str | None = None
    eval_limit: int = 0
    peak_tflops: float = 0.0
    test_nan_batches: tuple[int, ...] = ()
    test_sigkill_during_save: int = -1
    profile: ProfileConfig | None = None
    wandb: WandbConfig | None = None


# --- The state, the step, the held-out loss --------------------------------------------------------

class TrainState(eqx.Module):
    model: Transformer
    opt_state: optax.OptState


def abstract_state(model_config: ModelConfig, optimizer: optax.GradientTransformation,
                   mesh: Mesh) -> TrainState:
    """The state's shapes, dtypes and shardings, without allocating it."""
    shapes = eqx.filter_eval_shape(lambda k: init_state(model_config, optimizer, k), jax.random.key(0))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=leaf_sharding(mesh, x.shape)),
                        shapes)


def init_state(model_config: ModelConfig, optimizer: optax.GradientTransformation,
               key: PRNGKeyArray) -> TrainState:
    model = Transformer(model_config, key)
    return TrainState(model, optimizer.init(model))


def as_batch(rows: np.ndarray | dict) -> dict[str, np.ndarray]:
    """Pretraining streams yield token rows; SFT yields {"tokens", "segment_ids", "weights"}."""
    return rows if isinstance(rows, dict) else {"tokens": rows}


# A loss function: (model, micro-batch, dropout key or None, mesh) -> (summed loss, count, summed
# metrics). The step's loss and each metric are their sums over micro-batches divided by the
# summed count (tokens for language modelling, pairs for dpo.py); gradients likewise. `mesh` is
# the mesh the step is built for (None: one device), which attention's kernels run under.
LossFn = Callable[[Transformer, dict, PRNGKeyArray | None, Mesh | None], tuple[Array, Array, dict[str, Array]]]


def token_loss(model: Transformer, micro: dict[str, Array], key: PRNGKeyArray | None, mesh: Mesh | None = None
               ) -> tuple[Float[Array, ""], Float[Array, ""], dict[str, Array]]:
    """Next-token cross-entropy summed over the weighted targets, and their count."""
    tokens = micro["tokens"]
    weights = micro.get("weights", jnp.ones(tokens[:, 1:].shape, jnp.float32))
    count = weights.sum()
    loss = cross_entropy(model, tokens, weights, micro.get("segment_ids"), mesh=mesh,
                         key=key if model.config.dropout else None)
    return loss * count, count, {}


class BoundProgram:
    """A jitted program with its last arguments bound: a loss function's own arrays (dpo.py's
    online reference model). Passed at every call, they stay arguments of the compiled program;
    closed over, jit would bake them into it as constants (the whole reference model in every
    compile and cache entry: 25.8 MiB for the tiny model's DPO step instead of 0.3 MiB)."""

    def __init__(self, jitted: Callable, *bound):
        self.jitted, self.bound = jitted, bound

    def __call__(self, *args):
        return self.jitted(*args, *self.bound)

    def lower(self, *args):
        return self.jitted.lower(*args, *self.bound)


def split_loss(loss_fn: LossFn) -> tuple[object, Callable[[object], LossFn]]:
    """(arrays, rebuild): the arrays a loss function holds (none for token_loss; an equinox
    module's fields), abstract ones included, and the function that puts them back."""
    arrays, rest = eqx.partition(loss_fn, lambda x: isinstance(x, (jax.Array, jax.ShapeDtypeStruct)))
    return arrays, lambda given: eqx.combine(given, rest)


def make_train_step(optimizer: optax.GradientTransformation, state_sharding, mesh: Mesh,
                    loss_fn: LossFn = token_loss, config: TrainConfig | None = None) -> BoundProgram:
    """The jitted update: (state, batch, step, inject_nan, stop_votes) -> (state, metrics).

    `batch` holds [grad_accum, micro, ...] arrays. `stop_votes` holds one bool per device (each
    process sets its own): their OR comes back as metrics["stop"], so every process learns of a
    signal any of them received at the same step, without a separate collective. Given the
    `config` that built `optimizer`, metrics["lr"] is the learning rate the update applied.
    """
    loss_arrays, with_arrays = split_loss(loss_fn)

    def train_step(state: TrainState, batch: dict[str, Array], key: PRNGKeyArray, step: Int[Array, ""],
                   inject_nan: Bool[Array, ""], stop_votes: Bool[Array, " devices"], loss_arrays):
        loss_fn = with_arrays(loss_arrays)
        weights = batch.get("weights")
        keys = jax.random.split(jax.random.fold_in(key, step), batch["tokens"].shape[0])

        # With sharded parameters, gather them for the compute: left to itself, XLA keeps the
        # matmuls' weights sharded and moves the activations instead (measured: 252 GiB of
        # temporaries per device for 600m on 32 devices). The blocks gather their own, in bf16, one
        # layer at a time inside the layer scan (model._sharded_layer); the embeddings, the final
        # norm and the output layer once here. Gradients go back sharded to `carry`.
        gathered = lambda m: (m.embed, m.final_norm.weight, *([] if m.lm_head is None else [m.lm_head]))
        model = eqx.tree_at(gathered, state.model, jax.lax.with_sharding_constraint(
            gathered(state.model), NamedSharding(mesh, P())))

        def micro_loss(m, micro, micro_key):
            loss, count, sums = loss_fn(m, micro, micro_key, mesh)
            return loss, (count, sums)

        def accumulate(carry, xs):
            (loss, aux), grads = jax.value_and_grad(micro_loss, has_aux=True)(model, *xs)
            return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

        first = jax.tree.map(lambda x: x[0], (batch, keys))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(micro_loss, model, *first))
        (loss, (count, sums), grads), _ = jax.lax.scan(
            accumulate, (*zeros, jax.tree.map(jnp.zeros_like, state.model)), (batch, keys))
        # Sums over the step, then one division: the mean over every token (or pair) of the step.
        count = jnp.maximum(count, 1.0)
        loss = jnp.where(inject_nan, jnp.nan, loss / count)
        grads = jax.tree.map(lambda g: g / count, grads)
        grad_norm = optax.global_norm(grads)
        applied = state.opt_state
        updates, opt_state = optimizer.update(grads, state.opt_state, state.model)
        updated = TrainState(optax.apply_updates(state.model, updates), opt_state)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), updated, state)
        metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": ~ok,
                   "supervised_tokens": weights.sum() if weights is not None else count,
                   "stop": jnp.any(stop_votes), **{k: v / count for k, v in sums.items()}}
        if config is not None:  # the schedule at the optimizer's count: skipped steps do not advance it
            metrics["lr"] = learning_rate_applied(config, applied)
        return state, metrics

    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(train_step, donate_argnums=0,
                     in_shardings=(state_sharding, batch_sharding(mesh), replicated, replicated,
                                   replicated, NamedSharding(mesh, P(AXES)), shardings(loss_arrays)),
                     out_shardings=(state_sharding, replicated))
    return BoundProgram(jitted, loss_arrays)


# Something fit() reports every --eval_every steps: the model (sharded over the run's mesh) ->
# named figures. main() builds them (held-out loss, benchmark scores); the loop knows none.
Evaluator = Callable[[Transformer], dict[str, float]]


def held_out_step(mesh: Mesh, loss_fn: LossFn = token_loss) -> BoundProgram:
    """The jitted held-out pass: (model, [grad_accum, micro, ...] batch) -> (summed loss, count,
    summed metrics), one micro-batch at a time as the train step, so it needs no more memory
    than the step (the whole batch at once needed 4.7x the step's temporaries at grad_accum 8)."""
    loss_arrays, with_arrays = split_loss(loss_fn)

    def held_out(model: Transformer, batch: dict[str, Array], loss_arrays):
        loss_fn = with_arrays(loss_arrays)
        first = jax.tree.map(lambda x: x[0], batch)
        shapes = jax.eval_shape(lambda m, b: loss_fn(m, b, None, mesh), model, first)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        add = lambda total, micro: (jax.tree.map(jnp.add, total, loss_fn(model, micro, None, mesh)), None)
        return jax.lax.scan(add, zeros, batch)[0]

    return BoundProgram(jax.jit(held_out), loss_arrays)


def held_out_loss(validation_data, batches: int, mesh: Mesh, loss_fn: LossFn = token_loss) -> Evaluator:
    """eval_loss, and the loss function's metrics as eval_<name>, over global batches
    0..batches-1 of `validation_data` (read like fit's train_data, in its micro-batches)."""
    step = held_out_step(mesh, loss_fn)

    def evaluate(model: Transformer) -> dict[str, float]:
        loss = count = 0.0
        sums: dict[str, float] = {}
        for i in range(batches):
            batch = global_batch(as_batch(validation_data.batch(i)), validation_data.grad_accum, mesh)
            out = jax.device_get(step(model, batch))
            loss, count = loss + float(out[0]), count + float(out[1])
            sums = {k: sums.get(k, 0.0) + float(v) for k, v in out[2].items()}
        count = max(count, 1.0)
        return {"eval_loss": loss / count, **{f"eval_{k}": v / count for k, v in sums.items()}}

    return evaluate


def evaluators(run: RunConfig, mesh: Mesh, validation_data, tokenizer_bytes: bytes,
               loss_fn: LossFn = token_loss) -> list[Evaluator]:
    """What main() (here, in sft.py and dpo.py) hands fit: the held-out loss when there is
    validation data, and --eval_tasks' lm-eval scores (evaluate.py) when asked for."""
    out = [held_out_loss(validation_data, run.eval_batches, mesh, loss_fn)] if validation_data is not None else []
    if run.eval_tasks:
        import evaluate  # lm-eval takes seconds to import: only when asked for

        out.append(evaluate.benchmark_scorer(Tokenizer.from_bytes(tokenizer_bytes), list(run.eval_tasks),
                                             run.eval_data_dir, run.eval_limit or None, mesh))
    return out


class TrainingStopped(RuntimeError):
    """The run cannot go on (too many rollbacks); the message says what happened and where."""


def abstract_batch(model_config: ModelConfig, config: TrainConfig, mesh: Mesh,
                   row: dict[str, jax.ShapeDtypeStruct] | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """A step's [grad_accum, micro, ...] batch, abstract and placed on `mesh`. `row` is one batch
    row's arrays, a pretraining row of tokens by default (sft.py and dpo.py pass theirs)."""
    micro = config.batch_size // config.grad_accum
    row = row or {"tokens": jax.ShapeDtypeStruct((model_config.max_seq_len + 1,), jnp.int32)}
    return {name: jax.ShapeDtypeStruct((config.grad_accum, micro, *x.shape), x.dtype, sharding=batch_sharding(mesh))
            for name, x in row.items()}


def compile_step(model_config: ModelConfig, config: TrainConfig, mesh: Mesh, loss_fn: LossFn = token_loss,
                 row: dict[str, jax.ShapeDtypeStruct] | None = None):
    """The train step compiled for `mesh` (whose devices may be a topology's: budget.py's
    --hardware) from abstract arguments; allocates nothing. `row` as abstract_batch's (sft.py
    and dpo.py pass theirs, with their `loss_fn`, whose arrays may be abstract too)."""
    optimizer = make_optimizer(config)
    arguments = step_arguments(model_config, config, mesh, row)
    return make_train_step(optimizer, shardings(arguments[0]), mesh, loss_fn, config).lower(*arguments).compile()


def step_arguments(model_config: ModelConfig, config: TrainConfig, mesh: Mesh,
                   row: dict[str, jax.ShapeDtypeStruct] | None = None) -> tuple:
    """The train step's arguments (state, batch, key, step, inject_nan, stop_votes), abstract and
    placed on `mesh`: it may be a topology this host does not have."""
    replicated = NamedSharding(mesh, P())
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=replicated)
    votes = jax.ShapeDtypeStruct((mesh.size,), jnp.bool_, sharding=NamedSharding(mesh, P(AXES)))
    return (abstract_state(model_config, make_optimizer(config), mesh), abstract_batch(model_config, config, mesh, row),
            key, scalar(jnp.int32), scalar(jnp.bool_), votes)


def compile_held_out(model_config: ModelConfig, config: TrainConfig, mesh: Mesh, loss_fn: LossFn = token_loss,
                     row: dict[str, jax.ShapeDtypeStruct] | None = None):
    """The held-out pass (held_out_step) compiled for `mesh` on compile_step's batch."""
    model = abstract_state(model_config, make_optimizer(config), mesh).model
    return held_out_step(mesh, loss_fn).lower(model, abstract_batch(model_config, config, mesh, row)).compile()


def dry_run(model_config: ModelConfig, config: TrainConfig, fsdp: int, hardware: str, assumed_mfu: float,
            peak_tflops: float, compile_fn: budget.CompileFn = compile_step, **more) -> None:
    """budget.dry_run of a train step (this file's, or sft.py's and dpo.py's through `compile_fn`,
    with their `workload` and the programs they run `before` the steps): sizes, memory, kernels,
    fit on `hardware`, time budget."""
    budget.dry_run(model_config, config, fsdp, hardware, assumed_mfu, peak_tflops, compile_fn, **more)


# --- The run ---------------------------------------------------------------------------------------

# A resumed run's TrainConfig may differ from the checkpoint's in these only: --grad_accum splits
# the same global batch differently; --steps (checked apart) may grow.
RESUMABLE_CHANGES = ("grad_accum", "steps")
# Settings of sft.py's and dpo.py's data (resolved_config's extra sections) that follow from others.
DERIVED = ("epochs", "files", "rows", "pairs", "supervised_tokens_per_epoch")


def check_resume(saved: dict, now: dict, where: str) -> str | None:
    """Raise, naming every flag that differs, when resuming the run whose resolved_config was
    `saved` with `now` would not continue it exactly (batch size, seed, schedule, optimizer,
    data: the batch of step s and its update are functions of these); the model's shape is
    start_state's to check. Return a note when --steps grew (allowed: the cosine stretches over
    the new length from the resumed step on), else None."""
    def flatten(config: dict) -> dict:
        out = {f"--{k}": v for k, v in config.get("train", {}).items() if k not in RESUMABLE_CHANGES}
        for section, value in config.items():
            if section in ("model", "train", "run"):
                continue
            items = value.items() if isinstance(value, dict) else [(section, value)]
            out.update({f"--{k}": v for k, v in items if k not in DERIVED})
            if isinstance(value, dict):  # the data the settings produced: changed files change them
                out.update({f"data ({k})": value[k] for k in DERIVED if k in value and k != "epochs"})
        return out

    before, after = flatten(saved), flatten(json.loads(json.dumps(now)))  # as saved: tuples become lists
    short = lambda v: r if len(r := repr(v)) <= 60 else r[:57] + "..."
    changed = [f"{k} {short(before[k])} -> {short(after[k])}" for k in after if k in before and before[k] != after[k]]
    steps_before, steps_after = saved.get("train", {}).get("steps"), now["train"]["steps"]
    if steps_before is not None and steps_after < steps_before:
        changed.append(f"--steps {steps_before} -> {steps_after} (a shorter schedule)")
    if changed:
        raise ValueError(f"{where} holds a run with other settings, which a resume would not continue exactly: "
                         f"{'; '.join(changed)}. Use the checkpoint's flags, another --output_dir, or "
                         f"--init_from to start a new run from its parameters")
    if steps_before is not None and steps_after > steps_before:
        return (f"--steps {steps_before} -> {steps_after}: the run is extended, its cosine schedule "
                f"now decays over {steps_after} steps")
    return None


def start_state(model_config: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                run: RunConfig, seed: int, ckpt: checkpoint.Checkpointer) -> tuple[TrainState, dict, str]:
    """(state, meta, how) from the newest checkpoint in --output_dir, else --init_from's
    parameters with a fresh optimizer, else a fresh initialization."""
    abstract = abstract_state(model_config, optimizer, mesh)
    latest = ckpt.latest_step()
    if latest is not None:
        mismatch = checkpoint.config_mismatch(ckpt.restore_config(latest)["model"], model_config)
        if mismatch:
            raise ValueError(f"--output_dir={run.output_dir} holds step {latest} of a different model "
                             f"({mismatch}): use another --output_dir, or --init_from to start from it")
        model, opt_state, meta = ckpt.restore(latest, abstract.model, abstract.opt_state)
        return TrainState(model, opt_state), meta, f"resumed from step {latest} in {run.output_dir}"
    key = jax.random.key(seed)
    meta = {"step": 0, "data_offset": 0, "rollbacks": 0,
            "rng": np.asarray(jax.random.key_data(key)).tolist()}
    if run.init_from:
        # This run's execution settings (dtype, remat, ...) may differ from the checkpoint's.
        saved = checkpoint.load(run.init_from, model_overrides={
            name: getattr(model_config, name) for name in checkpoint.EXECUTION_FIELDS})
        mismatch = checkpoint.config_mismatch(saved[2]["model"], model_config)
        if mismatch:
            raise ValueError(f"--init_from={run.init_from} holds a different model ({mismatch})")
        model = jax.device_put(saved[0], shardings(abstract.model))
        opt_state = jax.jit(optimizer.init, out_shardings=shardings(abstract.opt_state))(model)
        return TrainState(model, opt_state), meta, f"parameters from {run.init_from}"
    init = jax.jit(lambda k: init_state(model_config, optimizer, k), out_shardings=shardings(abstract))
    return init(key), meta, "initialized from scratch"


def fit(model_config: ModelConfig, config: TrainConfig, run: RunConfig, train_data,
        evaluations: Sequence[Evaluator], tokenizer_bytes: bytes, run_config: dict, title: str = "pretraining",
        loss_fn: LossFn = token_loss) -> None:
    """The training loop, shared by pretraining, SFT (sft.py) and DPO (dpo.py).

    `train_data.batch(step)` gives this process's rows of a global batch (stream.py's layout):
    token rows [rows, seq_len + 1], or a dict with "tokens", optional "segment_ids" and "weights"
    [rows, seq_len] (the loss weight of each target), or whatever else `loss_fn` reads (a row
    may hold `sequences_per_row` sequences, as dpo.py's chosen and rejected pair).
    Every --eval_every steps, each of `evaluations` scores the model and fit logs what they return.
    """
    primary = jax.process_index() == 0
    mesh = make_mesh(run.fsdp)
    check_batch(config.batch_size, config.grad_accum, mesh.size)
    check_writable(run.output_dir, "--output_dir")
    check_writable(run.metrics_dir, "--metrics_dir")
    optimizer = make_optimizer(config)
    ckpt = checkpoint.Checkpointer(run.output_dir, run.keep, run.keep_every or None)
    finished = ckpt.latest_step()
    if finished is not None and finished >= config.steps:  # rerun of a finished run: no resume to log
        ckpt.close()
        if primary:
            print(f"{title}: {run.output_dir} already holds step {finished} of {config.steps}: nothing "
                  "to train (another --output_dir, or an empty one, starts afresh)")
        return
    if finished is not None:
        extended = check_resume(ckpt.restore_config(finished), run_config, f"--output_dir={run.output_dir}")
        if extended and primary:
            print(f"{title}: {extended}")
    state, meta, how = start_state(model_config, optimizer, mesh, run, config.seed, ckpt)
    state_sharding = shardings(state)
    train_step = make_train_step(optimizer, state_sharding, mesh, loss_fn, config)
    key = jax.random.wrap_key_data(jnp.asarray(meta["rng"], jnp.uint32))
    step, data_offset, rollbacks, bad_streak, skipped = meta["step"], meta["data_offset"], meta["rollbacks"], 0, 0
    saved_meta = lambda: {"data_offset": data_offset, "rollbacks": rollbacks, "rng": meta["rng"]}

    seq_len = getattr(train_data, "seq_len", model_config.max_seq_len)  # SFT rows may be shorter
    tokens_per_step = config.batch_size * getattr(train_data, "sequences_per_row", 1) * seq_len
    peak = device_peak_flops(run.peak_tflops, model_config.dtype)
    logger = None
    if primary:
        with open(os.path.join(run.metrics_dir, "config.json"), "w") as f:
            json.dump(run_config, f, indent=2)
        keep_metrics_until(os.path.join(run.metrics_dir, "metrics.jsonl"), step)
        logger = IntervalLogger(run.metrics_dir, run.log_every, config.steps, tokens_per_step,
                                flops_per_token(model_config, seq_len) * tokens_per_step, peak,
                                open_wandb(run.wandb, run.output_dir, run.metrics_dir, run_config) if run.wandb else None)
        print(f"{title}: {num_params(model_config):,} parameters | {how} | {tokens_per_step:,} tokens "
              f"per step | {cli.plural(jax.process_count(), 'process', 'processes')}, mesh {dict(mesh.shape)} | peak "
              f"{peak / 1e12:.2f} TFLOP/s for MFU")
        if step:  # loss.png marks where a resumed run took over
            logger.write({"step": step, "event": "resume", "time": time.time()})

    def save(at: int) -> None:
        ckpt.save(at, state.model, state.opt_state, saved_meta(), run_config, tokenizer_bytes)
        if at == run.test_sigkill_during_save:
            os.kill(os.getpid(), signal.SIGKILL)

    guard = checkpoint.PreemptionGuard()
    times = PhaseTimes()
    profile = ProfileWindow(run.profile, step, primary)
    batches = train_data.iterate(step + data_offset)
    bar = tqdm(initial=step, total=config.steps, disable=None if primary else True, desc=title)
    # The loop runs one step ahead: it dispatches step N+1 before it reads step N's metrics (the
    # stop vote, the skipped flag, the loss), so the host assembles and sends the next batch while
    # the chips compute. It waits for the step itself only where it needs the state of that step:
    # a checkpoint, an evaluation, the last step. A stop vote is therefore acted on one step late:
    # the checkpoint holds the step after the one that carried it.
    in_flight: collections.deque = collections.deque()  # (step, data position, metrics) not yet read
    saves_at = lambda at: at % run.checkpoint_every == 0 or at == config.steps
    evaluates_at = lambda at: bool(run.eval_every) and (at % run.eval_every == 0 or at == config.steps)
    stopping = False
    try:
        while step < config.steps or in_flight:
            if step < config.steps and not stopping:
                with times("data_wait"):
                    position, rows = next(batches)
                batch = global_batch(as_batch(rows), config.grad_accum, mesh)
                with profile.step(step), times("step"):
                    state, metrics = train_step(state, batch, key, step, position in run.test_nan_batches,
                                                stop_votes(guard.requested, mesh))
                step += 1
                in_flight.append((step, position, metrics))
            rollback = None
            while len(in_flight) > (0 if stopping or saves_at(step) or evaluates_at(step) else 1):
                done, position, metrics = in_flight.popleft()
                with times("step"):  # the device's time not hidden behind the next step's dispatch
                    metrics = jax.device_get(metrics)
                bar.update()
                bad_streak = bad_streak + 1 if metrics["skipped"] else 0
                skipped += bool(metrics["skipped"])
                if bad_streak >= run.max_bad_steps:
                    rollback = (done, position)
                    break
                stopping = stopping or bool(metrics["stop"])
                if logger:
                    extra = {"skipped_steps": skipped, "rollbacks": rollbacks}
                    if hasattr(train_data, "epoch"):
                        extra["epoch"] = float(train_data.epoch(position))
                    if line := logger.log(done, metrics, times, extra, last=stopping and not in_flight):
                        bar.write(line)
            if rollback:
                failed_at, position = rollback
                rollbacks += 1
                restored = ckpt.latest_step() or 0
                if rollbacks > run.max_rollbacks:
                    raise TrainingStopped(
                        f"{bad_streak} non-finite steps in a row ending at step {failed_at} (data positions "
                        f"{position - bad_streak + 1}..{position}) after {rollbacks - 1} rollbacks "
                        f"(--max_rollbacks={run.max_rollbacks}); the newest checkpoint is step {restored} "
                        f"in {run.output_dir}. Look at those batches, or lower --learning_rate.")
                in_flight.clear()  # computed from the batches being skipped: dropped
                ckpt.wait()
                # The newest checkpoint, or the initial parameters when there is none yet.
                state, _, _ = start_state(model_config, optimizer, mesh, run, config.seed, ckpt)
                data_offset = position + 1 - restored  # go on right after the offending batches
                bar.write(f"step {failed_at}: {bad_streak} non-finite steps in a row; rolled back to step "
                          f"{restored}, the data moves on to position {position + 1} (rollback "
                          f"{rollbacks} of at most {run.max_rollbacks})")
                step, bad_streak = restored, 0
                bar.reset(total=config.steps)
                bar.update(step)
                batches.close()  # stops its prefetch thread
                batches = train_data.iterate(step + data_offset)
                if logger:
                    logger.restart(step)
                    logger.write({"step": step, "event": "rollback", "from_step": failed_at, "time": time.time()})
                continue
            if in_flight:  # ran ahead: the state is a step past what was read
                continue
            if evaluates_at(step):
                with times("eval"):
                    record = {k: v for evaluate in evaluations for k, v in evaluate(state.model).items()}
                if logger and record:
                    logger.write({"step": step, **record})
                    bar.write(f"step {step:>7} | " + " | ".join(
                        f"{'held-out loss' if k == 'eval_loss' else k} {v:.4f}" for k, v in record.items()))
            if stopping:
                started = time.perf_counter()
                save(step)
                ckpt.wait()
                guard.saved_all()
                if primary:
                    bar.write(f"stop requested (SIGTERM/SIGINT): checkpoint of step {step} written to "
                              f"{run.output_dir} in {time.perf_counter() - started:.1f} s; the same "
                              "command resumes from it")
                return
            if saves_at(step):
                with times("checkpoint"):
                    save(step)
        ckpt.wait()
        guard.saved_all()
        if logger:
            logger.plot(os.path.join(run.metrics_dir, "loss.png"), f"julian {title}")
    finally:
        profile.close()
        batches.close()
        bar.close()
        guard.close()
        ckpt.close()
        if logger:
            logger.close(failed=sys.exc_info()[0] is not None)
    if primary:
        if summary := logger.summary():
            print(summary)
        print(f"{title} done: step {step} saved to {run.output_dir} (metrics and loss curve in {run.metrics_dir})")


# --- The command line --------------------------------------------------------------------------

def configs_from_flags() -> tuple[ModelConfig, TrainConfig, RunConfig]:
    model_config = ModelConfig(
        vocab_size=FLAGS.vocab_size, d_model=FLAGS.d_model, n_layers=FLAGS.n_layers,
        n_heads=FLAGS.n_heads, n_kv_heads=FLAGS.n_kv_heads, tie_embeddings=FLAGS.tie_embeddings,
        d_ff=FLAGS.d_ff, max_seq_len=FLAGS.seq_len, rope_theta=FLAGS.rope_theta,
        rope_scaling=rope_scaling_flag(FLAGS.rope_scaling), norm_eps=FLAGS.norm_eps, dropout=FLAGS.dropout,
        dtype=FLAGS.dtype, scan_layers=FLAGS.scan_layers, remat=FLAGS.remat, attention=FLAGS.attention)
    train_config = TrainConfig(
        steps=FLAGS.steps, batch_size=FLAGS.batch_size, grad_accum=FLAGS.grad_accum,
        learning_rate=FLAGS.learning_rate, min_lr_ratio=FLAGS.min_lr_ratio,
        warmup_steps=FLAGS.warmup_steps, weight_decay=FLAGS.weight_decay, beta1=FLAGS.beta1,
        beta2=FLAGS.beta2, adam_eps=FLAGS.adam_eps, grad_clip=FLAGS.grad_clip,
        opt_state_dtype=FLAGS.opt_state_dtype, seed=FLAGS.seed)
    output_dir = FLAGS.output_dir
    metrics_dir = FLAGS.metrics_dir or (os.path.join("runs", output_dir.rstrip("/").rsplit("/", 1)[-1])
                                if "://" in output_dir else output_dir)
    for name in ("checkpoint_every", "keep", "log_every", "max_bad_steps"):
        if FLAGS[name].value < 1:
            raise ValueError(f"--{name}={FLAGS[name].value} must be at least 1")
    run = RunConfig(
        output_dir=output_dir, metrics_dir=metrics_dir, fsdp=FLAGS.fsdp, checkpoint_every=FLAGS.checkpoint_every,
        keep=FLAGS.keep, keep_every=FLAGS.keep_every, init_from=FLAGS.init_from,
        max_bad_steps=FLAGS.max_bad_steps, max_rollbacks=FLAGS.max_rollbacks, log_every=FLAGS.log_every,
        eval_every=FLAGS.eval_every, eval_batches=FLAGS.eval_batches, eval_tasks=tuple(FLAGS.eval_tasks),
        eval_data_dir=FLAGS.eval_data_dir, eval_limit=FLAGS.eval_limit, peak_tflops=FLAGS.peak_tflops,
        test_nan_batches=tuple(int(s) for s in FLAGS.test_nan_batches),
        test_sigkill_during_save=FLAGS.test_sigkill_during_save,
        profile=runlog.profile_config(FLAGS.profile_steps, FLAGS.profile_dir or os.path.join(metrics_dir, "profile"),
                                      FLAGS.profile_all_hosts),
        wandb=WandbConfig(FLAGS.wandb_project, FLAGS.wandb_entity, FLAGS.wandb_run_name) if FLAGS.wandb_project else None)
    return model_config, train_config, run


def rope_scaling_flag(values: list[str] | None) -> tuple[float, float, float, int] | None:
    if not values:
        return None
    try:
        factor, low, high, original = values
        return float(factor), float(low), float(high), int(original)
    except ValueError:
        raise ValueError(f"--rope_scaling={','.join(values)}: expected four numbers, factor,low_freq_factor,"
                         "high_freq_factor,original_max_position_embeddings (e.g. 32,1,4,8192)") from None


# Model flags and the ModelConfig fields they set.
MODEL_FLAGS = {"vocab_size": "vocab_size", "d_model": "d_model", "n_layers": "n_layers", "n_heads": "n_heads",
               "n_kv_heads": "n_kv_heads", "tie_embeddings": "tie_embeddings", "d_ff": "d_ff",
               "seq_len": "max_seq_len", "rope_theta": "rope_theta", "rope_scaling": "rope_scaling",
               "norm_eps": "norm_eps"}


def init_from_model(init_from: str, from_flags: ModelConfig, given: set[str]) -> tuple[ModelConfig, bytes, dict]:
    """(model config, tokenizer bytes, config dict) of --init_from (a checkpoint, or a Hugging Face
    folder it imports): its weights' shape with this run's execution settings. A model flag given
    on the command line (`given`) must agree with it."""
    saved, tokenizer_bytes = checkpoint.load_config(init_from)
    execution = {name: getattr(from_flags, name) for name in checkpoint.EXECUTION_FIELDS}
    model_config = dataclasses.replace(ModelConfig(**saved["model"]), **execution)
    # --seq_len is the rows' length here (open_data's seq_len): at most the context, which stays.
    stated = dataclasses.replace(model_config, **{MODEL_FLAGS[f]: getattr(from_flags, MODEL_FLAGS[f])
                                                  for f in given if f in MODEL_FLAGS and f != "seq_len"})
    if "seq_len" in given and from_flags.max_seq_len > model_config.max_seq_len:
        raise ValueError(f"--seq_len={from_flags.max_seq_len} exceeds the context of --init_from={init_from} "
                         f"({model_config.max_seq_len} tokens)")
    mismatch = checkpoint.config_mismatch(dataclasses.asdict(model_config), stated)
    if mismatch:
        raise ValueError(f"--init_from={init_from} holds a different model ({mismatch}): drop the flag, "
                         "the model's shape comes from --init_from")
    return model_config, tokenizer_bytes, saved


def resolved_config(model_config: ModelConfig, config: TrainConfig, run: RunConfig, **more) -> dict:
    return {"model": dataclasses.asdict(model_config), "train": dataclasses.asdict(config),
            "run": dataclasses.asdict(run), **more}


def load_tokenizer(path: str | None, vocab_size: int) -> Tokenizer:
    if not path:
        raise ValueError("--tokenizer is required: a SentencePiece .model (see tokenizer.py), or a Hugging Face "
                         "tokenizer.json or its folder")
    try:
        tokenizer = Tokenizer.load(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--tokenizer: {e}") from None
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(
            f"--tokenizer={path} has {tokenizer.vocab_size} pieces but --vocab_size={vocab_size}: "
            "expected them to match (set --vocab_size to the tokenizer's size)")
    return tokenizer


def init_tokenizer(path: str | None, init_from: str, tokenizer_bytes: bytes) -> Tokenizer:
    """--init_from's tokenizer, the one its embeddings were trained with; --tokenizer, when
    given, must be the same."""
    tokenizer = Tokenizer.from_bytes(tokenizer_bytes)
    if path:
        try:
            given = Tokenizer.load(path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--tokenizer: {e}") from None
        if given.model_bytes != tokenizer_bytes:
            raise ValueError(f"--tokenizer={path} ({given.vocab_size} pieces) is not the tokenizer of "
                             f"--init_from={init_from} ({tokenizer.vocab_size} pieces): expected the same one, "
                             "or no --tokenizer (the checkpoint's is used)")
    return tokenizer


def open_data(spec: str, split: str, tokenizer: Tokenizer, model_config: ModelConfig,
              config: TrainConfig, batch_size: int | None = None, grad_accum: int | None = None,
              seq_len: int | None = None):
    """Batches of rows of `seq_len` tokens (default: the model's context) from `spec`."""
    return stream.open_train_data(
        spec, tokenizer=tokenizer, seq_len=seq_len or model_config.max_seq_len, seed=config.seed,
        global_batch_size=batch_size or config.batch_size, grad_accum=grad_accum or config.grad_accum,
        process_index=jax.process_index(), process_count=jax.process_count(), split=split)


def main(argv):
    del argv
    checkpoint.quiet_logging(FLAGS["verbosity"].present)
    checkpoint.use_compilation_cache(FLAGS.compilation_cache_dir)
    if FLAGS.dry_run and FLAGS.hardware:
        budget.prepare_host(FLAGS.hardware)
    try:
        model_config, config, run = configs_from_flags()
        if FLAGS.dry_run:
            return dry_run(model_config, config, run.fsdp, FLAGS.hardware, FLAGS.assumed_mfu, FLAGS.peak_tflops)
        initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        check_batch(config.batch_size, config.grad_accum, jax.device_count())
        more, seq_len = {}, None
        if run.init_from:
            seq_len = model_config.max_seq_len if FLAGS["seq_len"].present else None
            model_config, tokenizer_bytes, saved = init_from_model(
                run.init_from, model_config, {name for name in MODEL_FLAGS if FLAGS[name].present})
            tokenizer = init_tokenizer(FLAGS.tokenizer, run.init_from, tokenizer_bytes)
            more = {checkpoint.IMPORTED: imported} if (imported := checkpoint.imported_of(saved)) else {}
        else:
            tokenizer = load_tokenizer(FLAGS.tokenizer, model_config.vocab_size)
        if not FLAGS.train_data:
            raise ValueError("--train_data is required: a shard manifest (data.py prepare) or text files")
        train_data = open_data(FLAGS.train_data, "train", tokenizer, model_config, config, seq_len=seq_len)
        validation_data = None
        if FLAGS.eval_every:
            validation_data = open_data(FLAGS.validation_data or FLAGS.train_data,
                                        "validation", tokenizer, model_config, config, seq_len=seq_len)
        fit(model_config, config, run, train_data,
            evaluators(run, make_mesh(run.fsdp), validation_data, tokenizer.model_bytes), tokenizer.model_bytes,
            resolved_config(model_config, config, run, tokenizer=FLAGS.tokenizer, train_data=FLAGS.train_data, **more))
    except TrainingStopped as e:
        sys.exit(f"train.py: training stopped: {e}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
