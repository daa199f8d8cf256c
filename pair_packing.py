"""DPO's preference pairs as the model's rows: rendered (prompt, chosen, rejected), then two
padded rows per pair, or packed into shared rows with segment ids (`dpo.py --pack_pairs`).

Unpacked (`PairRows`), a pair is two rows of --max_length + 1 tokens (prompt + chosen, prompt
+ rejected), padded: at 1,024 tokens, 13-23% of the bundled HH-RLHF pairs' rows are real
tokens, so most of a step's compute goes to padding.
Packed, pair k of a row is two consecutive segments, 2k + 1 (prompt + chosen) and 2k + 2
(prompt + rejected), and pairs fill rows of the model's context + 1 tokens by chat_data.py's
best-fit decreasing (a pair never straddles two rows, so its two replies always meet in one loss).
Attention stays within a segment and positions restart (model.py), so every sequence's
log-probability is the one it has alone; sums per segment give each pair's (chosen, rejected).
A row holds at most `slots` pairs (the most any row of the split holds), so batch shapes are
static: pairs[n, slots] marks the slots in use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, Int

import chat_data
from chat_formats import Pair
from model import Transformer, next_token_logps
from tokenizer import PAD_ID, Tokenizer


# --------------------------------------------------------------------------------------------
# Rendering, truncation, unpacked rows.


@dataclasses.dataclass(frozen=True)
class RenderedPair:
    prompt: Int[np.ndarray, " prompt"]  # <s> ... <|im_start|>assistant\n (the generation prompt)
    chosen: Int[np.ndarray, " reply"]  # the reply's tokens and its end-of-turn token
    rejected: Int[np.ndarray, " reply"]


def _split_reply(tokenizer: Tokenizer, prompt: Sequence[dict], reply: str) -> tuple[np.ndarray, np.ndarray]:
    """(prompt ids, reply ids) from SFT's rendering of the conversation: the reply is the last
    stretch of the loss mask (its content and end-of-turn token); what follows it (ChatML's
    newline) is left out."""
    example, _ = chat_data.render(tokenizer, [*prompt, {"role": "assistant", "content": reply}])
    end = len(example.mask) - int(np.argmax(example.mask[::-1]))
    start = end - int(np.argmin(example.mask[:end][::-1]))
    return example.ids[:start], example.ids[start:end]


def render_pair(tokenizer: Tokenizer, pair: Pair, max_length: int, max_prompt_length: int
                ) -> tuple[RenderedPair | None, str]:
    """(rendered pair, status): "ok", "prompt cut" (its start dropped), "reply cut" (and maybe
    the prompt too), or "dropped" (None: no reply token fits)."""
    prompt, chosen = _split_reply(tokenizer, pair.prompt, pair.chosen)
    rejected_prompt, rejected = _split_reply(tokenizer, pair.prompt, pair.rejected)
    if not np.array_equal(prompt, rejected_prompt):
        # A chat template whose generation prompt ends where a reply's first characters can merge
        # with it: the prompt is what both renderings share, the rest belongs to each reply.
        shared = next((n for n, (a, b) in enumerate(zip(prompt, rejected_prompt)) if a != b),
                      min(len(prompt), len(rejected_prompt)))
        chosen, rejected = np.concatenate([prompt[shared:], chosen]), np.concatenate([rejected_prompt[shared:], rejected])
        prompt = prompt[:shared]
    status = "ok"
    if len(prompt) + max(len(chosen), len(rejected)) > max_length and len(prompt) > max_prompt_length:
        prompt, status = prompt[len(prompt) - max_prompt_length:], "prompt cut"
    room = max_length - len(prompt)
    if room < 1:
        return None, "dropped"
    if max(len(chosen), len(rejected)) > room:
        chosen, rejected, status = chosen[:room], rejected[:room], "reply cut"
    return RenderedPair(prompt, chosen, rejected), status


@dataclasses.dataclass(frozen=True)
class PairRows:
    """Pair i is tokens[i, 0] (prompt + chosen) and tokens[i, 1] (prompt + rejected), padded;
    reply[i, k, t] marks the reply tokens (targets of input t - 1)."""
    tokens: Int[np.ndarray, "pairs 2 length"]
    reply: Bool[np.ndarray, "pairs 2 length"]

    @property
    def num_rows(self) -> int:
        return len(self.tokens)

    @property
    def supervised_tokens(self) -> int:
        return int(self.reply.sum())


def to_rows(pairs: Sequence[RenderedPair], max_length: int) -> PairRows:
    """Rows of max_length + 1 tokens, as chat_data.py's (the model reads max_length inputs)."""
    tokens = np.full((len(pairs), 2, max_length + 1), PAD_ID, np.int32)
    reply = np.zeros((len(pairs), 2, max_length + 1), bool)
    for i, pair in enumerate(pairs):
        for k, answer in enumerate((pair.chosen, pair.rejected)):
            n, m = len(pair.prompt), len(answer)
            tokens[i, k, :n + m] = np.concatenate([pair.prompt, answer])
            reply[i, k, n:n + m] = True
    return PairRows(tokens, reply)


class PairBatches(chat_data.ChatBatches):
    """chat_data.ChatBatches' order (a pure function of seed and step) over pairs; each batch also
    holds the pairs' reference log-probabilities when they are known."""
    sequences_per_row = 2  # chosen and rejected: train.fit counts their tokens

    def __init__(self, rows: PairRows, reference_logps: np.ndarray | None, *args, **kwargs):
        super().__init__(rows, *args, **kwargs)
        self.reference_logps = reference_logps

    @property
    def seq_len(self) -> int:
        return self.rows.tokens.shape[-1] - 1

    def batch(self, step: int) -> dict[str, np.ndarray]:
        parts = self.global_rows(step).reshape(self.grad_accum, self.process_count, -1)
        return pair_arrays(self.rows, parts[:, self.process_index].reshape(-1), self.reference_logps)


def pair_row(max_length: int) -> dict[str, jax.ShapeDtypeStruct]:
    """One batch row of pair_arrays, abstract: what train_step.compile_step compiles the step for."""
    return {"tokens": jax.ShapeDtypeStruct((2, max_length + 1), jnp.int32),
            "weights": jax.ShapeDtypeStruct((2, max_length), jnp.float32),
            "pairs": jax.ShapeDtypeStruct((), jnp.float32),
            "reference_logps": jax.ShapeDtypeStruct((2,), jnp.float32)}


def pair_arrays(rows: PairRows, indices: Int[np.ndarray, " n"], reference_logps: np.ndarray | None
                ) -> dict[str, np.ndarray]:
    """tokens int32 [n, 2, T+1]; weights float32 [n, 2, T] (1 on reply targets); pairs float32
    [n] (1 for a real pair, 0 for the empty row of index -1); reference_logps float32 [n, 2]."""
    real = indices >= 0
    at = np.where(real, indices, 0)
    out = {"tokens": np.where(real[:, None, None], rows.tokens[at], PAD_ID).astype(np.int32),
           "weights": (rows.reply[at][..., 1:] & real[:, None, None]).astype(np.float32),
           "pairs": real.astype(np.float32)}
    if reference_logps is not None:
        out["reference_logps"] = np.where(real[:, None], reference_logps[at], 0.0).astype(np.float32)
    return out


# --------------------------------------------------------------------------------------------
# Packed rows.


def pack_pairs(pairs: Sequence[RenderedPair], length: int) -> chat_data.PackedRows:
    """RenderedPair items into rows of `length` tokens: tokens, segment ids (2k + 1, 2k + 2
    for the k-th pair of a row, 0 for padding) and the reply mask."""
    sizes = [2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs]
    if sizes and max(sizes) > length:
        raise ValueError(f"a pair of {max(sizes)} tokens exceeds the packed row of {length}: "
                         "--pack_pairs needs 2 x --max_length <= the model's context")
    rows = chat_data.best_fit(sizes, length)
    largest = max((int(max(p.prompt.max(initial=0), p.chosen.max(initial=0), p.rejected.max(initial=0)))
                   for p in pairs), default=0)
    tokens = np.full((len(rows), length), PAD_ID, np.uint16 if largest < 2**16 else np.int32)
    segments = np.zeros((len(rows), length), np.uint16)
    reply = np.zeros((len(rows), length), bool)
    for r, members in enumerate(rows):
        start = 0
        for k, i in enumerate(members):
            for side, answer in enumerate((pairs[i].chosen, pairs[i].rejected)):
                n, m = len(pairs[i].prompt), len(answer)
                tokens[r, start: start + n + m] = np.concatenate([pairs[i].prompt, answer])
                segments[r, start: start + n + m] = 2 * k + 1 + side
                reply[r, start + n: start + n + m] = True
                start += n + m
    return chat_data.PackedRows(tokens, segments, reply)


def slots_of(rows: chat_data.PackedRows) -> int:
    """Pairs in the fullest row."""
    return max(1, (int(rows.segment_ids.max(initial=0)) + 1) // 2)


def packed_arrays(rows: chat_data.PackedRows, indices: Int[np.ndarray, " n"], reference_logps: np.ndarray | None,
                  slots: int) -> dict[str, np.ndarray]:
    """chat_data.batch_arrays' tokens, segment_ids and weights (reply targets) of the rows `indices`
    (-1: an empty row), plus target_segments int32 [n, T] (each target's segment), pairs float32
    [n, slots] (1 for a slot in use) and reference_logps float32 [n, slots, 2] when known."""
    out = chat_data.batch_arrays(rows, indices)
    real = indices >= 0
    segments = np.where(real[:, None], rows.segment_ids[np.where(real, indices, 0)], 0).astype(np.int32)
    out["target_segments"] = segments[:, 1:]
    used = (segments.max(axis=1, initial=0) + 1) // 2
    out["pairs"] = (np.arange(slots)[None, :] < used[:, None]).astype(np.float32)
    if reference_logps is not None:
        out["reference_logps"] = np.where(real[:, None, None], reference_logps[np.where(real, indices, 0)],
                                          0.0).astype(np.float32)
    return out


def per_pair(values: Float[Array, "n seq"], target_segments: Int[Array, "n seq"], slots: int) -> Float[Array, "pairs 2"]:
    """Sums of `values` over each segment's targets: [n * slots, 2], (chosen, rejected) per slot."""
    one_hot = jax.nn.one_hot(target_segments - 1, 2 * slots, dtype=values.dtype)  # padding: -1, no column
    return jnp.einsum("nt,nts->ns", values, one_hot).reshape(-1, 2)


def packed_logps(model: Transformer, batch: dict[str, Array], mesh: Mesh | None = None) -> Float[Array, "pairs 2"]:
    """Every slot's (chosen, rejected) summed reply log-probabilities, in one forward pass over
    the packed rows (`mesh`: the one the program is built for, None on one device)."""
    logps = next_token_logps(model, batch["tokens"], batch["segment_ids"], mesh=mesh)
    return per_pair(logps * batch["weights"], batch["target_segments"], batch["pairs"].shape[-1])


class PackedPairBatches(chat_data.ChatBatches):
    """chat_data.ChatBatches' order over packed rows of pairs (a batch is `global_batch_size` rows)."""

    def __init__(self, rows: chat_data.PackedRows, reference_logps: np.ndarray | None, *args, **kwargs):
        super().__init__(rows, *args, **kwargs)
        self.reference_logps, self.slots = reference_logps, slots_of(rows)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        parts = self.global_rows(step).reshape(self.grad_accum, self.process_count, -1)
        return packed_arrays(self.rows, parts[:, self.process_index].reshape(-1), self.reference_logps, self.slots)
