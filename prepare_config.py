"""prepare's settings (data.py's corpus pipeline): the frozen PrepareConfig that the driver and
every task take, which of its fields leave the output bytes alone (ENGINE_ONLY), and the parsing
of the flag values that are more than a number or a list (language shares, source weights, token
targets, sources, per-source fields) into its fields, a bad value named by its flag. Its own file
so that the driver (data.py) and the tasks (stages.py, mixture.py) share one definition."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import documents


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """prepare's settings: the flags of the same names (see data.define_flags)."""

    inputs: tuple[str, ...]
    output: str
    tokenizer: str
    seq_len: int = 2048
    num_shards: int = 8
    # (language, token share or None for natural shares)
    languages: tuple[tuple[str, float | None], ...] = (("en", 0.7), ("fr", 0.3))
    source_weights: tuple[tuple[str, float], ...] = ()
    code_sources: tuple[str, ...] = ()
    min_chars: int = 100
    max_chars: int = 500_000
    min_alnum: float = 0.70
    min_code_alnum: float = 0.25
    dedup: bool = True
    num_perm: int = 128
    near_dup_threshold: float = 0.8
    language_id: bool = True
    min_language_confidence: float = 0.8
    validation_fraction: float = 0.005
    block_records: int = 16
    seed: int = 0
    max_bad_fraction: float = 0.0
    language_id_chars: int = documents.LANGUAGE_ID_CHARS  # 0: the whole document
    # Sources: named file patterns, each source's layout, its target in tokens.
    sources: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (name, patterns under the --input roots)
    text_fields: tuple[tuple[str, str], ...] = ()  # (source, field or column holding the text)
    book_sources: tuple[str, ...] = ()  # .txt files of one book each (Project Gutenberg)
    trusted_language_sources: tuple[str, ...] = ()  # their records' own lid.176 label is used
    drop_quality_warnings: tuple[str, ...] = ()  # records with one of these OSCAR warnings are dropped
    source_tokens: tuple[tuple[str, float], ...] = ()  # (source, target tokens)
    short_sources: str = "repeat"  # a source short of its target: "repeat" it, or "report" the gap
    # Where and how wide it runs: no byte of the output depends on these.
    num_cpus: int = 0  # local worker processes (0: one per core); ignored with ray_address
    ray_address: str | None = None
    num_partitions: int = 16
    split_mb: float = 64.0


# Engine settings, and the input patterns (the files they match, with their sources, are settings).
ENGINE_ONLY = ("output", "inputs", "sources", "num_cpus", "ray_address", "num_partitions", "split_mb")


def parse_languages(spec: str) -> tuple[tuple[str, float | None], ...]:
    """`en:0.7,fr:0.3` (token shares, normalised to sum 1) or `en,fr` (natural shares)."""
    pairs = [item.partition(":") for item in spec.split(",") if item]
    if not pairs:
        raise ValueError("--languages is empty: expected e.g. en:0.7,fr:0.3 or en,fr")
    if any(sep for _, sep, _ in pairs) != all(sep for _, sep, _ in pairs):
        raise ValueError(f"--languages={spec}: give a share for every language or for none")
    if not pairs[0][1]:
        return tuple((name, None) for name, _, _ in pairs)
    try:
        shares = [float(share) for _, _, share in pairs]
    except ValueError:
        raise ValueError(f"--languages={spec}: shares must be numbers, e.g. en:0.7,fr:0.3") from None
    if min(shares) <= 0:
        raise ValueError(f"--languages={spec}: shares must be positive")
    return tuple((name, share / sum(shares)) for (name, _, _), share in zip(pairs, shares))


def parse_source_weights(spec: str) -> tuple[tuple[str, float], ...]:
    """`wiki:2,oscar:0.5` -> (("wiki", 2.0), ("oscar", 0.5))."""
    try:
        pairs = tuple((name, float(w)) for name, _, w in (i.partition(":") for i in spec.split(",") if i))
    except ValueError:
        raise ValueError(f"--source_weights={spec}: expected name:weight,... e.g. wiki:2,oscar:0.5") from None
    if any(w < 0 for _, w in pairs):
        raise ValueError(f"--source_weights={spec}: weights must not be negative")
    return pairs


def parse_pairs(spec: str, flag: str, example: str) -> tuple[tuple[str, str], ...]:
    """`a:x,b:y` -> (("a", "x"), ("b", "y"))."""
    pairs = tuple(item.partition(":") for item in spec.split(",") if item)
    if any(not name or not sep or not value for name, sep, value in pairs):
        raise ValueError(f"--{flag}={spec}: expected name:value,... e.g. {example}")
    return tuple((name, value) for name, _, value in pairs)


_SCALE = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}


def parse_source_tokens(spec: str) -> tuple[tuple[str, float], ...]:
    """`wikipedia:5.5B,oscar:15B,code:200M` -> (("wikipedia", 5.5e9), ...): tokens per source."""
    out = []
    for name, value in parse_pairs(spec, "source_tokens", "wikipedia:5.5B,oscar:15B"):
        match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)([KMBT]?)", value.upper())
        if not match or not float(match[1]):
            raise ValueError(f"--source_tokens={spec}: {value!r} is not a positive token count (e.g. 5.5B, "
                             "800M, 120000)")
        out.append((name, float(match[1]) * _SCALE[match[2]]))
    return tuple(out)


def parse_sources(specs: Sequence[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Repeated `--source=NAME=PATTERN` -> ((NAME, (PATTERN, ...)), ...) in first-seen order."""
    out: dict = {}
    for spec in specs:
        name, sep, pattern = spec.partition("=")
        if not name or not sep or not pattern:
            raise ValueError(f"--source={spec}: expected NAME=PATTERN, e.g. wikipedia=wikipedia/*/*.parquet")
        out.setdefault(name, []).append(pattern)
    return tuple((name, tuple(patterns)) for name, patterns in out.items())
