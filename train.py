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

To try another optimizer, change optim.py; to add a loss term, token_loss in train_step.py
(fit takes any loss function, as dpo.py's), where the jitted step and the held-out pass are.
Resume and --init_from are in resume.py, the mesh and shardings in parallel.py, the MFU peaks
and the dry run in budget.py, the logger, the loss plot, traces and W&B in runlog.py.
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

import jax
import jax.numpy as jnp
from absl import flags
from jax.sharding import Mesh
from tqdm import tqdm

import budget
import checkpoint
import cli
import runlog
import stream
from budget import HARDWARE, device_peak_flops
from layer_ops import ATTENTION_IMPLS
from model import REMAT_POLICIES, ModelConfig, flops_per_token, num_params
from optim import TrainConfig, make_optimizer
from parallel import check_batch, global_batch, initialize_distributed, make_mesh, shardings, stop_votes
from resume import MODEL_FLAGS, init_from_model, init_tokenizer, start_state, steps_left
from runlog import (IntervalLogger, PhaseTimes, ProfileConfig, ProfileWindow, WandbConfig, check_writable,
                    keep_metrics_until, open_wandb)
from train_step import Evaluator, LossFn, TrainState, as_batch, dry_run, held_out_loss, make_train_step, token_loss
from tokenizer import Tokenizer
from tokenizer_files import open_tokenizer, tokenizer_from_bytes


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
    profile: ProfileConfig | None = None
    wandb: WandbConfig | None = None


def injected_faults() -> tuple[frozenset[int], int]:
    """Test-only fault injection, read here and nowhere else: tests/test_train.py sets these to
    drive rollback and a save cut short through the real code; a run never should.
    JULIAN_TEST_NAN_BATCHES: comma-separated data positions whose step gets a NaN loss injected.
    JULIAN_TEST_SIGKILL_DURING_SAVE: a step; the process SIGKILLs itself right after starting its save."""
    nan_batches = os.environ.get("JULIAN_TEST_NAN_BATCHES", "")
    return (frozenset(int(p) for p in nan_batches.split(",") if p),
            int(os.environ.get("JULIAN_TEST_SIGKILL_DURING_SAVE", "-1")))


# --- The run ---------------------------------------------------------------------------------------

class TrainingStopped(RuntimeError):
    """The run cannot go on (too many rollbacks); the message says what happened and where."""


def open_logger(model_config: ModelConfig, config: TrainConfig, run: RunConfig, train_data, run_config: dict,
                mesh: Mesh, title: str, how: str, peak: float, step: int) -> IntervalLogger:
    """The primary process's logger, once config.json is written, metrics.jsonl cut back to `step`
    and the run's first line printed; a resumed run's first record marks where it took over."""
    seq_len = getattr(train_data, "seq_len", model_config.max_seq_len)  # SFT rows may be shorter
    tokens_per_step = config.batch_size * getattr(train_data, "sequences_per_row", 1) * seq_len
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
    return logger


class Loop:
    """What fit's loop carries from step to step, and what it does between the steps: read their
    metrics (the skipped-step streak, the stop vote, the log), roll back, evaluate, save, stop.

    `step`, `data_offset`, `rollbacks` and `rng` are what a checkpoint's meta holds: the batch of
    step s is the data's batch s + data_offset. `in_flight` holds the steps dispatched but not yet
    read, (step, data position, metrics): the loop runs one step ahead (fit says why)."""

    def __init__(self, state: TrainState, meta: dict, run: RunConfig, steps: int, train_data,
                 ckpt: checkpoint.Checkpointer, logger: IntervalLogger | None, run_config: dict,
                 tokenizer_bytes: bytes, primary: bool, title: str):
        self.state, self.step, self.data_offset = state, meta["step"], meta["data_offset"]
        self.rollbacks, self.rng, self.bad_streak, self.skipped = meta["rollbacks"], meta["rng"], 0, 0
        self.run, self.steps, self.train_data, self.ckpt, self.logger = run, steps, train_data, ckpt, logger
        self.run_config, self.tokenizer_bytes, self.primary, self.title = run_config, tokenizer_bytes, primary, title
        self.nan_batches, self.sigkill_during_save = injected_faults()
        self.stopping, self.in_flight = False, collections.deque()
        self.guard, self.times = checkpoint.PreemptionGuard(), PhaseTimes()
        self.profile = ProfileWindow(run.profile, self.step, primary)
        self.batches = train_data.iterate(self.step + self.data_offset)
        self.bar = tqdm(initial=self.step, total=steps, disable=None if primary else True, desc=title)

    def read_metrics(self, wait: bool) -> tuple[int, int] | None:
        """Read the steps in flight: all of them when stopping or when `wait` (a save or an
        evaluation needs the newest step's state), else all but the newest. Return (step, data
        position) of the step that ends --max_bad_steps skipped steps in a row, if one does."""
        while len(self.in_flight) > (0 if self.stopping or wait else 1):
            done, position, metrics = self.in_flight.popleft()
            with self.times("step"):  # the device's time not hidden behind the next step's dispatch
                metrics = jax.device_get(metrics)
            self.bar.update()
            self.bad_streak = self.bad_streak + 1 if metrics["skipped"] else 0
            self.skipped += bool(metrics["skipped"])
            if self.bad_streak >= self.run.max_bad_steps:
                return done, position
            self.stopping = self.stopping or bool(metrics["stop"])
            if self.logger:
                extra = {"skipped_steps": self.skipped, "rollbacks": self.rollbacks}
                if hasattr(self.train_data, "epoch"):
                    extra["epoch"] = float(self.train_data.epoch(position))
                if line := self.logger.log(done, metrics, self.times, extra, last=self.stopping and not self.in_flight):
                    self.bar.write(line)
        return None

    def roll_back(self, failed_at: int, position: int, restore: Callable[[], tuple[TrainState, dict, str]]) -> None:
        """Back to the newest checkpoint (`restore`: start_state, the initial state when there is
        none yet) after the bad streak that ended at step `failed_at`, on data `position`; the
        data goes on right after the offending batches. Past --max_rollbacks: TrainingStopped."""
        self.rollbacks += 1
        restored = self.ckpt.latest_step() or 0
        if self.rollbacks > self.run.max_rollbacks:
            raise TrainingStopped(
                f"{self.bad_streak} non-finite steps in a row ending at step {failed_at} (data positions "
                f"{position - self.bad_streak + 1}..{position}) after {self.rollbacks - 1} rollbacks "
                f"(--max_rollbacks={self.run.max_rollbacks}); the newest checkpoint is step {restored} "
                f"in {self.run.output_dir}. Look at those batches, or lower --learning_rate.")
        self.in_flight.clear()  # computed from the batches being skipped: dropped
        self.ckpt.wait()
        self.state = restore()[0]
        self.data_offset = position + 1 - restored
        self.bar.write(f"step {failed_at}: {self.bad_streak} non-finite steps in a row; rolled back to step "
                       f"{restored}, the data moves on to position {position + 1} (rollback "
                       f"{self.rollbacks} of at most {self.run.max_rollbacks})")
        self.step, self.bad_streak = restored, 0
        self.bar.reset(total=self.steps)
        self.bar.update(self.step)
        self.batches.close()  # stops its prefetch thread
        self.batches = self.train_data.iterate(self.step + self.data_offset)
        if self.logger:
            self.logger.restart(self.step)
            self.logger.write({"step": self.step, "event": "rollback", "from_step": failed_at, "time": time.time()})

    def evaluate(self, evaluations: Sequence[Evaluator]) -> None:
        with self.times("eval"):
            record = {k: v for evaluate in evaluations for k, v in evaluate(self.state.model).items()}
        if self.logger and record:
            self.logger.write({"step": self.step, **record})
            self.bar.write(f"step {self.step:>7} | " + " | ".join(
                f"{'held-out loss' if k == 'eval_loss' else k} {v:.4f}" for k, v in record.items()))

    def save(self) -> None:
        meta = {"data_offset": self.data_offset, "rollbacks": self.rollbacks, "rng": self.rng}
        self.ckpt.save(self.step, self.state.model, self.state.opt_state, meta, self.run_config, self.tokenizer_bytes)
        if self.step == self.sigkill_during_save:
            os.kill(os.getpid(), signal.SIGKILL)

    def stop(self) -> None:
        """Act on a stop vote (SIGTERM or SIGINT on some process): save this step and wait for it."""
        started = time.perf_counter()
        self.save()
        self.ckpt.wait()
        self.guard.saved_all()
        if self.primary:
            self.bar.write(f"stop requested (SIGTERM/SIGINT): checkpoint of step {self.step} written to "
                           f"{self.run.output_dir} in {time.perf_counter() - started:.1f} s; the same "
                           "command resumes from it")

    def finish(self) -> None:
        """After the last step: its checkpoint committed, the loss curve drawn."""
        self.ckpt.wait()
        self.guard.saved_all()
        if self.logger:
            self.logger.plot(os.path.join(self.run.metrics_dir, "loss.png"), f"julian {self.title}")

    def close(self) -> None:
        self.profile.close()
        self.batches.close()
        self.bar.close()
        self.guard.close()
        self.ckpt.close()
        if self.logger:
            self.logger.close(failed=sys.exc_info()[0] is not None)


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
    if not steps_left(ckpt, config.steps, run_config, title, primary):
        return
    restore = lambda: start_state(model_config, optimizer, mesh, run.init_from, config.seed, ckpt)
    state, meta, how = restore()
    train_step = make_train_step(optimizer, shardings(state), mesh, loss_fn, config)
    key = jax.random.wrap_key_data(jnp.asarray(meta["rng"], jnp.uint32))
    peak = device_peak_flops(run.peak_tflops, model_config.dtype)
    logger = open_logger(model_config, config, run, train_data, run_config, mesh, title, how, peak,
                         meta["step"]) if primary else None
    loop = Loop(state, meta, run, config.steps, train_data, ckpt, logger, run_config, tokenizer_bytes, primary, title)
    # The loop runs one step ahead: it dispatches step N+1 before it reads step N's metrics (the
    # stop vote, the skipped flag, the loss), so the host assembles and sends the next batch while
    # the chips compute. It waits for the step itself only where it needs the state of that step:
    # a checkpoint, an evaluation, the last step. A stop vote is therefore acted on one step late:
    # the checkpoint holds the step after the one that carried it.
    saves_at = lambda at: at % run.checkpoint_every == 0 or at == config.steps
    evaluates_at = lambda at: bool(run.eval_every) and (at % run.eval_every == 0 or at == config.steps)
    try:
        while loop.step < config.steps or loop.in_flight:
            if loop.step < config.steps and not loop.stopping:
                with loop.times("data_wait"):
                    position, rows = next(loop.batches)
                batch = global_batch(as_batch(rows), config.grad_accum, mesh)
                with loop.profile.step(loop.step), loop.times("step"):
                    loop.state, metrics = train_step(loop.state, batch, key, loop.step, position in loop.nan_batches,
                                                     stop_votes(loop.guard.requested, mesh))
                loop.step += 1
                loop.in_flight.append((loop.step, position, metrics))
            if failed := loop.read_metrics(wait=saves_at(loop.step) or evaluates_at(loop.step)):
                loop.roll_back(*failed, restore)
                continue
            if loop.in_flight:  # ran ahead: the state is a step past what was read
                continue
            if evaluates_at(loop.step):
                loop.evaluate(evaluations)
            if loop.stopping:
                loop.stop()
                return
            if saves_at(loop.step):
                with loop.times("checkpoint"):
                    loop.save()
        loop.finish()
    finally:
        loop.close()
    if primary:
        if summary := logger.summary():
            print(summary)
        print(f"{title} done: step {loop.step} saved to {run.output_dir} (metrics and loss curve in {run.metrics_dir})")


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


def resolved_config(model_config: ModelConfig, config: TrainConfig, run: RunConfig, **more) -> dict:
    return {"model": dataclasses.asdict(model_config), "train": dataclasses.asdict(config),
            "run": dataclasses.asdict(run), **more}


def load_tokenizer(path: str | None, vocab_size: int) -> Tokenizer:
    if not path:
        raise ValueError("--tokenizer is required: a SentencePiece .model (see tokenizer.py), or a Hugging Face "
                         "tokenizer.json or its folder")
    try:
        tokenizer = open_tokenizer(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--tokenizer: {e}") from None
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(
            f"--tokenizer={path} has {tokenizer.vocab_size} pieces but --vocab_size={vocab_size}: "
            "expected them to match (set --vocab_size to the tokenizer's size)")
    return tokenizer


def evaluators(run: RunConfig, mesh: Mesh, validation_data, tokenizer_bytes: bytes,
               loss_fn: LossFn = token_loss) -> list[Evaluator]:
    """What main() (here, in sft.py and dpo.py) hands fit: the held-out loss when there is
    validation data, and --eval_tasks' lm-eval scores (evaluate.py) when asked for."""
    out = [held_out_loss(validation_data, run.eval_batches, mesh, loss_fn)] if validation_data is not None else []
    if run.eval_tasks:
        import evaluate  # lm-eval takes seconds to import: only when asked for

        out.append(evaluate.benchmark_scorer(tokenizer_from_bytes(tokenizer_bytes), list(run.eval_tasks),
                                             run.eval_data_dir, run.eval_limit or None, mesh))
    return out


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
