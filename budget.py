"""What a run costs: the chips' peak FLOP/s (for MFU), the named pods, and the dry run.

`--dry_run` prints a config's parameters, its compiled per-device memory, whether a step fits the
named pod's chips (and which flag would make it fit), and the time its token budget takes at an
assumed MFU. On a CPU the peak is measured once per machine and cached, so runs compare.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

import cli
from model import ModelConfig, attention_impl, flops_per_token, num_params

if TYPE_CHECKING:
    from train import TrainConfig

# The compiled train step's memory analysis for (model config, train config) on the run's mesh.
MemoryOf = Callable[[ModelConfig, Any], Any]


# bf16 dense TFLOP/s per chip, from vendor spec sheets, keyed by a substring of device_kind.
PEAK_TFLOPS = {"TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
               "TPU v5": 459.0, "TPU v6 lite": 918.0, "TPU v6e": 918.0, "H100": 989.0,
               "H200": 989.0, "A100": 312.0}


class Pod(NamedTuple):
    chips: int
    tflops: float  # bf16 dense peak per chip
    memory_gib: float  # HBM per chip
    backend: str  # what --attention=auto runs there (model.AUTO_ATTENTION)


# Named pods for --dry_run, from vendor spec sheets. A v4-32 has 16 chips (32 cores).
HARDWARE = {"v4-8": Pod(4, 275.0, 32, "tpu"), "v4-32": Pod(16, 275.0, 32, "tpu"),
            "v5e-16": Pod(16, 197.0, 16, "tpu"), "v5p-32": Pod(16, 459.0, 95, "tpu"),
            "1xH100": Pod(1, 989.0, 80, "gpu"), "8xH100": Pod(8, 989.0, 80, "gpu"),
            "1xH200": Pod(1, 989.0, 141, "gpu")}


# A program fits a chip when it needs at most this share of its memory: the runtime, the
# allocator's fragmentation and the other backend's fusion choices (the dry run compiles for a
# CPU) need the rest.
FIT_FRACTION = 0.9
REMAT_ORDER = ("none", "dots", "full")  # least to most recomputation


# The CPU peak's matmuls (m, k, n), the same for every model so that runs on one machine compare:
# a large square, and the 100m config's MLP on 2,048 tokens (a CPU does best on such shapes).
CPU_PEAK_SHAPES = ((2048, 2048, 2048), (2048, 640, 2560), (2048, 2560, 640))


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


def cpu_key() -> str:
    """What a CPU's peak depends on: its model and the cores this process may use."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {cores} cores"


def cpu_peak_flops(cache_path: str | None = None, key: str | None = None) -> float:
    """This CPU's bf16 matmul FLOP/s on CPU_PEAK_SHAPES, measured once per `key` (default
    cpu_key()) and kept in `cache_path` (default ~/.cache/julian/cpu_peak_flops.json).

    Measured at every start, the peak varied by 2x with the machine's load, and so did the MFU
    of the same speed; cached, every run on a machine divides by the same number. Delete the
    file to measure again.
    """
    cache_path = cache_path or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                            "julian", "cpu_peak_flops.json")
    key = key or cpu_key()
    try:
        with open(cache_path) as f:
            cached = json.load(f)
    except (OSError, ValueError):
        cached = {}
    if key not in cached:
        cached[key] = measure_matmul_flops(CPU_PEAK_SHAPES, repeats=5)
        print(f"measured the bf16 matmul peak of this CPU ({key}) for MFU: {cached[key] / 1e12:.3f} "
              f"TFLOP/s, kept in {cache_path}")
        try:  # written whole or not at all: processes measuring at once each replace the file
            os.makedirs(os.path.dirname(cache_path), exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(cache_path), delete=False) as f:
                json.dump(cached, f, indent=1)
            os.replace(f.name, cache_path)
        except OSError:
            pass  # an unwritable cache costs a measurement per run, nothing more
    return cached[key]


def device_peak_flops(peak_tflops: float = 0.0) -> float:
    """Peak bf16 FLOP/s of all devices together, for MFU; `peak_tflops` per device overrides."""
    devices = jax.devices()
    if peak_tflops:
        return peak_tflops * 1e12 * len(devices)
    if devices[0].platform == "cpu":  # fake CPU devices share the same cores: one peak in all
        return cpu_peak_flops()
    kind = devices[0].device_kind
    per_chip = next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
    if per_chip is None:
        raise ValueError(f"unknown peak FLOP/s for device {kind!r}: pass --peak_tflops")
    return per_chip * 1e12 * len(devices)


def peak_bytes(memory) -> int:
    """What the step holds at once: its inputs, outputs that do not reuse a donated input, temporaries."""
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes)


def fit_verdict(model_config: ModelConfig, config: TrainConfig, mesh: Mesh, pod: Pod, needed: int,
                memory_of: MemoryOf) -> str:
    """Whether the step fits a chip of `pod`; if not, the first of --remat=dots, --remat=full,
    then a doubled --grad_accum that does (each one compiled to find out)."""
    limit = FIT_FRACTION * pod.memory_gib * 2**30
    if needed <= limit:
        return f"yes: {needed / 2**30:.1f} GiB of {pod.memory_gib:g} GiB per chip"
    tries = [(f"--remat={r}", dataclasses.replace(model_config, remat=r), config)
             for r in REMAT_ORDER if REMAT_ORDER.index(r) > REMAT_ORDER.index(model_config.remat)]
    micro = config.batch_size // config.grad_accum
    accum = config.grad_accum * 2
    while config.batch_size % accum == 0 and config.batch_size // accum >= mesh.size and len(tries) < 5:
        full = dataclasses.replace(model_config, remat="full")
        tries.append((f"--remat=full --grad_accum={accum}", full, dataclasses.replace(config, grad_accum=accum)))
        accum *= 2
    advice = f"no flag tried makes it fit (micro-batch {micro}): shard with --fsdp or use a bigger chip"
    for flag, model_try, config_try in tries:
        if (other := peak_bytes(memory_of(model_try, config_try))) <= limit:
            advice = f"with {flag} it needs {other / 2**30:.1f} GiB and fits"
            break
    return (f"NO: needs {needed / 2**30:.1f} GiB per chip, over {FIT_FRACTION:.0%} of a {pod.memory_gib:g} GiB "
            f"chip; {advice}")


def dry_run(model_config: ModelConfig, config: TrainConfig, mesh: Mesh, hardware: str, assumed_mfu: float,
            peak_tflops: float, memory_of: MemoryOf) -> None:
    """Print parameter count, compiled per-device memory for `mesh` and the compute budget;
    allocate nothing. `hardware` names a pod in HARDWARE: the time estimate, whether the step
    fits its chips' memory (and which flag would make it fit), and its --attention=auto choice."""
    seq_len = model_config.max_seq_len
    pod = HARDWARE[hardware] if hardware else None
    attention = attention_impl(model_config.attention, seq_len, pod.backend if pod else None)
    # A TPU or GPU kernel compiles here in Pallas interpret mode: its loop over tiles, not a score array.
    model_config = dataclasses.replace(model_config, attention=attention)
    memory = memory_of(model_config, config)

    n = num_params(model_config)
    micro = config.batch_size // config.grad_accum
    tokens_per_step = config.batch_size * seq_len
    total_flops = flops_per_token(model_config, seq_len) * tokens_per_step * config.steps
    if pod:
        where, peak = f"{hardware} ({cli.plural(pod.chips, 'chip')} x {pod.tflops:g} TFLOP/s)", pod.chips * pod.tflops * 1e12
    else:
        where = f"{mesh.size} x {jax.devices()[0].device_kind}"
        peak = device_peak_flops(peak_tflops)
    days = total_flops / (peak * assumed_mfu) / 86400
    gib = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"
    rows = [
        ("parameters", f"{n:,}"),
        ("mesh", f"{dict(mesh.shape)} ({cli.plural(mesh.size, 'device')})"),
        ("attention, remat", f"{attention}, {model_config.remat}"),
        ("per-device memory: arguments", gib(memory.argument_size_in_bytes)),
        ("per-device memory: outputs", gib(memory.output_size_in_bytes)),
        ("per-device memory: temporaries", gib(memory.temp_size_in_bytes)),
        ("per-device memory: code", gib(memory.generated_code_size_in_bytes)),
        ("per-device memory: peak", gib(peak_bytes(memory))),
    ]
    if pod:
        rows.append((f"fits one chip of {hardware}", fit_verdict(model_config, config, mesh, pod, peak_bytes(memory), memory_of)))
    rows += [
        ("tokens per step", f"{tokens_per_step:,} ({config.batch_size} x {seq_len}, {micro // mesh.size} "
                            f"sequences per device per micro-batch)"),
        ("training tokens", f"{tokens_per_step * config.steps:,} ({cli.plural(config.steps, 'step')})"),
        ("FLOPs (6N + attention)", f"{total_flops:.3g}"),
        (f"time at {assumed_mfu:.0%} MFU on {where}", f"{days:.2f} days"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
