"""DPO's pairs packed into shared rows with segment ids (`dpo.py --pack_pairs`).

Unpacked, a pair is two rows of --max_length + 1 tokens, padded: at 1,024 tokens, 13-23% of the
bundled HH-RLHF pairs' rows are real tokens, so most of a step's compute goes to padding.
Packed, pair k of a row is two consecutive segments, 2k + 1 (prompt + chosen) and 2k + 2
(prompt + rejected), and pairs fill rows of the model's context + 1 tokens by sft.py's best-fit
decreasing (a pair never straddles two rows, so its two replies always meet in one loss).
Attention stays within a segment and positions restart (model.py), so every sequence's
log-probability is the one it has alone; sums per segment give each pair's (chosen, rejected).
A row holds at most `slots` pairs (the most any row of the split holds), so batch shapes are
static: pairs[n, slots] marks the slots in use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int

import sft
from model import Transformer, next_token_logps
from tokenizer import PAD_ID


def pack_pairs(pairs: list, length: int) -> sft.PackedRows:
    """dpo.RenderedPair items into rows of `length` tokens: tokens, segment ids (2k + 1, 2k + 2
    for the k-th pair of a row, 0 for padding) and the reply mask."""
    sizes = [2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs]
    if sizes and max(sizes) > length:
        raise ValueError(f"a pair of {max(sizes)} tokens exceeds the packed row of {length}: "
                         "--pack_pairs needs 2 x --max_length <= the model's context")
    rows = sft.best_fit(sizes, length)
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
    return sft.PackedRows(tokens, segments, reply)


def slots_of(rows: sft.PackedRows) -> int:
    """Pairs in the fullest row."""
    return max(1, (int(rows.segment_ids.max(initial=0)) + 1) // 2)


def packed_arrays(rows: sft.PackedRows, indices: Int[np.ndarray, " n"], reference_logps: np.ndarray | None,
                  slots: int) -> dict[str, np.ndarray]:
    """sft.batch_arrays' tokens, segment_ids and weights (reply targets) of the rows `indices`
    (-1: an empty row), plus target_segments int32 [n, T] (each target's segment), pairs float32
    [n, slots] (1 for a slot in use) and reference_logps float32 [n, slots, 2] when known."""
    out = sft.batch_arrays(rows, indices)
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


class PackedPairBatches(sft.ChatBatches):
    """sft.ChatBatches' order over packed rows of pairs (a batch is `global_batch_size` rows)."""

    def __init__(self, rows: sft.PackedRows, reference_logps: np.ndarray | None, *args, **kwargs):
        super().__init__(rows, *args, **kwargs)
        self.reference_logps, self.slots = reference_logps, slots_of(rows)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        parts = self.global_rows(step).reshape(self.grad_accum, self.process_count, -1)
        return packed_arrays(self.rows, parts[:, self.process_index].reshape(-1), self.reference_logps, self.slots)
