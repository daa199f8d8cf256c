"""A DPO step against an SFT step at the same shapes, and the reference pass's cost.

    python benchmarks/dpo_speed.py                       # tiny shape, 8 pairs x 2 x 128 tokens
    python benchmarks/dpo_speed.py --d_model=512 --n_layers=8 --pairs=4 --length=256

Both steps are train_step.make_train_step on the same model and the same tokens: the SFT step reads
2 x pairs rows with token cross-entropy (train_step.token_loss), the DPO step reads the pairs
(chosen and rejected in one forward) with stored reference log-probabilities, and with
--ref_logps=online (one more forward per step). The reference pass is dpo.reference_logps over
the same pairs. Times are medians of the timed steps after warm-up steps (compilation).

Then an epoch over the bundled HH-RLHF pairs (first 200) at --packed_length, unpacked (each pair
two padded rows) against packed (`dpo.py --pack_pairs`: pairs share rows of 2 x length + 1
tokens with segment ids), with the same tokens per step: `pairs` pairs, or `pairs` packed rows.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import dpo  # noqa: E402
import optim  # noqa: E402
import pair_packing  # noqa: E402
import parallel  # noqa: E402
import train  # noqa: E402
import train_step  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from tokenizer import PAD_ID  # noqa: E402
from tokenizer_files import open_tokenizer  # noqa: E402

flags.DEFINE_integer("d_model", 192, "Model width (the tiny config's by default).")
flags.DEFINE_integer("n_layers", 4, "Blocks.")
flags.DEFINE_integer("vocab_size", 4096, "Vocabulary.")
flags.DEFINE_integer("pairs", 8, "Pairs per step (the SFT step reads twice as many rows).")
flags.DEFINE_integer("length", 128, "Tokens per sequence.")
flags.DEFINE_integer("steps", 5, "Timed steps.")
flags.DEFINE_integer("warmup", 2, "Untimed steps first (compilation).")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Activation dtype.")
flags.DEFINE_integer("packed_length", 512, "Also an epoch over the bundled HH-RLHF pairs at this "
                     "--max_length, unpacked against packed (--pack_pairs); 0: skip.")
FLAGS = flags.FLAGS


def timed(fn, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def train_step_seconds(model, batch: dict, loss_fn, mesh) -> float:
    optimizer = optim.make_optimizer(train.TrainConfig(steps=100, batch_size=len(batch["tokens"]), warmup_steps=1))
    state = train_step.TrainState(jax.tree.map(lambda x: x.copy(), model), optimizer.init(model))
    step = train_step.make_train_step(optimizer, parallel.shardings(state), mesh, loss_fn)
    global_batch = parallel.global_batch(batch, 1, mesh)
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], global_batch, jax.random.key(0), 0, False,
                                        parallel.stop_votes(False, mesh))
        return metrics["loss"]

    return timed(run, FLAGS.warmup, FLAGS.steps)


def packed_epoch(length: int, batch: int) -> None:
    """One epoch over the bundled pairs: `batch` pairs (2 x batch rows of length + 1) per step,
    against `batch` packed rows of 2 x length + 1 per step: the same tokens per step."""
    import tempfile

    from tokenizer import train_tokenizer

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    books = sorted(os.path.join(repo, "samples", n) for n in os.listdir(os.path.join(repo, "samples")) if n.endswith(".txt"))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = open_tokenizer(train_tokenizer(books, os.path.join(tmp, "tok"), vocab_size=FLAGS.vocab_size))
    pairs = os.path.join(repo, "samples", "preference", "en_hh_rlhf_harmless_test_pairs_first200.jsonl")
    config = ModelConfig(vocab_size=FLAGS.vocab_size, d_model=FLAGS.d_model, n_layers=FLAGS.n_layers,
                         n_heads=max(FLAGS.d_model // 64, 1), d_ff=4 * FLAGS.d_model, max_seq_len=2 * length,
                         dtype=FLAGS.dtype, scan_layers=True)
    model, mesh = Transformer(config, jax.random.key(0)), parallel.make_mesh(1)
    data = dpo.DataConfig((pairs,), length, length // 2)
    print(f"\nan epoch over {os.path.basename(pairs)} at --max_length={length}, {batch} pairs or packed rows per step:")
    print(f"{'layout':<10}{'rows':>7}{'real tokens':>13}{'s/step':>9}{'steps':>7}{'epoch s':>9}{'pairs/s':>9}")
    for name, config in (("unpacked", data), ("packed", dataclasses.replace(data, pack=2 * length + 1))):
        rows, _, stats = dpo.prepare(config, tokenizer)
        source = dpo.pair_batches(rows, dpo.reference_logps(model, rows, batch, mesh), 0, batch)
        seconds = train_step_seconds(model, source.batch(0), dpo.make_loss_fn(dpo.LossConfig()), mesh)
        real, epoch = (rows.tokens != PAD_ID).sum() / rows.tokens.size, seconds * source.num_batches
        print(f"{name:<10}{rows.num_rows:>7}{real:>13.1%}{seconds:>9.3f}{source.num_batches:>7}"
              f"{epoch:>9.1f}{sum(s.mixed for s in stats) / epoch:>9.1f}")


def main(argv):
    del argv
    config = ModelConfig(vocab_size=FLAGS.vocab_size, d_model=FLAGS.d_model, n_layers=FLAGS.n_layers,
                         n_heads=max(FLAGS.d_model // 64, 1), d_ff=4 * FLAGS.d_model, max_seq_len=FLAGS.length,
                         dtype=FLAGS.dtype, scan_layers=True)
    model = Transformer(config, jax.random.key(0))
    mesh = parallel.make_mesh(1)
    rng = np.random.default_rng(0)
    n, t = FLAGS.pairs, FLAGS.length
    tokens = rng.integers(8, config.vocab_size, (n, 2, t + 1)).astype(np.int32)
    reply = np.zeros((n, 2, t + 1), bool)
    reply[:, :, t // 2:] = True  # half prompt, half reply, as a typical pair
    rows = pair_packing.PairRows(tokens, reply)
    results = []

    start = time.perf_counter()
    ref = dpo.reference_logps(model, rows, n, mesh)
    first = time.perf_counter() - start
    ref_step = timed(lambda: dpo.reference_logps(model, rows, n, mesh), 0, FLAGS.steps)
    sft_batch = {"tokens": tokens.reshape(2 * n, t + 1), "weights": reply.reshape(2 * n, t + 1)[:, 1:].astype(np.float32)}
    dpo_batch = pair_packing.pair_arrays(rows, np.arange(n), ref)
    online_batch = {k: v for k, v in dpo_batch.items() if k != "reference_logps"}
    cases = [("SFT step (token loss)", sft_batch, train_step.token_loss),
             ("DPO step, stored reference", dpo_batch, dpo.make_loss_fn(dpo.LossConfig())),
             ("DPO step, online reference", online_batch, dpo.make_loss_fn(dpo.LossConfig(), model))]
    for name, batch, loss_fn in cases:
        results.append((name, train_step_seconds(model, batch, loss_fn, mesh)))
    results.append(("reference pass (forward only)", ref_step))

    print(f"model d={config.d_model} layers={config.n_layers} vocab={config.vocab_size} {config.dtype}; "
          f"{n} pairs = {2 * n} sequences x {t} tokens per step; {jax.devices()[0].device_kind}")
    print(f"{'what':<32}{'s/step':>10}{'pairs/s':>10}{'tokens/s':>12}")
    for name, seconds in results:
        print(f"{name:<32}{seconds:>10.3f}{n / seconds:>10.1f}{2 * n * t / seconds:>12,.0f}")
    print(f"reference pass incl. compilation: {first:.2f} s for {n} pairs")
    if FLAGS.packed_length:
        packed_epoch(FLAGS.packed_length, n)


if __name__ == "__main__":
    app.run(main)
