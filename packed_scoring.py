"""Scoring (context, continuation) token-id requests in packed rows of prefix trees: how
evaluate.py's lm-eval requests become forward passes of model.py, every continuation token scored
by `model.target_logps`.

  * Requests are laid out as prefix trees, depth first, so every shared prefix is computed once
    (an item's context before its choices, winogrande's sentence up to the blank, a prompt
    template); a token sees its ancestors only (an explicit mask: k <= q <= end of k's subtree),
    its position is its depth.
  * Trees are cut to at most half the shortest row and packed first-fit into rows of a few
    lengths (ROW_LENGTHS), about 1,024 tokens a pass at the default batch size: few programs
    compile (JAX's persistent cache keeps them).
  * Only the positions that predict a continuation token go through the vocabulary-sized head.

`plan_passes` lays the requests out (plain numpy: which rows, which passes, one process's share
of a multi-host run); `score_pass` runs one pass; `compile_scoring` compiles the largest pass for
a chip from abstract shapes (evaluate.py --dry_run, benchmarks/compile_targets.py). No lm-eval here:
evaluate.py's `JulianLM` is the adapter that calls this.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from model import ModelConfig, Transformer, target_logps
from tokenizer import PAD_ID

# Packed rows for scoring, one compiled program per pass shape. Not 128: trees are cut to half
# the shortest row, and 128-token rows of one 65-128-token tree each were 83% full where 256-token
# rows of 128-token trees fill to 98% (6% less scoring time for SmolLM2-135M's shape on the
# report's tasks).
ROW_LENGTHS = (256, 512, 1024, 2048)
# A scoring pass holds about batch_size x this many tokens on a CPU: 1,024 at the default batch of
# 16, where a 2-core CPU ran the 100m shape's layers 1.3x faster per token than at 4,096 (the
# activations stay in cache); accelerators get 4x (4,096, as before).
TOKENS_PER_REQUEST = 64
# Target positions per piece of the head: the padding a pass scores is below one piece, while the
# compiled program is sized by the pass's slots (one program per pass shape). On a 2-core CPU,
# pieces of 64 and of 128 scored SmolLM2-135M's targets equally fast (64 x 49,152 fp32 logits a piece).
HEAD_CHUNK = 64


def _packed_hidden(model: Transformer, tokens: Int[Array, "rows length"], positions: Int[Array, "rows length"],
                   ends: Int[Array, "rows length"]) -> Float[Array, "rows length d_model"]:
    """Final-norm hidden states of rows of prefix trees laid out depth first: a token q sees the
    tokens k <= q whose subtree (k ... ends[k]) holds it, its ancestors; positions are depths.
    An explicit mask, not segment ids: those cannot say "branches from a shared prefix"."""
    index = jnp.arange(tokens.shape[1])
    ancestors = (index[None, None, :] <= index[None, :, None]) & (index[None, :, None] <= ends[:, None, :])
    return model.forward(tokens, ancestors, positions=positions, mesh=None)[0]  # one device per process


def _target_scores(model: Transformer, hidden: Float[Array, "rows length d_model"], index: Int[Array, " targets"],
                   targets: Int[Array, " targets"], count: Int[Array, ""]
                   ) -> tuple[Float[Array, " targets"], Bool[Array, " targets"]]:
    """log p(target) and whether it is the argmax, at the flat row positions `index`: only
    those positions go through the vocabulary-sized head and its log-normaliser, HEAD_CHUNK at a
    time, and only the first `count` of them (the rest is padding; the values there are 0)."""
    flat = hidden.reshape(-1, hidden.shape[-1])

    def chunk(c, scores):
        at = c * HEAD_CHUNK
        piece = lambda a: jax.lax.dynamic_slice_in_dim(a, at, HEAD_CHUNK)
        new = target_logps(model, flat[piece(index)][None], piece(targets)[None])
        return tuple(jax.lax.dynamic_update_slice_in_dim(a, b[0], at, 0) for a, b in zip(scores, new))

    empty = (jnp.zeros(index.shape, jnp.float32), jnp.zeros(index.shape, bool))
    return jax.lax.fori_loop(0, -(-count // HEAD_CHUNK), chunk, empty)


def _scoring_pass(model: Transformer, tokens: Int[Array, "rows length"], positions: Int[Array, "rows length"],
                  ends: Int[Array, "rows length"], index: Int[Array, " slots"], targets: Int[Array, " slots"],
                  count: Int[Array, ""]) -> tuple[Float[Array, " slots"], Bool[Array, " slots"]]:
    """The body over the rows, then the head over the first `count` of `index`, which has room
    for every slot of the pass (rounded up to whole pieces): one program per pass shape. A
    separate head, sized by its targets, made 9 programs of the report's tasks' 5 pass shapes,
    and each process traces and lowers every program even when JAX's cache holds its code
    (2.5 s against 1.4 s on SmolLM2-135M's shape)."""
    return _target_scores(model, _packed_hidden(model, tokens, positions, ends), index, targets, count)


_scoring_pass_jit = jax.jit(_scoring_pass)


def _head_slots(rows: int, length: int) -> int:  # index and targets of a pass: its slots in whole pieces
    return -(-rows * length // HEAD_CHUNK) * HEAD_CHUNK


def rows_per_pass(batch_size: int, length: int, accelerator: bool) -> int:
    """Every pass holds about batch_size x TOKENS_PER_REQUEST tokens (4x that on an accelerator)."""
    return max(1, batch_size * TOKENS_PER_REQUEST * (4 if accelerator else 1) // length)


def compile_scoring(model_config: ModelConfig, rows: int, length: int, device):
    """One scoring pass (_scoring_pass with every position a target: the most a pass of
    `rows` x `length` scores) compiled for `device`, which may be a TPU or GPU
    topology's (budget.py), from abstract shapes; allocates nothing. evaluate.JulianLM scores on
    one device per process, so this is the per-chip program."""
    config = dataclasses.replace(model_config, scan_layers=True, fp32_residual=True)  # as evaluate.for_inference
    place = jax.sharding.SingleDeviceSharding(device)
    model = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=place),
                         eqx.filter_eval_shape(Transformer, config, jax.random.key(0)))
    grid = jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=place)
    flat = jax.ShapeDtypeStruct((_head_slots(rows, length),), jnp.int32, sharding=place)
    count = jax.ShapeDtypeStruct((), jnp.int32, sharding=place)
    return _scoring_pass_jit.lower(model, grid, grid, grid, flat, flat, count).compile()


def _bucket(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    return -(-n // buckets[-1]) * buckets[-1]


def _row_input(context: Sequence[int], continuation: Sequence[int], max_length: int) -> tuple[int, ...]:
    """Context + continuation but its last token, cut from the left to max_length, as `hf` does."""
    return tuple((list(context) + list(continuation))[-(max_length + 1):-1])


def _shared(a: Sequence[int], b: Sequence[int]) -> int:  # the common prefix's length
    return next((n for n, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@dataclasses.dataclass(frozen=True)
class _Unit:
    """Requests laid out in one row as their prefix tree, depth first: every shared prefix once."""
    members: tuple[int, ...]  # request indices, in lexicographic order of their inputs
    length: int  # tokens: the tree's nodes


@dataclasses.dataclass
class _Pass:
    """One forward pass: `n_rows` rows of `length` tokens, the first ones holding `rows` (units each)."""
    length: int
    rows: list[list[_Unit]]
    n_rows: int


def _tree_units(inputs: Sequence[tuple[int, ...]], small: int, largest: int) -> list[_Unit]:
    """The requests' inputs as prefix trees: of at most `small` tokens where cutting costs little,
    whole up to `largest` where a cut would repeat a long shared context.

    In lexicographic order a tree is a run of inputs: the first one's tokens, then each next one's
    past its common prefix with the one before. A tree too big is cut below its shared prefix
    (repeated in each part) into its children's subtrees, neighbours merged while they fit
    `small`; one whose shared prefix is longer than small / 8 (a context and its continuations)
    stays whole if it fits `largest`."""
    order = sorted(range(len(inputs)), key=lambda i: inputs[i])
    seqs = [inputs[i] for i in order]
    shared = [0] + [_shared(seqs[i - 1], seqs[i]) for i in range(1, len(seqs))]
    new_tokens = np.cumsum([len(s) - c for s, c in zip(seqs, shared)])

    def size(a: int, b: int) -> int:
        return len(seqs[a]) + int(new_tokens[b - 1] - new_tokens[a])

    runs, todo = [], [(0, len(seqs), 0)]  # (start, stop, length of the prefix all of them share)
    while todo:
        a, b, depth = todo.pop()
        if size(a, b) <= small or b - a == 1 or (depth > small // 8 and size(a, b) <= largest):
            runs.append((a, b))
            continue
        starts = [a] + [i for i in range(a + 1, b) if shared[i] <= depth]  # one child subtree each
        merged = None
        for start, stop in zip(starts, starts[1:] + [b]):
            if size(start, stop) > small:
                common = min(shared[start + 1: stop]) if stop - start > 1 else len(seqs[start])
                todo.append((start, stop, common))
            elif merged is not None and size(merged[0], stop) <= small:
                merged = (merged[0], stop)
            else:
                if merged is not None:
                    runs.append(merged)
                merged = (start, stop)
        if merged is not None:
            runs.append(merged)
    return [_Unit(tuple(order[a:b]), size(a, b)) for a, b in runs]


def plan_passes(requests: Sequence[tuple[list[int], list[int]]], max_length: int, row_lengths: Sequence[int],
                rows_per_pass: Callable[[int], int], rank: int = 0, world: int = 1) -> list[_Pass]:
    """Process `rank` of `world`'s forward passes: the requests' inputs form prefix trees
    (`_tree_units`, cut where cutting costs little to half the shortest row, so that first fit
    can fill the shortest rows with two or more); the process takes every world-th tree, longest
    first, into rows of the shortest length that holds it (first fit), rows of a length into
    passes. Passes go longest rows first, as the `hf` backend orders its batches (memory errors
    show at once)."""
    for i, (context, continuation) in enumerate(requests):
        if not context or not continuation or len(continuation) > max_length:
            raise ValueError(f"request {i}: {len(context)} context and {len(continuation)} continuation "
                             f"tokens; expected at least one of each and a continuation of at most "
                             f"{max_length}")
    inputs = [_row_input(context, continuation, max_length) for context, continuation in requests]
    units = _tree_units(inputs, min(row_lengths) // 2, max(row_lengths))
    units.sort(key=lambda u: (-u.length, u.members))
    units = units[rank::world]
    rows: list[tuple[int, list[_Unit], list[int]]] = []  # (length, units, [free tokens])
    for unit in units:
        for length, held, free in rows:
            if free[0] >= unit.length:
                held.append(unit)
                free[0] -= unit.length
                break
        else:
            length = _bucket(unit.length, row_lengths)
            rows.append((length, [unit], [length - unit.length]))
    passes = []
    for length in sorted({length for length, _, _ in rows}, reverse=True):
        same = [held for row_length, held, _ in rows if row_length == length]
        per_pass = rows_per_pass(length)
        for start in range(0, len(same), per_pass):
            held = same[start: start + per_pass]
            # A last, partial pass gets the next power of two of rows, not a full pass of padding.
            passes.append(_Pass(length, held, min(per_pass, 1 << (len(held) - 1).bit_length())))
    return passes


def score_pass(model: Transformer, packed: _Pass, requests: Sequence[tuple[list[int], list[int]]],
               max_length: int) -> dict[int, tuple[float, bool]]:
    """{request index: (log p(continuation | context), whether greedy decoding gives it)} of the
    requests in one pass of `plan_passes`: the rows laid out as their prefix trees, one forward
    pass, then only the continuations' positions through the head."""
    n_rows, length = packed.n_rows, packed.length
    tokens = np.full((n_rows, length), PAD_ID, np.int32)
    positions = np.zeros((n_rows, length), np.int32)
    ends = np.tile(np.arange(length, dtype=np.int32), (n_rows, 1))  # padding sees itself only
    index, targets, owners = [], [], []
    for r, row in enumerate(packed.rows):
        at = 0
        for unit in row:
            path: list[int] = []  # row slots of the previous member's input
            previous: tuple[int, ...] = ()
            for i in unit.members:
                context, continuation = requests[i]
                seq = _row_input(context, continuation, max_length)
                common = _shared(previous, seq)
                fresh = len(seq) - common
                tokens[r, at: at + fresh] = seq[common:]
                positions[r, at: at + fresh] = np.arange(common, len(seq))
                path = path[:common] + list(range(at, at + fresh))
                at += fresh
                ends[r, path] = path[-1]  # later members, later in the row, overwrite
                index += [r * length + slot for slot in path[len(seq) - len(continuation):]]
                targets += continuation
                owners += [i] * len(continuation)
                previous = seq
    count = len(index)
    width = _head_slots(n_rows, length)
    index += [0] * (width - count)
    targets += [PAD_ID] * (width - count)
    logprobs, greedy = _scoring_pass_jit(model, tokens, positions, ends, np.asarray(index, np.int32),
                                         np.asarray(targets, np.int32), np.int32(count))
    logprobs = np.asarray(logprobs, np.float64)[: len(owners)]
    greedy = np.asarray(greedy)[: len(owners)]
    requests_here, which = np.unique(np.asarray(owners), return_inverse=True)
    sums, all_greedy = np.zeros(len(requests_here)), np.ones(len(requests_here), bool)
    np.add.at(sums, which, logprobs)
    np.logical_and.at(all_greedy, which, greedy)
    return {int(i): (float(total), bool(g)) for i, total, g in zip(requests_here, sums, all_greedy)}
