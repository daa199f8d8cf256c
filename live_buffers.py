"""What a compiled program holds at its peak, read from XLA's buffer-assignment dump.

XLA's memory analysis gives a program's totals (arguments, outputs, temporaries); which buffers
make up the peak, and what each one is (parameters, optimizer state, saved activations, logits,
attention, ...), is only in the files XLA dumps when asked (`--xla_dump_to`, which budget.py's
`prepare_host` sets for a dry run). This file reads them: the "live at the peak" rows of
`--dry_run --hardware=NAME` (budget.py) and the groups of benchmarks/compile_targets.py's table.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence

import jax
from jax.sharding import Mesh

from model import ModelConfig, Transformer
from parallel import leaf_sharding

# What a buffer live at the peak holds, as the table groups them.
BUFFER_GROUPS = ("parameters", "optimizer state", "batch and scalars", "gathered parameters", "parameter casts",
                 "saved activations", "logits", "attention", "gradients and updates", "other temporaries")
ALLOCATION = re.compile(r"^allocation (\d+): ")
VALUE = re.compile(r"^\s*value: <\d+ ([\w.\-]+)(?:\{([\d,]*)\})? @\d+> \(size=(\d+),offset=(\d+)\)")
LIVE_RANGE = re.compile(r"^\s+([\w.\-]+)\{([\d,]*)\}:(\d+)-(\d+)$")
HLO_LINE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\(")
ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclasses.dataclass(frozen=True)
class Buffer:
    """One buffer live at the peak: bytes per chip, dtype[dims], what it holds, the op that made it."""
    size: int
    shape: str
    group: str
    op: str


@dataclasses.dataclass(frozen=True)
class ModelShapes:
    """What the buffers are recognised by: the parameters' shapes (whole, one layer's, and each
    chip's shard), and the layer count, vocabulary and sequence length."""
    whole: frozenset[tuple[int, ...]]
    sharded: frozenset[tuple[int, ...]]
    n_layers: int
    vocab: int
    seq_len: int
    fsdp: int

    @classmethod
    def of(cls, model_config: ModelConfig, mesh: Mesh) -> ModelShapes:
        shapes = [x.shape for x in jax.tree.leaves(jax.eval_shape(lambda: Transformer(model_config, jax.random.key(0))))]
        whole = set(shapes) | {s[1:] for s in shapes if len(s) == 3}  # stacked blocks: one layer's too
        sharded = {leaf_sharding(mesh, s).shard_shape(s) for s in shapes}
        sharded |= {s[1:] for s in sharded if len(s) == 3}
        return cls(frozenset(whole), frozenset(sharded), model_config.n_layers, model_config.vocab_size,
                   model_config.max_seq_len, mesh.shape["fsdp"])

    def group(self, dtype: str, dims: tuple[int, ...], opcode: str, op: str) -> str:
        """Which of BUFFER_GROUPS a buffer is, from its argument path (XLA names a parameter by
        it), its op (backward ops are jax's "transpose(...)") and its shape."""
        # An argument's name is its path: "args[0].model..." or, when jit knows the argument names,
        # "state.opt_state[1].mu..."; an op's name is a scope path ("jit(train_step)/while/...").
        if op.startswith("args[") or (op and not re.search(r"[/( ]", op)):
            return ("optimizer state" if ".opt_state" in op else "parameters" if ".model" in op
                    else "batch and scalars")
        backward = "transpose(" in op
        if opcode.startswith("all-gather") or (self.fsdp > 1 and dims in self.whole - self.sharded and not backward):
            return "gathered parameters"
        if dims in self.whole | self.sharded:
            return "gradients and updates" if dtype == "f32" else "parameter casts"
        if self.vocab in dims:
            return "logits"
        if "splash" in op or "attend" in op or (len(dims) == 4 and dims[-1] == dims[-2] >= self.seq_len // 2):
            return "attention"
        if len(dims) >= 4 and dims[0] == self.n_layers:  # what the layer scan stacks for the backward
            return "saved activations"
        return "other temporaries"


def dump_dir() -> str | None:
    """Where XLA dumps compiled modules (--xla_dump_to in XLA_FLAGS), if it does."""
    found = re.search(r"--xla_dump_to=(\S+)", os.environ.get("XLA_FLAGS", ""))
    return found.group(1) if found else None


def peak_buffers(dump: str, known: set[str], shapes: ModelShapes) -> tuple[int, tuple[Buffer, ...]]:
    """(bytes live at the peak, the buffers live then, largest first) of the largest module XLA
    dumped to `dump` since `known` (file names seen before); its files are deleted once read.

    From XLA's own files: the buffer assignment (*-buffer-assignment.txt: each value's bytes and
    its place in an allocation; values at one place share the bytes), the live ranges of the
    flattened schedule, nested loops' bodies included (*-live-range.txt; its own "peak" line
    counts the outer schedule only), and the optimized HLO (each value's shape and the op that
    defined it)."""
    new = [f for f in os.listdir(dump) if f.endswith("after_optimizations-live-range.txt") and f not in known]
    if not new:
        return 0, ()
    module = max(new, key=lambda f: os.path.getsize(os.path.join(dump, f))).removesuffix("-live-range.txt")
    read = lambda suffix: open(os.path.join(dump, module + suffix))
    places, allocation = {}, None  # value -> (allocation, offset), bytes
    with read("-buffer-assignment.txt") as f:
        for line in f:
            if match := ALLOCATION.match(line):
                allocation = match.group(1)
            elif match := VALUE.match(line):
                places[(match.group(1), match.group(2) or "")] = ((allocation, match.group(4)), int(match.group(3)))
    spans: dict[tuple, list] = {}  # place -> [(start, end, value, bytes)]
    end = 0
    with read("-live-range.txt") as f:
        for line in f:
            if (match := LIVE_RANGE.match(line)) and (key := (match.group(1), match.group(2))) in places:
                place, size = places[key]
                spans.setdefault(place, []).append((int(match.group(3)), int(match.group(4)), key, size))
                end = max(end, int(match.group(4)))
    # Values at one place whose live ranges overlap are one buffer seen through aliases (a loop's
    # carry, an async copy's halves); those that follow one another reuse the bytes.
    held = [cluster for values in spans.values() for cluster in _overlapping(values)]
    change = [0] * (end + 2)
    for start, stop, _, size in held:
        change[start] += size
        change[stop + 1] -= size
    live, peak, at = 0, 0, 0
    for t, delta in enumerate(change):
        live += delta
        if live > peak:
            peak, at = live, t
    instructions = {}
    with read(".txt") as f:
        for line in f:
            if match := HLO_LINE.match(line):
                op = OP_NAME.search(line)
                instructions[match.group(1)] = (ARRAY.findall(match.group(2)), match.group(3), op.group(1) if op else "")
    buffers = []
    for start, stop, (name, index), size in held:
        if not start <= at <= stop:
            continue
        arrays, opcode, op = instructions.get(name, ([], "", ""))
        element = int(index.split(",")[0]) if index and len(arrays) > 1 else 0
        dtype, dims = arrays[element] if element < len(arrays) else ("", "")
        dims = tuple(int(d) for d in dims.split(",") if d)
        buffers.append(Buffer(size, f"{dtype}[{','.join(map(str, dims))}]", shapes.group(dtype, dims, opcode, op),
                              op or f"{opcode} {name}"))
    prefix = module.split(".")[0] + "."
    for f in os.listdir(dump):  # a big model's dump is hundreds of MB: keep none of it
        path = os.path.join(dump, f)
        if f.startswith(prefix) and os.path.isfile(path):
            os.remove(path)
    return peak, tuple(sorted(buffers, key=lambda b: -b.size))


def _overlapping(values: list[tuple]) -> list[tuple]:
    """(start, end, value, bytes) spans at one place, those that overlap merged into one span held
    by its largest value."""
    out: list[tuple] = []
    for start, stop, value, size in sorted(values):
        if out and start <= out[-1][1]:
            first, last, biggest, most = out[-1]
            out[-1] = (first, max(last, stop), value if size > most else biggest, max(most, size))
        else:
            out.append((start, stop, value, size))
    return out


def buffer_groups(buffers: Sequence[Buffer]) -> dict[str, tuple[int, int]]:
    """{group: (bytes, buffers)} of the buffers live at the peak, in BUFFER_GROUPS' order."""
    totals = {g: (sum(b.size for b in buffers if b.group == g), sum(b.group == g for b in buffers))
              for g in BUFFER_GROUPS}
    return {g: t for g, t in totals.items() if t[1]}
