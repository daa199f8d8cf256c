"""Sample text from a julian checkpoint.

    python generate.py --checkpoint=runs/tiny --prompt="Sherlock Holmes" --max_new_tokens=60

A simple sampler: each new token re-runs the model over a fixed-size buffer (one compiled shape
for the whole generation), greedy at --temperature=0, else temperature with optional top-k and
top-p. (The evaluation issue adds a KV cache and chat.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jaxtyping import Array, Float, Int, PRNGKeyArray

import checkpoint
from model import Transformer
from tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defined on demand, not at import: other scripts and the tests import this file."""
    flags.DEFINE_string("checkpoint", None, "train.py --output_dir (newest step) to sample from.")
    flags.DEFINE_multi_string("prompt", ["The"], "Prompt text; repeat the flag for a batch of prompts.")
    flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
    flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 is greedy.")
    flags.DEFINE_integer("top_k", 0, "Keep only the k most likely tokens (0: all).")
    flags.DEFINE_float("top_p", 1.0, "Keep the smallest set of tokens whose probability reaches p.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_enum("dtype", "float32", ["bfloat16", "float32"], "Compute dtype for sampling.")



def sample_logits(logits: Float[Array, "batch vocab"], key: PRNGKeyArray, temperature: float,
                  top_k: int = 0, top_p: float = 1.0) -> Int[Array, " batch"]:
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep each token whose more likely predecessors hold less than top_p of the mass.
        kept = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < top_p, axis=-1)
        cutoff = jnp.take_along_axis(sorted_logits, kept[:, None] - 1, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


@jax.jit
def _next_logits(model: Transformer, buffer: Int[Array, "batch seq"], lengths: Int[Array, " batch"]
                 ) -> Float[Array, "batch vocab"]:
    # Causal attention: tokens after each row's length cannot change the position we read, and
    # only that position goes through the vocabulary-sized output projection.
    last = jnp.take_along_axis(model.hidden(buffer), (lengths - 1)[:, None, None], axis=1)
    return model.head(last)[:, 0]


def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, key: PRNGKeyArray,
             temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0,
             stop_ids: tuple[int, ...] = (EOS_ID,)) -> list[list[int]]:
    """New token ids for each prompt (a stop id ends a row and is not returned)."""
    longest = max(len(p) for p in prompts)
    size = longest + max_new_tokens
    if size > model.config.max_seq_len:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {model.config.max_seq_len}")
    buffer = np.full((len(prompts), size), PAD_ID, np.int32)
    for row, prompt in enumerate(prompts):
        buffer[row, : len(prompt)] = prompt
    lengths = np.array([len(p) for p in prompts])
    done = np.zeros(len(prompts), bool)
    out: list[list[int]] = [[] for _ in prompts]
    for step in range(max_new_tokens):
        logits = _next_logits(model, jnp.asarray(buffer), jnp.asarray(lengths))
        tokens = np.asarray(sample_logits(logits, jax.random.fold_in(key, step), temperature, top_k, top_p))
        for row, token in enumerate(tokens):
            if done[row]:
                continue
            if token in stop_ids:
                done[row] = True
                continue
            out[row].append(int(token))
            buffer[row, lengths[row]] = token
            lengths[row] += 1
        if done.all():
            break
    return out


def main(argv):
    del argv
    checkpoint.quiet_logging(FLAGS["verbosity"].present)
    if not FLAGS.checkpoint:
        raise app.UsageError("--checkpoint is required: a train.py --output_dir")
    model, tokenizer_bytes, _ = checkpoint.load(FLAGS.checkpoint, model_overrides={"dtype": FLAGS.dtype})
    tokenizer = Tokenizer.from_bytes(tokenizer_bytes)
    prompts = [[BOS_ID] + tokenizer.encode(p) for p in FLAGS.prompt]
    completions = generate(model, prompts, FLAGS.max_new_tokens, jax.random.key(FLAGS.seed),
                           FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
    for prompt, completion in zip(FLAGS.prompt, completions):
        print(f"{prompt}{tokenizer.decode(completion)}\n")


if __name__ == "__main__":
    define_flags()
    app.run(main)
