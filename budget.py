"""What a run costs: the chips' peak FLOP/s (for MFU), the named pods, and the dry run.

`--dry_run --hardware=NAME` compiles the program for NAME's own chips on this host (XLA:TPU from
libtpu's topologies, XLA:GPU from the CUDA plugin and configs/gpu/'s target configs), prints
XLA's per-chip memory (and what is live at its peak: live_buffers.py), the fused kernels,
whether it fits a chip (and which flag would make it fit, compiled to find out), and the time
its token budget takes at an assumed MFU. Without the target's compiler it compiles for this
host's CPU instead, labelled as an estimate. On a CPU the MFU peak is measured once per machine
and compute dtype and cached, so runs compare.
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib.util
import json
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

import cli
from layer_ops import AUTO_ATTENTION, attention_impl
from live_buffers import Buffer, ModelShapes, buffer_groups, dump_dir, peak_buffers
from model import REMAT_POLICIES, ModelConfig, flops_per_token, num_params
from optim import TrainConfig
from parallel import check_batch, make_mesh

# The dry run's program compiled for (model config, train config, mesh): train.py's step, sft.py's
# and dpo.py's (the same step with their loss), evaluate.py's scoring.
CompileFn = Callable[[ModelConfig, Any, Mesh], Any]


# bf16 dense TFLOP/s per chip, from vendor spec sheets, keyed by a substring of device_kind.
PEAK_TFLOPS = {"TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
               "TPU v5": 459.0, "TPU v6 lite": 918.0, "TPU v6e": 918.0, "H100": 989.0,
               "H200": 989.0, "A100": 312.0}


class Pod(NamedTuple):
    chips: int
    tflops: float  # bf16 dense peak per chip
    memory_gib: float  # HBM per chip
    backend: str  # what --attention=auto runs there (layer_ops.AUTO_ATTENTION)
    # How XLA names it for compiling without one (jax.experimental.topologies.get_topology_desc):
    # a TPU slice's "generation:shape"; a GPU box's "hosts x nodes x devices" and its target config.
    topology: str
    target_config: str = ""  # configs/gpu/ file: the GPU's description, as XLA reads it


def _tpu(chips: int, tflops: float, memory_gib: float, topology: str) -> Pod:
    return Pod(chips, tflops, memory_gib, "tpu", topology)


def _gpu(chips: int, tflops: float, memory_gib: float, target_config: str) -> Pod:
    return Pod(chips, tflops, memory_gib, "gpu", f"1 x 1 x {chips}", target_config)


# Named pods for --dry_run, from vendor spec sheets. A v4 or v5p slice is named by its cores
# (two per chip: a v4-32 has 16 chips); v5e and v6e slices by their chips.
HARDWARE = {
    "v4-8": _tpu(4, 275.0, 32, "v4:2x2x1"), "v4-32": _tpu(16, 275.0, 32, "v4:2x2x4"),
    "v4-128": _tpu(64, 275.0, 32, "v4:4x4x4"),
    "v5e-8": _tpu(8, 197.0, 16, "v5e:2x4"), "v5e-16": _tpu(16, 197.0, 16, "v5e:4x4"),
    "v5e-256": _tpu(256, 197.0, 16, "v5e:16x16"),
    "v5p-8": _tpu(4, 459.0, 95, "v5p:2x2x1"), "v5p-32": _tpu(16, 459.0, 95, "v5p:2x2x4"),
    "v6e-8": _tpu(8, 918.0, 32, "v6e:2x4"), "v6e-16": _tpu(16, 918.0, 32, "v6e:4x4"),
    "v6e-64": _tpu(64, 918.0, 32, "v6e:8x8"), "v6e-256": _tpu(256, 918.0, 32, "v6e:16x16"),
    "1xH100": _gpu(1, 989.0, 79.1, "h100_sxm.txtpb"), "8xH100": _gpu(8, 989.0, 79.1, "h100_sxm.txtpb"),
    "1xH200": _gpu(1, 989.0, 141, "h200.txtpb"), "8xH200": _gpu(8, 989.0, 141, "h200.txtpb"),
}
GPU_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "gpu")

# What compiles for each backend on a host without its chips: the module, and how to install it.
COMPILERS = {"tpu": ("libtpu", 'pip install "libtpu==0.0.42.*" (the jax[tpu]==0.10.2 pin)'),
             "gpu": ("jax_plugins.xla_cuda12", "pip install -r requirements-compile-gpu.txt: the CUDA plugin")}
# The fused kernels' custom calls in a compiled program: Mosaic (TPU Pallas) and Triton (GPU
# Pallas), named by the function that called pallas_call (splash_mha_fwd..., mha_backward).
KERNEL_TARGETS = ('custom_call_target="tpu_custom_call"', 'custom_call_target="__gpu$xla.gpu.triton"')
KERNEL_CALLER = re.compile(r'op_name="[^"]*?([\w.-]+)/pallas_call"')
INSTRUCTION = re.compile(r'^\s*%?([\w.-]+?)(?:\.\d+)? = ')


# A program fits a chip when it needs at most this share of its memory: the runtime and the
# allocator's fragmentation need the rest.
FIT_FRACTION = 0.9


def prepare_host(hardware: str) -> None:
    """Before any JAX call of a --dry_run for `hardware`: compile on this host's CPU, whatever
    accelerator it has, with the pod's chip count faked there for the estimate's fallback,
    libtpu's warnings about a host that is no TPU worker silenced, and XLA's buffer assignment
    dumped (to a temporary directory) for the table of the buffers live at the peak."""
    if not dump_dir():  # XLA reads its flags once, when the first backend starts
        dump = tempfile.mkdtemp(prefix="xla_dump_")
        atexit.register(shutil.rmtree, dump, ignore_errors=True)
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump} --xla_dump_hlo_as_text".strip()
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", HARDWARE[hardware].chips)
    # A program compiled for a topology has no client to load a cached executable with: every
    # cache lookup would print "Error reading persistent compilation cache entry" and save nothing.
    jax.config.update("jax_enable_compilation_cache", False)
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", hardware if HARDWARE[hardware].backend == "tpu" else "v4-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # dry runs side by side share libtpu


def target_devices(hardware: str) -> list | None:
    """The devices of the pod `hardware` names as its own compiler sees them, or None (with a
    line saying why and how to fix it) when that compiler is not installed here."""
    pod = HARDWARE[hardware]
    module, install = COMPILERS[pod.backend]
    if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
        print(f"{hardware}: XLA's {pod.backend.upper()} compiler is not installed here ({install}); "
              f"what follows is an ESTIMATE, compiled for this CPU")
        return None
    from jax.experimental import topologies

    if pod.backend == "tpu":  # a v4 or v5p chip is one device of two cores ("megacore")
        megacore = pod.topology.startswith(("v4", "v5p"))
        topo = topologies.get_topology_desc(pod.topology, "tpu", **({"chip_config_name": "megacore"} if megacore else {}))
    else:
        with open(os.path.join(GPU_CONFIGS, pod.target_config)) as f:
            topo = topologies.get_topology_desc("", "cuda", topology=pod.topology, target_config=f.read())
    return list(topo.devices)


def kernels(compiled) -> list[str]:
    """The fused attention kernels (Pallas: Mosaic on a TPU, Triton on a GPU) in a compiled program."""
    lines = (line for line in compiled.as_text().splitlines() if any(t in line for t in KERNEL_TARGETS))
    return sorted({(KERNEL_CALLER.search(line) or INSTRUCTION.search(line)).group(1) for line in lines})


# The CPU peak's matmuls (m, k, n), the same for every model so that runs on one machine compare:
# a large square, and the 100m config's MLP on 2,048 tokens (a CPU does best on such shapes).
CPU_PEAK_SHAPES = ((2048, 2048, 2048), (2048, 640, 2560), (2048, 2560, 640))


def measure_matmul_flops(shapes: Sequence[tuple[int, int, int]], repeats: int = 3, dtype: str = "bfloat16") -> float:
    """Best `dtype` x `dtype` -> f32 FLOP/s of the default device over (m, k, n) matmul shapes.

    The MFU denominator where no spec sheet applies: CPUs differ by 10x (with AMX or without),
    and a CPU reaches its best on shapes like the model's, not on large squares.
    """
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    best = float("inf")
    for m, k, n in shapes:
        a, b = jnp.ones((m, k), dtype), jnp.ones((k, n), dtype)
        matmul(a, b).block_until_ready()
        for _ in range(repeats):
            start = time.perf_counter()
            matmul(a, b).block_until_ready()
            best = min(best, (time.perf_counter() - start) / (2 * m * k * n))
    return 1 / best


# The instruction sets that decide a CPU's matmul peak (AMX tiles: ~10x; AVX-512 with bf16 dot
# products: ~2x), as /proc/cpuinfo names them: a VM may hide them from a CPU model that has them.
MATMUL_ISA = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2", "fma")


def cpu_key(dtype: str = "bfloat16") -> str:
    """What a CPU's peak in `dtype` depends on: its model, the cores this process may use, the
    matmul instruction sets it exposes, and the dtype."""
    name, isa = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read().splitlines()
        name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), name)
        flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
        isa = [f for f in MATMUL_ISA if f in flags]
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {cores} cores, {' '.join(isa) or 'no matmul ISA flags'}, {dtype}"


def cpu_peak_flops(cache_path: str | None = None, key: str | None = None, dtype: str = "bfloat16") -> float:
    """This CPU's `dtype` matmul FLOP/s on CPU_PEAK_SHAPES, measured once per `key` (default
    cpu_key(dtype)) and kept in `cache_path` (default ~/.cache/julian/cpu_peak_flops.json). A run
    computing in fp32 divides by the fp32 peak: bf16's would misstate its MFU several-fold.

    Measured at every start, the peak varied by 2x with the machine's load, and so did the MFU
    of the same speed; cached, every run on a machine divides by the same number. Delete the
    file to measure again.
    """
    cache_path = cache_path or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                            "julian", "cpu_peak_flops.json")
    key = key or cpu_key(dtype)
    try:
        with open(cache_path) as f:
            cached = json.load(f)
    except (OSError, ValueError):
        cached = {}
    if key not in cached:
        cached[key] = measure_matmul_flops(CPU_PEAK_SHAPES, repeats=5, dtype=dtype)
        print(f"measured the {dtype} matmul peak of this CPU ({key}) for MFU: {cached[key] / 1e12:.3f} "
              f"TFLOP/s, kept in {cache_path}")
        try:  # written whole or not at all: processes measuring at once each replace the file
            os.makedirs(os.path.dirname(cache_path), exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(cache_path), delete=False) as f:
                json.dump(cached, f, indent=1)
            os.replace(f.name, cache_path)
        except OSError:
            pass  # an unwritable cache costs a measurement per run, nothing more
    return cached[key]


def device_peak_flops(peak_tflops: float = 0.0, dtype: str = "bfloat16") -> float:
    """Peak FLOP/s of all devices together, for MFU; `peak_tflops` per device overrides. A CPU's
    is measured in the run's compute `dtype`; an accelerator's is its bf16 spec-sheet figure
    (XLA runs fp32 matmuls there in bf16 passes by default)."""
    devices = jax.devices()
    if peak_tflops:
        return peak_tflops * 1e12 * len(devices)
    if devices[0].platform == "cpu":  # fake CPU devices share the same cores: one peak in all
        return cpu_peak_flops(dtype=dtype)
    kind = devices[0].device_kind
    per_chip = next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
    if per_chip is None:
        raise ValueError(f"unknown peak FLOP/s for device {kind!r}: pass --peak_tflops")
    return per_chip * 1e12 * len(devices)


def peak_bytes(memory) -> int:
    """What the step holds at once: its inputs, outputs that do not reuse a donated input, temporaries."""
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes)


@dataclasses.dataclass(frozen=True)
class Program:
    """What the dry run reads of one compiled program: XLA's per-chip memory analysis, its fused
    kernels and compile seconds, and (when XLA dumps its buffer assignment) the buffers live at
    the peak; or, when the compiler refused it for want of memory, why."""
    memory: Any
    kernels: tuple[str, ...]
    seconds: float
    refused: str = ""
    live_peak: int = 0  # bytes live at the peak, by XLA's heap simulation
    buffers: tuple[Buffer, ...] = ()

    @property
    def peak(self) -> int | None:
        return None if self.refused else peak_bytes(self.memory)


def compile_program(compile_fn: CompileFn, model_config: ModelConfig, config: Any, mesh: Mesh) -> Program:
    """`compile_fn`'s program for `mesh`, read as a Program. XLA:TPU refuses a program whose
    temporaries exceed the chip (it checks nothing else): that is a verdict, not an error."""
    dump = dump_dir()
    known = set(os.listdir(dump)) if dump and os.path.isdir(dump) else set()
    start = time.perf_counter()
    try:
        compiled = compile_fn(model_config, config, mesh)
    except Exception as e:  # noqa: BLE001 - only the compiler's out-of-memory refusal is an answer
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        line = next(line for line in str(e).splitlines() if "RESOURCE_EXHAUSTED" in line)
        return Program(None, (), time.perf_counter() - start, line.split("RESOURCE_EXHAUSTED:", 1)[-1].strip())
    seconds = time.perf_counter() - start
    live_peak, buffers = peak_buffers(dump, known, ModelShapes.of(model_config, mesh)) if dump else (0, ())
    return Program(compiled.memory_analysis(), tuple(kernels(compiled)), seconds, live_peak=live_peak, buffers=buffers)


def fit_verdict(model_config: ModelConfig, config: TrainConfig, devices: Sequence, fsdp: int, pod: Pod,
                program: Program, compile_fn: CompileFn) -> str:
    """"fits", or why not and the first of these that fits (each one compiled to find out): each
    --remat that recomputes more (REMAT_POLICIES' order, full last), the pod's fused attention
    kernel, the state sharded over every chip (--fsdp), then a doubled --grad_accum under full remat."""
    limit = FIT_FRACTION * pod.memory_gib * 2**30
    if program.peak is not None and program.peak <= limit:
        return (f"fits: {program.peak / 2**30:.1f} GiB of {pod.memory_gib:g} GiB per chip, "
                f"{1 - program.peak / (pod.memory_gib * 2**30):.0%} headroom")
    tries = [(f"--remat={r}", dataclasses.replace(model_config, remat=r), config, fsdp)
             for r in REMAT_POLICIES[REMAT_POLICIES.index(model_config.remat) + 1:]]
    full = dataclasses.replace(model_config, remat="full")
    kernel = AUTO_ATTENTION[pod.backend]
    if model_config.attention != kernel:
        tries.append((f"--attention={kernel} --remat=full", dataclasses.replace(full, attention=kernel), config, fsdp))
    if fsdp < len(devices):
        tries.append((f"--fsdp={len(devices)} --remat=full", full, config, len(devices)))
    micro = config.batch_size // config.grad_accum
    accum = config.grad_accum * 2
    # Only micro-batches that split evenly over the devices (parallel.check_batch) compile at all.
    while config.batch_size % accum == 0 and config.batch_size // accum >= len(devices) and len(tries) < 6:
        if (config.batch_size // accum) % len(devices) == 0:
            tries.append((f"--remat=full --grad_accum={accum}", full, dataclasses.replace(config, grad_accum=accum), fsdp))
        accum *= 2
    advice = f"no flag tried makes it fit (micro-batch {micro}): use a bigger slice or chip"
    for flag, model_try, config_try, fsdp_try in tries:
        other = compile_program(compile_fn, model_try, config_try, make_mesh(fsdp_try, devices)).peak
        if other is not None and other <= limit:
            advice = f"with {flag} it needs {other / 2**30:.1f} GiB and fits"
            break
    needs = (f"the compiler refuses it ({program.refused})" if program.refused else
             f"needs {program.peak / 2**30:.1f} GiB per chip, over {FIT_FRACTION:.0%} of a {pod.memory_gib:g} GiB chip")
    return f"does NOT fit: {needs}; {advice}"


def dry_run_devices(hardware: str) -> tuple[list, str]:
    """(devices to compile for, what they are): the named pod's chips through its own compiler;
    without that compiler, or without `hardware`, this host's devices (an estimate for the pod)."""
    devices = target_devices(hardware) if hardware else None
    if devices is not None:
        return devices, f"{hardware}: XLA:{HARDWARE[hardware].backend.upper()} for {len(devices)} x {devices[0].device_kind}"
    local = jax.devices()
    where = f"{len(local)} x {local[0].device_kind} (this host)"
    return local, f"ESTIMATE for {hardware} from {where}" if hardware else where


def _gib(b: int) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def program_rows(program: Program, pod: Pod | None) -> list[tuple[str, str]]:
    """The dry run's lines about one compiled program: per-chip memory, headroom, kernels, seconds."""
    if program.refused:
        rows = [("per-chip memory", f"refused by the compiler: {program.refused}")]
    else:
        memory = program.memory
        rows = [("per-chip memory: arguments", _gib(memory.argument_size_in_bytes)),
                ("per-chip memory: outputs", _gib(memory.output_size_in_bytes)),
                ("per-chip memory: aliased", _gib(memory.alias_size_in_bytes)),
                ("per-chip memory: temporaries", _gib(memory.temp_size_in_bytes)),
                ("per-chip memory: generated code", _gib(memory.generated_code_size_in_bytes)),
                ("per-chip memory: peak", f"{_gib(program.peak)} (arguments + outputs - aliased + temporaries)")]
        if pod:
            free = pod.memory_gib * 2**30 - program.peak
            rows.append(("headroom", f"{_gib(free) if free > 0 else '-' + _gib(-free)} of {pod.memory_gib:g} GiB "
                                     f"({free / (pod.memory_gib * 2**30):.0%})"))
    return rows + [("fused kernels", ", ".join(program.kernels) or "none"),
                   ("compile seconds", f"{program.seconds:.1f}")] + buffer_rows(program)


def buffer_rows(program: Program, largest: int = 8) -> list[tuple[str, str]]:
    """What is live at the peak: bytes per group (live_buffers.BUFFER_GROUPS), then the largest buffers."""
    if not program.buffers:
        return []
    rows = [("live at the peak", f"{_gib(program.live_peak)} in {cli.plural(len(program.buffers), 'buffer')} "
                                 "(XLA's buffer assignment)")]
    rows += [(f"  {group}", f"{_gib(size)} in {cli.plural(count, 'buffer')}")
             for group, (size, count) in buffer_groups(program.buffers).items()]
    rows += [(f"  largest #{i + 1}", f"{_gib(b.size)} {b.shape} {b.group}: {b.op[-70:]}")
             for i, b in enumerate(program.buffers[:largest])]
    return rows


def print_rows(rows: Sequence[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one row of a step's batch costs, for the dry run's token and FLOP counts: sft.py's
    rows are --seq_len long, dpo.py's hold a pair (two sequences of --max_length), and an online
    DPO reference adds a forward pass (a third of a training step's FLOPs) per token."""
    sequences_per_row: int = 1
    seq_len: int | None = None  # default: the model's context
    extra_forward: bool = False


def dry_run(model_config: ModelConfig, config: TrainConfig, fsdp: int, hardware: str, assumed_mfu: float,
            peak_tflops: float, compile_fn: CompileFn, workload: Workload = Workload(),
            before: Sequence[tuple[str, CompileFn]] = ()) -> None:
    """Print parameter count, the compiled per-chip memory and kernels, whether the program fits
    the named pod's chips (and which flag would make it fit), and the compute budget; allocate
    nothing. `hardware` names a pod in HARDWARE, compiled for by its own compiler when installed.
    `before` names programs a run compiles and runs before its steps (dpo.py's reference pass):
    each is compiled too, its memory printed and held against the chip."""
    seq_len = workload.seq_len or model_config.max_seq_len
    pod = HARDWARE[hardware] if hardware else None
    devices, compiled_for = dry_run_devices(hardware)
    check_batch(config.batch_size, config.grad_accum, len(devices))
    model_config = dataclasses.replace(
        model_config, attention=attention_impl(model_config.attention, seq_len, pod.backend if pod else None))
    mesh = make_mesh(fsdp, devices)
    program = compile_program(compile_fn, model_config, config, mesh)
    earlier = [(label, compile_program(fn, model_config, config, mesh)) for label, fn in before]

    n = num_params(model_config)
    micro = config.batch_size // config.grad_accum
    tokens_per_step = config.batch_size * workload.sequences_per_row * seq_len
    flops = flops_per_token(model_config, seq_len) * (4 / 3 if workload.extra_forward else 1)
    total_flops = flops * tokens_per_step * config.steps
    if pod:
        where, peak = f"{hardware} ({cli.plural(pod.chips, 'chip')} x {pod.tflops:g} TFLOP/s)", pod.chips * pod.tflops * 1e12
    else:
        where = f"{mesh.size} x {jax.devices()[0].device_kind}"
        peak = device_peak_flops(peak_tflops, model_config.dtype)
    days = total_flops / (peak * assumed_mfu) / 86400
    rows = [("parameters", f"{n:,}"), ("compiled for", compiled_for),
            ("mesh", f"{dict(mesh.shape)} ({cli.plural(mesh.size, 'device')})"),
            ("attention, remat", f"{model_config.attention}, {model_config.remat}")]
    for label, other in earlier:
        rows += [(f"{label}: per-chip peak", f"refused by the compiler: {other.refused}" if other.refused else
                  f"{_gib(other.peak)} (runs before the steps; its memory is freed before them)"),
                 (f"{label}: fused kernels", ", ".join(other.kernels) or "none")]
    rows += program_rows(program, pod)
    if pod:
        verdict = fit_verdict(model_config, config, devices, fsdp, pod, program, compile_fn)
        limit = FIT_FRACTION * pod.memory_gib * 2**30
        for label, other in earlier:
            if other.peak is None or other.peak > limit:
                verdict += f"; the {label} does NOT fit"
        rows.append(("verdict (one chip)", f"ESTIMATE: {verdict}" if compiled_for.startswith("ESTIMATE") else verdict))
    shape = f"{config.batch_size} x {workload.sequences_per_row} x {seq_len}" if workload.sequences_per_row > 1 \
        else f"{config.batch_size} x {seq_len}"
    rows += [
        ("tokens per step", f"{tokens_per_step:,} ({shape}, {micro // mesh.size} "
                            f"rows per device per micro-batch)"),
        ("training tokens", f"{tokens_per_step * config.steps:,} ({cli.plural(config.steps, 'step')})"),
        ("FLOPs (6N + attention" + (", + reference forward)" if workload.extra_forward else ")"), f"{total_flops:.3g}"),
        (f"time at {assumed_mfu:.0%} MFU on {where}", f"{days:.2f} days"),
    ]
    print_rows(rows)
