"""Pretrain a Julian model.

    python train.py --flagfile=configs/tiny.flags --tokenizer=tok.model --train_data=data/a.txt

One jitted step does everything between two optimizer updates: `lax.scan` over micro-batches
(gradient accumulation), AdamW with decoupled weight decay, global-norm clipping, and a warmup +
cosine learning rate. The global batch is split over all devices along the mesh's "data" axis;
parameters and optimizer state are replicated (the report's setup).

Outputs in --output_dir: Orbax checkpoint step directories (see checkpoint.py), metrics.jsonl (one
object per logged step), config.json (the resolved run), loss.png.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Float, Int, PRNGKeyArray
from tqdm import tqdm

import checkpoint
from data import TokenRecords
from model import ModelConfig, Transformer, cross_entropy, flops_per_token, num_params
from tokenizer import Tokenizer

# bf16 dense TFLOP/s per chip, from vendor spec sheets.
PEAK_TFLOPS = {"TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
               "TPU v6 lite": 918.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}
# Named pods for --dry_run: (chips, peak TFLOP/s per chip). A v4-32 has 16 chips (32 cores).
HARDWARE = {"v4-8": (4, 275.0), "v4-32": (16, 275.0), "v5e-16": (16, 197.0),
            "v5p-32": (16, 459.0), "1xH100": (1, 989.0), "8xH100": (8, 989.0)}

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defined on demand, not at import: other scripts and the tests import this file."""
    # Model shape (configs/*.flags hold the report's three sizes).
    flags.DEFINE_integer("vocab_size", 50_000, "Vocabulary size; must equal the tokenizer's.")
    flags.DEFINE_integer("d_model", 1280, "Width of the residual stream.")
    flags.DEFINE_integer("n_layers", 18, "Number of transformer blocks.")
    flags.DEFINE_integer("n_heads", 20, "Attention heads; must divide d_model (head dim 64 in the report).")
    flags.DEFINE_integer("d_ff", 5120, "Hidden width of the SwiGLU MLP.")
    flags.DEFINE_integer("seq_len", 2048, "Training sequence length, and the model's context length.")
    flags.DEFINE_float("rope_theta", 10_000.0, "Rotary embedding base.")
    flags.DEFINE_float("norm_eps", 1e-6, "RMSNorm epsilon.")
    flags.DEFINE_float("dropout", 0.0, "Residual dropout (the report's table says 0.1).")
    flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Activation and matmul dtype.")
    flags.DEFINE_bool("scan_layers", True, "lax.scan over layers (fast compile) instead of unrolling.")
    flags.DEFINE_enum("remat", "none", ["none", "full", "dots"], "Rematerialize activations per block.")
    flags.DEFINE_enum("attention", "einsum", ["einsum", "dot_product"],
                      "einsum, or jax.nn.dot_product_attention (cuDNN flash attention on GPU).")
    # Data.
    flags.DEFINE_string("tokenizer", None, "SentencePiece model (tokenizer.py writes one).")
    flags.DEFINE_list("train_data", [], "Text files, one document per line.")
    # Optimization (defaults: the report's).
    flags.DEFINE_integer("steps", 300_000, "Optimizer steps.")
    flags.DEFINE_integer("batch_size", 64, "Global batch, in sequences per optimizer step.")
    flags.DEFINE_integer("grad_accum", 1, "Micro-batches per step (batch_size must divide evenly).")
    flags.DEFINE_float("learning_rate", 1.2e-3, "Peak learning rate.")
    flags.DEFINE_float("min_lr_ratio", 0.1, "Cosine decay ends at learning_rate * min_lr_ratio.")
    flags.DEFINE_integer("warmup_steps", 3000, "Linear warmup steps from 0 to the peak.")
    flags.DEFINE_float("weight_decay", 0.1, "AdamW weight decay (matmul weights only).")
    flags.DEFINE_float("beta1", 0.9, "AdamW beta1.")
    flags.DEFINE_float("beta2", 0.95, "AdamW beta2.")
    flags.DEFINE_float("adam_eps", 1e-8, "AdamW epsilon.")
    flags.DEFINE_float("grad_clip", 1.0, "Global gradient norm clip.")
    # Run.
    flags.DEFINE_string("output_dir", "runs/default", "Checkpoints, metrics.jsonl, loss.png.")
    flags.DEFINE_integer("seed", 0, "Seeds initialization, data order and dropout.")
    flags.DEFINE_integer("log_every", 10, "Steps between log lines.")
    flags.DEFINE_bool("dry_run", False, "Print sizes, compiled memory and compute budget; train nothing.")
    flags.DEFINE_enum("hardware", "", ["", *HARDWARE],
                      "--dry_run on a CPU as if on this pod: memory per chip and the time estimate.")
    flags.DEFINE_float("assumed_mfu", 0.4, "For --dry_run's time estimate.")
    flags.DEFINE_float("peak_tflops", 0.0,
                       "bf16 peak TFLOP/s per device for MFU; 0 looks the chip up (CPU: measured at start).")



@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    grad_accum: int = 1
    learning_rate: float = 1.2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 3000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.batch_size % self.grad_accum:
            raise ValueError(f"--batch_size={self.batch_size} is not divisible by "
                             f"--grad_accum={self.grad_accum}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"--warmup_steps={self.warmup_steps} must be in [0, --steps={self.steps})")


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    # 1) linear warmup from 0 avoids early Adam steps on noisy moment estimates;
    # 2) cosine decay to min_lr_ratio of the peak, as the report does (1.2e-3 -> 1.2e-4).
    return optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup_steps, config.steps,
        end_value=config.learning_rate * config.min_lr_ratio)


def decay_mask(model: Transformer) -> Transformer:
    """True for the matmul weights. Norm gains and the input embedding are not decayed: a gain
    decayed toward 0 fights the normalization, and embedding rows of rare tokens would shrink
    merely for being rarely seen. The untied output projection is a matmul and is decayed."""
    mask = jax.tree.map(lambda _: False, model)
    weights = lambda m: (m.blocks.attn.wq, m.blocks.attn.wk, m.blocks.attn.wv, m.blocks.attn.wo,
                         m.blocks.mlp.w_gate, m.blocks.mlp.w_up, m.blocks.mlp.w_down, m.lm_head)
    return eqx.tree_at(weights, mask, replace=(True,) * 8)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(learning_rate_schedule(config), b1=config.beta1, b2=config.beta2,
                    eps=config.adam_eps, weight_decay=config.weight_decay, mask=decay_mask),
    )


class TrainState(eqx.Module):
    model: Transformer
    opt_state: optax.OptState
    step: Int[Array, ""]


def init_state(model_config: ModelConfig, optimizer: optax.GradientTransformation,
               key: PRNGKeyArray) -> TrainState:
    model = Transformer(model_config, key)
    return TrainState(model, optimizer.init(model), jnp.zeros((), jnp.int32))


def make_train_step(optimizer: optax.GradientTransformation):
    """The jitted update: (state, tokens[accum, micro, seq+1], key) -> (state, metrics)."""

    def loss_fn(model: Transformer, tokens: Int[Array, "micro seq_plus_1"], key: PRNGKeyArray
                ) -> Float[Array, ""]:
        logits = model(tokens[:, :-1], key=key if model.config.dropout else None)
        return cross_entropy(logits, tokens[:, 1:], jnp.ones(tokens[:, 1:].shape, jnp.float32))

    def train_step(state: TrainState, tokens: Int[Array, "accum micro seq_plus_1"], key: PRNGKeyArray):
        def accumulate(carry, micro):
            loss, grads = jax.value_and_grad(loss_fn)(state.model, *micro)
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, (jnp.zeros((), jnp.float32), state.model))
        keys = jax.random.split(key, tokens.shape[0])
        (loss, grads), _ = jax.lax.scan(accumulate, zeros, (tokens, keys))
        loss, grads = jax.tree.map(lambda x: x / tokens.shape[0], (loss, grads))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.model)
        model = optax.apply_updates(state.model, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
        return TrainState(model, opt_state, state.step + 1), metrics

    return jax.jit(train_step, donate_argnums=0)


def measure_matmul_flops(shapes: Sequence[tuple[int, int, int]], repeats: int = 3) -> float:
    """Best bf16 x bf16 -> f32 FLOP/s of the default device over (m, k, n) matmul shapes.

    The MFU denominator where no spec sheet applies: CPUs differ by 10x (with AMX or without),
    and a CPU reaches its best on shapes like the model's, not on large squares.
    """
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    best = float("inf")
    for m, k, n in shapes:
        a, b = jnp.ones((m, k), jnp.bfloat16), jnp.ones((k, n), jnp.bfloat16)
        matmul(a, b).block_until_ready()
        for _ in range(repeats):
            start = time.perf_counter()
            matmul(a, b).block_until_ready()
            best = min(best, (time.perf_counter() - start) / (2 * m * k * n))
    return 1 / best


def device_peak_flops(model_config: ModelConfig, tokens: int, peak_tflops: float = 0.0) -> float:
    """Peak bf16 FLOP/s of all devices together, for MFU; `peak_tflops` per device overrides.

    On a CPU it is measured on the MLP's matmul shapes for a micro-batch of `tokens` tokens.
    """
    devices = jax.devices()
    if peak_tflops:
        return peak_tflops * 1e12 * len(devices)
    if devices[0].platform == "cpu":  # fake CPU devices share the same cores: one peak in all
        d, f = model_config.d_model, model_config.d_ff
        return measure_matmul_flops([(2048, 2048, 2048), (tokens, d, f), (tokens, f, d)])
    kind = devices[0].device_kind
    per_chip = next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
    if per_chip is None:
        raise app.UsageError(f"unknown peak FLOP/s for device {kind!r}: pass --peak_tflops")
    return per_chip * 1e12 * len(devices)


def dry_run(model_config: ModelConfig, config: TrainConfig, mesh: Mesh, hardware: str,
            assumed_mfu: float, peak_tflops: float) -> None:
    """Print parameter count, compiled per-device memory and the compute budget; allocate nothing.

    `hardware` names a pod in HARDWARE for the time estimate ("" for the devices at hand).
    """
    optimizer = make_optimizer(config)
    abstract_state = jax.eval_shape(lambda k: init_state(model_config, optimizer, k), jax.random.key(0))
    replicated = NamedSharding(mesh, P())
    abstract_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract_state)
    micro = config.batch_size // config.grad_accum
    tokens = jax.ShapeDtypeStruct((config.grad_accum, micro, model_config.max_seq_len + 1), jnp.int32,
                                  sharding=NamedSharding(mesh, P(None, "data")))
    compiled = make_train_step(optimizer).lower(abstract_state, tokens, jax.random.key(0)).compile()
    memory = compiled.memory_analysis()

    n = num_params(model_config)
    tokens_per_step = config.batch_size * model_config.max_seq_len
    total_flops = flops_per_token(model_config, model_config.max_seq_len) * tokens_per_step * config.steps
    if hardware:
        chips, tflops = HARDWARE[hardware]
        where, peak = f"{hardware} ({chips} chips x {tflops:g} TFLOP/s)", chips * tflops * 1e12
    else:
        where = f"{len(mesh.devices.flat)} x {jax.devices()[0].device_kind}"
        peak = device_peak_flops(model_config, micro * model_config.max_seq_len, peak_tflops)
    days = total_flops / (peak * assumed_mfu) / 86400
    gib = lambda b: f"{b / 2**30:.2f} GiB"
    rows = [
        ("parameters", f"{n:,}"),
        ("per-device memory: arguments", gib(memory.argument_size_in_bytes)),
        ("per-device memory: outputs", gib(memory.output_size_in_bytes)),
        ("per-device memory: temporaries", gib(memory.temp_size_in_bytes)),
        ("per-device memory: code", gib(memory.generated_code_size_in_bytes)),
        ("tokens per step", f"{tokens_per_step:,} ({config.batch_size} x {model_config.max_seq_len})"),
        ("training tokens", f"{tokens_per_step * config.steps:,} ({config.steps:,} steps)"),
        ("FLOPs (6N + attention)", f"{total_flops:.3g}"),
        (f"time at {assumed_mfu:.0%} MFU on {where}", f"{days:.2f} days"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


class IntervalLogger:
    """Every `every` steps: one console line and one metrics.jsonl record (step, loss, lr, grad
    norm, tokens/s, MFU, ETA). Metrics stay on device until then, so logging adds no sync per step;
    the clock starts after the first step, which includes compilation."""

    def __init__(self, path: str, every: int, steps: int, schedule: optax.Schedule,
                 tokens_per_step: int, flops_per_step: float, peak_flops: float):
        self.file = open(path, "w")
        self.every, self.steps, self.schedule = every, steps, schedule
        self.tokens_per_step, self.flops_per_step, self.peak_flops = tokens_per_step, flops_per_step, peak_flops
        self.pending: list[dict] = []
        self.clock, self.clock_step = 0.0, 0

    def log(self, step: int, metrics: dict) -> str | None:
        """Record step `step`'s metrics; return the log line when an interval ends."""
        self.pending.append(metrics)
        if step == 0:
            jax.block_until_ready(metrics)
            self.clock, self.clock_step = time.perf_counter(), 1
        if (step + 1) % self.every and step + 1 != self.steps:
            return None
        fetched = jax.device_get(self.pending)
        now, timed = time.perf_counter(), step + 1 - self.clock_step
        seconds_per_step = (now - self.clock) / timed if timed else float("nan")
        record = {"step": step + 1,
                  "loss": float(np.mean([m["loss"] for m in fetched])),
                  "grad_norm": float(fetched[-1]["grad_norm"]),
                  "lr": float(self.schedule(step)),
                  "tokens_per_s": self.tokens_per_step / seconds_per_step,
                  "mfu": self.flops_per_step / seconds_per_step / self.peak_flops,
                  "eta_s": seconds_per_step * (self.steps - step - 1)}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.pending, self.clock, self.clock_step = [], now, step + 1
        return (f"step {record['step']:>7} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                f"grad norm {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s | "
                f"MFU {record['mfu']:.1%} | ETA {record['eta_s'] / 60:.1f} min")

    def close(self) -> None:
        self.file.close()


def plot_loss(metrics_path: str, png_path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_path) as f:
        records = [json.loads(line) for line in f]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records])
    ax.set(xlabel="step", ylabel="training loss", title="julian pretraining")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def configs_from_flags() -> tuple[ModelConfig, TrainConfig]:
    model_config = ModelConfig(
        vocab_size=FLAGS.vocab_size, d_model=FLAGS.d_model, n_layers=FLAGS.n_layers,
        n_heads=FLAGS.n_heads, d_ff=FLAGS.d_ff, max_seq_len=FLAGS.seq_len, rope_theta=FLAGS.rope_theta,
        norm_eps=FLAGS.norm_eps, dropout=FLAGS.dropout, dtype=FLAGS.dtype,
        scan_layers=FLAGS.scan_layers, remat=FLAGS.remat, attention=FLAGS.attention)
    train_config = TrainConfig(
        steps=FLAGS.steps, batch_size=FLAGS.batch_size, grad_accum=FLAGS.grad_accum,
        learning_rate=FLAGS.learning_rate, min_lr_ratio=FLAGS.min_lr_ratio,
        warmup_steps=FLAGS.warmup_steps, weight_decay=FLAGS.weight_decay, beta1=FLAGS.beta1,
        beta2=FLAGS.beta2, adam_eps=FLAGS.adam_eps, grad_clip=FLAGS.grad_clip, seed=FLAGS.seed)
    return model_config, train_config


def load_tokenizer(path: str | None, vocab_size: int) -> Tokenizer:
    if not path:
        raise app.UsageError("--tokenizer is required: a SentencePiece .model (see tokenizer.py)")
    tokenizer = Tokenizer.load(path)
    if tokenizer.vocab_size != vocab_size:
        raise app.UsageError(
            f"--tokenizer={path} has {tokenizer.vocab_size} pieces but --vocab_size={vocab_size}: "
            "expected them to match (set --vocab_size to the tokenizer's size)")
    return tokenizer


def main(argv):
    del argv
    checkpoint.quiet_logging(FLAGS["verbosity"].present)
    try:
        model_config, config = configs_from_flags()
    except ValueError as e:  # a flag combination the configs refuse: say which, without a traceback
        raise app.UsageError(str(e)) from e
    if FLAGS.dry_run and FLAGS.hardware:
        # On a CPU, fake the named pod's chips so the batch splits and memory is per chip.
        jax.config.update("jax_num_cpu_devices", HARDWARE[FLAGS.hardware][0])
    mesh = Mesh(np.array(jax.devices()), ("data",))
    if FLAGS.dry_run:
        return dry_run(model_config, config, mesh, FLAGS.hardware, FLAGS.assumed_mfu, FLAGS.peak_tflops)

    tokenizer = load_tokenizer(FLAGS.tokenizer, model_config.vocab_size)
    if not FLAGS.train_data:
        raise app.UsageError("--train_data is required: comma-separated text files")
    try:
        records = TokenRecords(FLAGS.train_data, tokenizer, model_config.max_seq_len, config.seed)
    except (FileNotFoundError, ValueError) as e:
        raise app.UsageError(str(e)) from e
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    run_config = {"model": dataclasses.asdict(model_config), "train": dataclasses.asdict(config),
                  "tokenizer": FLAGS.tokenizer, "train_data": FLAGS.train_data}
    with open(os.path.join(FLAGS.output_dir, "config.json"), "w") as f:
        json.dump(run_config, f, indent=2)

    optimizer = make_optimizer(config)
    key = jax.random.key(config.seed)
    # Parameters and optimizer state replicated; the batch split over all devices.
    state = jax.device_put(init_state(model_config, optimizer, key), NamedSharding(mesh, P()))
    batch_sharding = NamedSharding(mesh, P(None, "data"))
    train_step = make_train_step(optimizer)
    micro = config.batch_size // config.grad_accum
    tokens_per_step = config.batch_size * model_config.max_seq_len
    peak = device_peak_flops(model_config, micro * model_config.max_seq_len, FLAGS.peak_tflops)
    print(f"{num_params(model_config):,} parameters | {records.num_tokens:,} training tokens | "
          f"{tokens_per_step:,} tokens per step | {len(jax.devices())} devices | "
          f"peak {peak / 1e12:.2f} TFLOP/s for MFU")
    metrics_path = os.path.join(FLAGS.output_dir, "metrics.jsonl")
    logger = IntervalLogger(metrics_path, FLAGS.log_every, config.steps, learning_rate_schedule(config),
                            tokens_per_step, flops_per_token(model_config, model_config.max_seq_len)
                            * tokens_per_step, peak)

    for step in tqdm(range(config.steps), disable=None):
        batch = records.batch(step, config.batch_size).reshape(config.grad_accum, micro, -1)
        state, metrics = train_step(state, jax.device_put(batch, batch_sharding),
                                    jax.random.fold_in(key, step))
        if line := logger.log(step, metrics):
            tqdm.write(line)
    logger.close()

    checkpoint.save(FLAGS.output_dir, config.steps, state.model, tokenizer.model_bytes, run_config)
    plot_loss(metrics_path, os.path.join(FLAGS.output_dir, "loss.png"))
    print(f"saved step {config.steps} to {FLAGS.output_dir} (loss curve: loss.png)")


if __name__ == "__main__":
    define_flags()
    app.run(main)
