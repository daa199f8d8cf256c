"""Sample text from a julian checkpoint, or chat with it.

    python generate.py --checkpoint=runs/tiny --prompt="Sherlock Holmes" --max_new_tokens=60
    python generate.py --checkpoint=runs/sft --chat --prompt="Bonjour !"    # one reply
    python generate.py --checkpoint=runs/sft --chat                         # a conversation (REPL)

Decoding runs on the model's KV cache (model.py): one jitted prefill of the right-padded batch
of prompts, then a jitted device loop that decodes CHUNK tokens per call, updating the cache in
place (one host round trip per chunk, not per token), every shape static (prompts are padded to
16, 32 or a multiple of PAD_TO tokens, so a handful of shapes serves every prompt). Both run on
a per-layer copy of the weights (`Transformer.layers`, kept for the last model sampled from):
a step on the stacked weights copied each layer's slice before reading it. Greedy at
--temperature=0, else temperature with optional top-k and top-p. A row ends at a stop id (the
tokenizer's eos; in chat also its chat format's end of turn: <|im_end|>, Llama 3's <|eot_id|>) or
once its text contains a stop string, where it is cut.

A conversation is a document in the tokenizer's chat format (Tokenizer.chat_ids) up to the opening
of the assistant's turn: ours is <s> then ChatML; a Hugging Face model's is its chat template.
"""

from __future__ import annotations

import functools
import itertools
import sys
import weakref
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

import checkpoint
import cli
from model import Block, KVCache, Transformer, init_cache
from tokenizer import DEFAULT_SYSTEM, PAD_ID, Tokenizer
from tokenizer_files import tokenizer_from_bytes

FLAGS = flags.FLAGS
PAD_TO = 64  # prompt and cache lengths are rounded up to this: one compiled shape per bucket
# A shorter prompt pads to the first of these that holds it: the prefill runs every padded position,
# and padding a 10-token prompt to 64 cost as much as four decoding steps.
SHORT_PROMPTS = (16, 32)
CHUNK = 8  # tokens per device loop: what streaming shows at once; at most CHUNK - 1 wasted past a stop string


def define_flags() -> None:
    """Defined on demand, not at import: other scripts and the tests import this file."""
    flags.DEFINE_string("checkpoint", None, "train.py --output_dir (newest step) to sample from, or a Hugging "
                        "Face Llama folder (imported on the way in).")
    flags.DEFINE_multi_string("prompt", None, "Prompt text, one per prompt of the batch; with --chat, the "
                              "user's message (without it, --chat is interactive)")
    flags.DEFINE_boolean("chat", False, "Render the prompt as a user turn in the tokenizer's chat format and print the "
                         "assistant's reply; without --prompt, hold a conversation on stdin.")
    flags.DEFINE_string("system", DEFAULT_SYSTEM, "--chat: the system message ('' for none).")
    flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt (per reply in --chat).",
                         lower_bound=1)
    flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 is greedy.", lower_bound=0)
    flags.DEFINE_integer("top_k", 0, "Keep only the k most likely tokens (0: all).", lower_bound=0)
    flags.DEFINE_float("top_p", 1.0, "Keep the smallest set of tokens whose probability reaches p.",
                       lower_bound=0, upper_bound=1)
    flags.DEFINE_multi_string("stop", [], "Also stop a row where its text contains this string")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_string("compilation_cache_dir", None, checkpoint.COMPILATION_CACHE_HELP)
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


SAMPLING = ("temperature", "top_k", "top_p")


@functools.partial(jax.jit, static_argnames=("size", *SAMPLING))
def _prefill(model: Transformer, layers: tuple[Block, ...], prompts: Int[Array, "batch prompt"],
             lengths: Int[Array, " batch"], key: PRNGKeyArray, size: int, temperature: float, top_k: int,
             top_p: float) -> tuple[Int[Array, " batch"], KVCache]:
    hidden, cache = model.forward(prompts, cache=init_cache(model.config, prompts.shape[0], size), valid=lengths,
                                  layers=layers, mesh=None)  # one device decodes
    # Only each row's last prompt position goes through the vocabulary-sized output projection.
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)
    return sample_logits(model.head(last)[:, 0], key, temperature, top_k, top_p), cache


@functools.partial(jax.jit, static_argnames=SAMPLING, donate_argnames=("cache",))
def _decode(model: Transformer, layers: tuple[Block, ...], cache: KVCache, tokens: Int[Array, " batch"],
            done: Bool[Array, " batch"], key: PRNGKeyArray, first_step: Int[Array, ""], limit: Int[Array, ""],
            stop_ids: Int[Array, " stops"], temperature: float, top_k: int, top_p: float
            ) -> tuple[Int[Array, "batch chunk"], KVCache]:
    """Up to CHUNK tokens per row after `tokens`, decoded in one device loop (no host round trip
    per token; the cache is updated in place): stops after CHUNK or `limit` tokens, or once every
    row is done. Step s samples with fold_in(key, s), counting from `first_step`."""

    def step(carry):
        i, cache, tokens, done, out = carry
        hidden, cache = model.forward(tokens[:, None], cache=cache, layers=layers, mesh=None)
        tokens = sample_logits(model.head(hidden)[:, 0], jax.random.fold_in(key, first_step + i),
                               temperature, top_k, top_p)
        return i + 1, cache, tokens, done | jnp.isin(tokens, stop_ids), out.at[:, i].set(tokens)

    out = jnp.full((tokens.shape[0], CHUNK), PAD_ID, jnp.int32)
    keep_going = lambda carry: (carry[0] < jnp.minimum(limit, CHUNK)) & ~jnp.all(carry[3])
    _, cache, _, _, out = jax.lax.while_loop(keep_going, step, (0, cache, tokens, done, out))
    return out, cache


_split_layers = jax.jit(Transformer.layers)
_last_split: list[tuple[weakref.ref, tuple[Block, ...]]] = []


def _layers(model: Transformer) -> tuple[Block, ...]:
    """`model.layers()`, a copy of its weights (see there why), kept for the model sampled from
    last: evaluate.py and the chat REPL sample from one model again and again, and the copy takes
    about as long as a few decoding steps."""
    if not _last_split or _last_split[0][0]() is not model:
        _last_split.clear()  # the previous model's copy goes before this one is made
        _last_split.append((weakref.ref(model), _split_layers(model)))
    return _last_split[0][1]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, key: PRNGKeyArray,
             temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0,
             stop_ids: tuple[int, ...] = (),
             stop: Callable[[int, list[int]], bool] | None = None,
             on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """New token ids for each prompt. A stop id ends a row and is not returned; `stop(row, ids)`
    may end a row after a token (stop strings); `on_token(row, id)` sees each kept token as it comes."""
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token (e.g. <s>)")
    longest = max(len(p) for p in prompts)
    context = model.config.max_seq_len
    if longest + max_new_tokens > context:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {context}")
    width = min(next((w for w in SHORT_PROMPTS if longest <= w), _round_up(longest, PAD_TO)), context)
    size = min(_round_up(longest + max_new_tokens, PAD_TO), context)
    buffer = np.full((len(prompts), width), PAD_ID, np.int32)
    for row, prompt in enumerate(prompts):
        buffer[row, : len(prompt)] = prompt
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    out: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    stops = jnp.asarray(stop_ids or (-1,), jnp.int32)

    def keep(row: int, token: int) -> None:
        if done[row]:
            return
        if token in stop_ids:
            done[row] = True
            return
        out[row].append(token)
        if on_token is not None:
            on_token(row, token)
        if stop is not None and stop(row, out[row]):
            done[row] = True

    if max_new_tokens <= 0:
        return out
    layers = _layers(model)
    tokens, cache = _prefill(model, layers, jnp.asarray(buffer), lengths, jax.random.fold_in(key, 0), size=size,
                             **sampling)
    for row, token in enumerate(np.asarray(tokens).tolist()):
        keep(row, token)
    step = 1
    while step < max_new_tokens and not done.all():
        chunk, cache = _decode(model, layers, cache, tokens, jnp.asarray(done), key, step, max_new_tokens - step,
                               stops, **sampling)
        chunk = np.asarray(chunk)
        n = min(CHUNK, max_new_tokens - step)
        for i in range(n):
            for row in range(len(prompts)):
                keep(row, int(chunk[row, i]))
        step += n
        tokens = jnp.asarray(chunk[:, n - 1])
    return out


def _cut_at(text: str, stop_strings: Sequence[str]) -> str:
    cuts = [text.find(s) for s in stop_strings if s and s in text]
    return text[: min(cuts)] if cuts else text


def complete(model: Transformer, tokenizer: Tokenizer, prompts: list[list[int]], max_new_tokens: int,
             key: PRNGKeyArray, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_ids: tuple[int, ...] | None = None, stop_strings: Sequence[str] = (),
             on_text: Callable[[int, str], None] | None = None) -> list[str]:
    """Text generated after each prompt, cut before the first stop string. A row also ends at a
    stop id (default: the tokenizer's eos). `on_text(row, piece)` streams each row's text as it
    grows (never past a stop string)."""
    stop_ids = (tokenizer.eos_id,) if stop_ids is None else stop_ids
    shown = [0] * len(prompts)
    longest_stop = max((len(s) for s in stop_strings), default=0)
    out_ids: list[list[int]] = [[] for _ in prompts]

    def text_of(ids: list[int]) -> str:
        # Decoding only the newest token would split multi-byte characters: decode the row.
        return _cut_at(tokenizer.decode(ids), stop_strings)

    def stop(row: int, ids: list[int]) -> bool:
        return bool(stop_strings) and text_of(ids) != tokenizer.decode(ids)

    def on_token(row: int, token: int) -> None:
        out_ids[row].append(token)
        if on_text is None:
            return
        text = text_of(out_ids[row])
        # Hold back the tail that could still grow into a stop string, and an incomplete
        # multi-byte character (decoded as U+FFFD until its last byte comes).
        ready = len(text) if stop(row, out_ids[row]) else len(text.rstrip("\ufffd")) - longest_stop
        if ready > shown[row]:
            on_text(row, text[shown[row]: ready])
            shown[row] = ready

    generate(model, prompts, max_new_tokens, key, temperature, top_k, top_p, stop_ids, stop, on_token)
    texts = [text_of(ids) for ids in out_ids]
    if on_text is not None:
        for row, text in enumerate(texts):
            if len(text) > shown[row]:
                on_text(row, text[shown[row]:])
    return texts


def chat_prompt(tokenizer: Tokenizer, messages: Sequence[dict]) -> list[int]:
    """The conversation in the tokenizer's chat format (ours: <s> and ChatML), and the opening of
    the assistant's turn."""
    return tokenizer.chat_ids(messages, add_generation_prompt=True)


def chat(model: Transformer, tokenizer: Tokenizer, messages: Sequence[dict], max_new_tokens: int = 256,
         key: PRNGKeyArray | None = None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
         on_text: Callable[[str], None] | None = None, more_stop_ids: tuple[int, ...] = ()) -> str:
    """The assistant's reply to `messages` ([{"role": "system"|"user"|"assistant", "content": ...}]),
    ending at the chat format's end of turn or eos (Tokenizer.chat_stop_ids), or at one of
    `more_stop_ids`. Greedy by default; `on_text` streams the reply."""
    key = jax.random.key(0) if key is None else key
    stream = None if on_text is None else (lambda row, piece: on_text(piece))
    stop_ids = tuple(dict.fromkeys((*tokenizer.chat_stop_ids, *more_stop_ids)))
    return complete(model, tokenizer, [chat_prompt(tokenizer, messages)], max_new_tokens, key,
                    temperature, top_k, top_p, stop_ids, on_text=stream)[0]


def generation_stop_ids(config: dict) -> tuple[int, ...]:
    """The eos ids of an imported model's generation_config.json (checkpoint.load's config), where
    transformers' `generate` stops too (Llama 3.1's <|eom_id|>, for example); none for ours."""
    eos = ((checkpoint.imported_of(config) or {}).get("generation_config") or {}).get("eos_token_id")
    return tuple(eos) if isinstance(eos, list) else () if eos is None else (eos,)


def empty_note(text: str, chat: bool) -> str:
    """What to print after a streamed output: nothing, or, when the model stopped before its first
    token, a line saying so (an empty line reads as a bug of the script, not as the model's answer)."""
    if text:
        return ""
    return ("(empty reply: the model ended its turn at once)" if chat
            else "(empty continuation: the model ended the text at once)")


def rule(label: str) -> str:
    """The line above a prompt or an output, naming it: samples must not run into each other."""
    return f"---- {label} " + "-" * max(4, 40 - len(label))


def _print_stream(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _conversation(model: Transformer, tokenizer: Tokenizer, system: str, max_new_tokens: int,
                  key: PRNGKeyArray, sampling: dict, more_stop_ids: tuple[int, ...] = ()) -> None:
    """A REPL: each line is a user turn; the history grows until it no longer fits the context,
    then the oldest exchanges are dropped. '/reset' clears it; an empty line or EOF ends."""
    opening = [{"role": "system", "content": system}] if system else []
    budget = model.config.max_seq_len - max_new_tokens
    history: list[dict] = []
    print("Chat: an empty line or Ctrl-D ends, /reset forgets the conversation.")
    for turn in itertools.count():
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        if line.strip() == "/reset":
            history = []
            print("(conversation reset: the model sees only what you type next)")
            continue
        history.append({"role": "user", "content": line})
        while len(history) > 1 and len(chat_prompt(tokenizer, opening + history)) > budget:
            history = history[2:]  # the oldest user turn and its reply
        if len(chat_prompt(tokenizer, opening + history)) > budget:
            print(f"(too long for the model's context of {model.config.max_seq_len} tokens "
                  f"with --max_new_tokens={max_new_tokens})")
            history = []
            continue
        reply = chat(model, tokenizer, opening + history, max_new_tokens, jax.random.fold_in(key, turn),
                     on_text=_print_stream, more_stop_ids=more_stop_ids, **sampling)
        print(empty_note(reply, chat=True))
        history.append({"role": "assistant", "content": reply})


def main(argv):
    del argv
    checkpoint.quiet_logging(FLAGS["verbosity"].present)
    checkpoint.use_compilation_cache(FLAGS.compilation_cache_dir)
    if not FLAGS.checkpoint:
        raise cli.UsageError("--checkpoint is required: a train.py --output_dir")
    if not FLAGS.prompt and not FLAGS.chat:
        raise cli.UsageError("--prompt is required (or --chat for a conversation)")
    model, tokenizer_bytes, config = checkpoint.load(FLAGS.checkpoint, model_overrides={"dtype": FLAGS.dtype})
    tokenizer = tokenizer_from_bytes(tokenizer_bytes)
    more_stop_ids = generation_stop_ids(config)
    key = jax.random.key(FLAGS.seed)
    sampling = dict(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p)
    if FLAGS.chat and not FLAGS.prompt:
        _conversation(model, tokenizer, FLAGS.system, FLAGS.max_new_tokens, key, sampling, more_stop_ids)
        return
    if FLAGS.chat:
        prompts = [chat_prompt(tokenizer, ([{"role": "system", "content": FLAGS.system}] if FLAGS.system else [])
                               + [{"role": "user", "content": p}]) for p in FLAGS.prompt]
        stop_ids = tuple(dict.fromkeys((*tokenizer.chat_stop_ids, *more_stop_ids)))
    else:
        prompts = [tokenizer.encode(p, bos=True) for p in FLAGS.prompt]
        stop_ids = tuple(dict.fromkeys((tokenizer.eos_id, *more_stop_ids)))
    asked, answered = ("user", "assistant") if FLAGS.chat else ("prompt", "continuation")

    def show_prompt(row: int) -> None:
        of = f" {row + 1} of {len(prompts)}" if len(prompts) > 1 else ""
        print(f"{rule(asked + of)}\n{FLAGS.prompt[row]}\n{rule(answered)}", flush=True)

    single = len(prompts) == 1
    if single:  # shown before the first token; the output streams below it
        show_prompt(0)
    texts = complete(model, tokenizer, prompts, FLAGS.max_new_tokens, key, stop_ids=stop_ids,
                     stop_strings=FLAGS.stop, on_text=(lambda row, piece: _print_stream(piece)) if single else None,
                     **sampling)
    if single:
        print(empty_note(texts[0], FLAGS.chat))
        return
    for row, text in enumerate(texts):
        show_prompt(row)
        print(text or empty_note(text, FLAGS.chat), end="\n\n")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
