"""Throughput and MFU of julian's train step on this CPU, against Hugging Face Llama in torch.

    python benchmarks/train_cpu.py                          # tiny and 100m, batch 4 x 512, 5 timed steps
    python benchmarks/train_cpu.py --malloc=default,keep    # each row under two malloc settings
    python benchmarks/train_cpu.py --configs=tiny --steps=10 --impls=julian
    python benchmarks/train_cpu.py --configs=tiny --impls=julian --steps=20 --loop=tiny --host_seconds=0.3

1) The peak: the best FLOP/s of a bf16 x bf16 -> f32 `jnp.dot` over large square and model-shaped
   matrices, measured here first, since a CPU has no spec-sheet bf16 number (AMX or not, cores
   shared with other processes). MFU = flops_per_token (6N + attention) x tokens/s / that peak,
   for both implementations.
2) julian: `train_step.make_train_step` on `train_step.init_state`, layers unrolled and under `lax.scan`.
3) HF torch: `transformers.LlamaForCausalLM` of the same shapes (untied embeddings, fp32 master
   weights), `torch.autocast("cpu", bfloat16)`, fp32 loss, global-norm clipping, `torch.optim.AdamW`.
Each runs `--warmup` untimed steps (compilation, first allocations), then `--steps` timed steps,
each ended by `jax.block_until_ready` (torch is synchronous); the step time is their median. The
load average is printed: other processes on the same cores skew everything (the benchmark's own
two busy threads count ~2 in it), so rerun when it is near 0 before the start.

Memory: XLA:CPU mallocs its temporaries (GBs for 100m) on every step, and glibc hands big blocks
back to the kernel on free, so every step page-faults them in again (~1.2M faults/step for 100m).
glibc tunables change that, but are read at process start: `--malloc` runs the rows once per named
preset (see MALLOC), in a child process started with that GLIBC_TUNABLES (or in this process when
it already has it). Without `--malloc`, rows run in this process's environment as it is. Prints one
table at the end; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from model import ModelConfig, flops_per_token, num_params  # noqa: E402
import checkpoint  # noqa: E402
import train  # noqa: E402
from budget import measure_matmul_flops  # noqa: E402
from optim import make_optimizer  # noqa: E402
from parallel import make_mesh, shardings  # noqa: E402
from train import TrainConfig  # noqa: E402
from train_step import TrainState, abstract_state, init_state, make_train_step  # noqa: E402

CONFIGS = {  # configs/tiny.flags and configs/100m.flags
    "tiny": dict(vocab_size=4096, d_model=192, n_layers=4, n_heads=3, d_ff=512),
    "100m": dict(vocab_size=50_000, d_model=640, n_layers=12, n_heads=10, d_ff=2560),
}
# GLIBC_TUNABLES presets. hugetlb: malloc madvises transparent huge pages (glibc >= 2.35; THP is
# in "madvise" mode here), so a re-faulted buffer costs a fault per 2 MiB instead of per 4 KiB.
# keep: also keep freed memory in the heap (one arena, no mmap'd chunks, no trimming), so buffers are
# reused without faults at all; the process keeps its peak footprint.
MALLOC = {
    "default": "",
    "hugetlb": "glibc.malloc.hugetlb=1",
    "keep": "glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
            "glibc.malloc.trim_threshold=68719476736",
}


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_seconds() -> float:
    """User + system CPU time of this process: over wall time, the cores it kept busy."""
    t = os.times()
    return t.user + t.system


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_fn(fn, min_reps: int = 3, min_seconds: float = 0.5) -> float:
    """Best wall time of `fn()` (which blocks) after one warm-up call."""
    fn()
    times = []
    while len(times) < min_reps or sum(times) < min_seconds:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_peak(shapes: list[tuple[int, int, int]]) -> tuple[float, list[str]]:
    """Best FLOP/s of bf16 x bf16 -> f32 jnp.dot over (m, k, n) shapes; also a line per shape."""
    best, lines = 0.0, []
    for m, k, n in shapes:
        flops = measure_matmul_flops([(m, k, n)])
        best = max(best, flops)
        lines.append(f"  bf16 dot {m}x{k} @ {k}x{n}: {flops / 1e12:.3f} TFLOP/s")
        log(lines[-1])
    return best, lines


def torch_matmul_flops(m: int, k: int, n: int) -> float:
    """For context only: torch's bf16 matmul (oneDNN) on the same cores."""
    import torch
    torch.set_num_threads(os.cpu_count())
    a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)
    return 2.0 * m * k * n / time_fn(lambda: torch.matmul(a, b))


def bench_julian(name: str, batch: int, seq_len: int, steps: int, warmup: int, scan: bool) -> dict:
    config = ModelConfig(**CONFIGS[name], max_seq_len=seq_len, scan_layers=scan)
    train_config = TrainConfig(steps=1_000_000, batch_size=batch, warmup_steps=10)
    optimizer = make_optimizer(train_config)
    state = init_state(config, optimizer, jax.random.key(0))
    mesh = make_mesh(1)
    step_fn = make_train_step(optimizer, shardings(abstract_state(config, optimizer, mesh)), mesh)
    votes = jnp.zeros((1,), bool)
    train_step = lambda state, batch, key: step_fn(state, batch, key, 0, False, votes)
    tokens = {"tokens": jax.random.randint(jax.random.key(1), (1, batch, seq_len + 1), 0, config.vocab_size)}
    key = jax.random.key(2)

    start = time.perf_counter()
    state, metrics = train_step(state, tokens, key)
    jax.block_until_ready((state, metrics))
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        state, metrics = jax.block_until_ready(train_step(state, tokens, key))
    times, faults = [], minor_faults()
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = jax.block_until_ready(train_step(state, tokens, key))
        times.append(time.perf_counter() - start)
    faults = (minor_faults() - faults) / steps
    loss = float(metrics["loss"])
    del state, metrics
    gc.collect()
    return {"seconds": statistics.median(times), "times": times, "first_step": first, "loss": loss,
            "faults": faults}


def bench_hf(name: str, batch: int, seq_len: int, steps: int, warmup: int) -> dict:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    c = CONFIGS[name]
    hf_config = transformers.LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["d_model"], intermediate_size=c["d_ff"],
        num_hidden_layers=c["n_layers"], num_attention_heads=c["n_heads"],
        num_key_value_heads=c["n_heads"], max_position_embeddings=seq_len, rms_norm_eps=1e-6,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, attention_dropout=0.0)
    model = transformers.LlamaForCausalLM(hf_config).float().train()  # fp32 master weights
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=0.1)
    tokens = torch.randint(0, c["vocab_size"], (batch, seq_len + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(  # fp32 loss, as ours
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.item()

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    times, faults = [], minor_faults()
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    faults = (minor_faults() - faults) / steps
    del model, optimizer
    gc.collect()
    return {"seconds": statistics.median(times), "times": times, "first_step": first, "loss": loss,
            "faults": faults, "params": n_params}



def bench_checkpoint(name: str, directory: str) -> dict:
    """Save time and size of a full training state (fp32 params, bf16 moments) with train.py's
    Checkpointer: the blocking part (device -> host copy) and the time until it is committed."""
    config = ModelConfig(**CONFIGS[name], max_seq_len=2048)
    optimizer = make_optimizer(TrainConfig(steps=10, batch_size=1, warmup_steps=1))
    state = init_state(config, optimizer, jax.random.key(0))
    # Fresh moments are zeros, which compress to nothing: give them trained-like noise.
    noise = lambda x: (jax.random.normal(jax.random.key(1), x.shape, jnp.float32) * 1e-3).astype(x.dtype)
    opt_state = jax.tree.map(lambda x: noise(x) if jnp.issubdtype(x.dtype, jnp.floating) else x, state.opt_state)
    state = jax.block_until_ready(TrainState(state.model, opt_state))
    ckpt = checkpoint.Checkpointer(directory, keep=1)
    meta = {"data_offset": 0, "rollbacks": 0, "rng": [0, 0]}
    result = {}
    for step in (1, 2):  # the first save also creates the directory layout
        start = time.perf_counter()
        ckpt.save(step, state.model, state.opt_state, meta, {"model": {}}, b"tokenizer")
        blocking = time.perf_counter() - start
        ckpt.wait()
        result = {"blocking": blocking, "total": time.perf_counter() - start}
    ckpt.close()
    step_dir = os.path.join(directory, "2")
    result["bytes"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(step_dir) for f in fs)
    result["params"] = num_params(config)
    return result


class SlowHost:
    """A data source whose batches cost the loop's own thread `seconds` each (no prefetch thread
    hides them): a stand-in for a host slow to assemble or send batches."""

    def __init__(self, source, seconds: float):
        self.source, self.seconds = source, seconds

    def iterate(self, start_step: int = 0):
        for item in self.source.iterate(start_step):
            time.sleep(self.seconds)
            yield item


def bench_loop(name: str, batch: int, seq_len: int, steps: int, directory: str, host_seconds: float = 0.0) -> dict:
    """train.fit itself on the bundled text (a 4,096-piece tokenizer trained here), its batches
    costing the loop `host_seconds` each (SlowHost): seconds per step and the share of wall time
    the loop waited for data, from metrics.jsonl's last record."""
    from tokenizer import train_tokenizer
    from tokenizer_files import open_tokenizer
    import stream as data

    files = sorted(os.path.join(ROOT, "samples", f) for f in os.listdir(os.path.join(ROOT, "samples")) if f.endswith(".txt"))
    tokenizer = open_tokenizer(train_tokenizer(files, os.path.join(directory, "tok"), vocab_size=4096))
    config = ModelConfig(**{**CONFIGS[name], "vocab_size": 4096}, max_seq_len=seq_len, scan_layers=False)
    train_config = TrainConfig(steps=steps, batch_size=batch, warmup_steps=1)
    out = os.path.join(directory, f"run_{host_seconds}")
    run = train.RunConfig(output_dir=out, metrics_dir=out, checkpoint_every=steps, log_every=max(1, steps // 2))
    stream = data.open_train_data(",".join(files), tokenizer=tokenizer, seq_len=seq_len, seed=0,
                                  global_batch_size=batch)
    train.fit(config, train_config, run, SlowHost(stream, host_seconds) if host_seconds else stream, [],
              tokenizer.model_bytes, {})
    with open(os.path.join(run.metrics_dir, "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    return {"data_wait": last["data_wait_fraction"], "tokens_per_s": last["tokens_per_s"],
            "seconds": batch * seq_len / last["tokens_per_s"]}


def run_rows(args) -> list[dict]:
    """Every requested (config, implementation) row, in this process."""
    benches = []
    for name in args.configs:
        if "julian" in args.impls:
            for scan in (False, True):
                benches.append((name, f"julian {'scan' if scan else 'unrolled'}",
                                lambda name=name, scan=scan: bench_julian(
                                    name, args.batch, args.seq_len, args.steps, args.warmup, scan)))
        if "hf" in args.impls:
            benches.append((name, "HF torch", lambda name=name: bench_hf(
                name, args.batch, args.seq_len, args.steps, args.warmup)))
    rows = []
    for name, impl, bench in benches:
        log(f"[{name}] {impl} (load {load()}) ...")
        cpu, wall = cpu_seconds(), time.perf_counter()
        result = bench()
        # Cores this process kept busy over the whole row (compile included): well under the core
        # count means serial stretches or, often, other processes taking the cores.
        result["cores"] = (cpu_seconds() - cpu) / (time.perf_counter() - wall)
        log(f"[{name}] {impl}: {result['seconds']:.3f} s/step (first step {result['first_step']:.1f} s; "
            f"steps {', '.join(f'{t:.3f}' for t in result['times'])}; {result['faults']:,.0f} page faults/step; "
            f"{result['cores']:.2f} cores busy; load {load()})")
        rows.append({"config": name, "impl": impl, **result})
    return rows


def malloc_name(tunables: str) -> str:
    return next((k for k, v in MALLOC.items() if v == tunables), f"GLIBC_TUNABLES={tunables}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,100m", type=lambda s: s.split(","),
                        help=f"comma-separated, of {sorted(CONFIGS)}")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps; the first compiles")
    parser.add_argument("--impls", default="julian,hf", type=lambda s: s.split(","), help="julian and/or hf")
    parser.add_argument("--malloc", default="", type=lambda s: [x for x in s.split(",") if x],
                        help=f"comma-separated GLIBC_TUNABLES presets of {list(MALLOC)}, each run in its "
                             "own process; empty: this process's environment")
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="use this peak instead of measuring")
    parser.add_argument("--checkpoint", default="", help="also time saving this config's full training "
                        "state (and its size) with train.py's Checkpointer, e.g. 100m")
    parser.add_argument("--loop", default="", help="also run train.fit on this config (4,096-piece "
                        "vocabulary) and report the share of time spent waiting for data")
    parser.add_argument("--host_seconds", type=float, default=0.0, help="with --loop: also run it with a "
                        "host that spends this long on each batch in the loop's own thread (a sleep), to "
                        "show the loop hides it behind the device's step")
    parser.add_argument("--rows_json", action="store_true", help=argparse.SUPPRESS)  # a --malloc child
    args = parser.parse_args()
    for option, values, known in (("configs", args.configs, CONFIGS), ("impls", args.impls, ("julian", "hf")),
                                  ("malloc", args.malloc, MALLOC)):
        if unknown := set(values) - set(known):
            parser.error(f"--{option}: unknown {sorted(unknown)}, expected some of {list(known)}")
    if args.rows_json:
        print(json.dumps(run_rows(args)))
        return

    tunables = os.environ.get("GLIBC_TUNABLES", "")
    load_start = load()
    log(f"{os.cpu_count()} CPUs, load {load_start}, jax {jax.__version__}, GLIBC_TUNABLES={tunables!r}")
    tokens = args.batch * args.seq_len
    if args.peak_tflops:
        peak, peak_lines = args.peak_tflops * 1e12, [f"  given: {args.peak_tflops} TFLOP/s"]
    else:
        shapes = [(2048, 2048, 2048), (4096, 4096, 4096)]
        for name in args.configs:
            c = CONFIGS[name]
            shapes += [(tokens, c["d_model"], c["d_ff"]), (tokens, c["d_ff"], c["d_model"]),
                       (tokens, c["d_model"], c["vocab_size"])]
        peak, peak_lines = measure_peak(shapes)

    rows = []
    for preset in args.malloc or [malloc_name(tunables)]:
        if preset not in MALLOC or MALLOC[preset] == tunables:
            rows += [dict(r, malloc=preset) for r in run_rows(args)]
            continue
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        if MALLOC[preset]:
            env["GLIBC_TUNABLES"] = MALLOC[preset]
        child = [sys.executable, os.path.abspath(__file__), "--rows_json", f"--configs={','.join(args.configs)}",
                 f"--impls={','.join(args.impls)}", f"--batch={args.batch}", f"--seq_len={args.seq_len}",
                 f"--steps={args.steps}", f"--warmup={args.warmup}"]
        log(f"rows with malloc preset {preset!r}: GLIBC_TUNABLES={MALLOC[preset]!r}, in a child process ...")
        out = subprocess.run(child, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
        rows += [dict(r, malloc=preset) for r in json.loads(out)]
    torch_line = ""
    if "hf" in args.impls:
        torch_line = (f"  torch bf16 matmul 4096^3, for context: "
                      f"{torch_matmul_flops(4096, 4096, 4096) / 1e12:.3f} TFLOP/s")

    # The table: per config, per malloc preset, julian rows then HF.
    header = ("config", "params", "implementation", "malloc", "tokens/s", "step time", "MFU", "julian/HF",
              "cores busy")
    table = []
    order = {name: i for i, name in enumerate(args.configs)}
    rows.sort(key=lambda r: order[r["config"]])  # stable: keeps preset and implementation order
    for r in rows:
        config = ModelConfig(**CONFIGS[r["config"]], max_seq_len=args.seq_len)
        n = num_params(config)
        if "params" in r and r["params"] != n:
            log(f"warning: HF {r['config']} has {r['params']:,} parameters, julian {n:,}")
        hf = next((h for h in rows if h["impl"] == "HF torch" and h["config"] == r["config"]
                   and h["malloc"] == r["malloc"]), None)
        ratio = f"{hf['seconds'] / r['seconds']:.2f}x" if hf and r["impl"] != "HF torch" else ""
        mfu = flops_per_token(config, args.seq_len) * tokens / r["seconds"] / peak
        table.append((r["config"], f"{n / 1e6:.1f}M", r["impl"], r["malloc"], f"{tokens / r['seconds']:,.0f}",
                      f"{r['seconds'] * 1e3:,.0f} ms", f"{mfu:.1%}", ratio, f"{r['cores']:.2f}"))
    widths = [max(len(str(x)) for x in column) for column in zip(header, *table)]
    fmt = lambda row: "  ".join(f"{x:<{w}}" if i < 4 else f"{x:>{w}}" for i, (x, w) in enumerate(zip(row, widths)))
    print(f"\nbatch {args.batch} x seq {args.seq_len} = {tokens:,} tokens/step; median of {args.steps} timed "
          f"steps after {args.warmup} warm-up; {os.cpu_count()} CPUs; jax {jax.__version__}")
    print(f"load average (1/5/15 min): {load_start} at start, {load()} at end")
    print(f"MFU = flops_per_token x tokens/s / the measured bf16 x bf16 -> f32 jnp.dot peak, {peak / 1e12:.3f} TFLOP/s:")
    print("\n".join(peak_lines))
    if torch_line:
        print(torch_line)
    print("malloc presets: " + "; ".join(f"{k}: GLIBC_TUNABLES={MALLOC[k]!r}" for k in dict.fromkeys(r["malloc"] for r in rows) if k in MALLOC))
    print()
    print(fmt(header))
    print(fmt(["-" * w for w in widths]))
    print("\n".join(fmt(row) for row in table))
    extras(args)


def extras(args) -> None:
    """The --checkpoint and --loop measurements, each one line, after the table."""
    import tempfile

    if args.checkpoint:
        with tempfile.TemporaryDirectory() as directory:
            r = bench_checkpoint(args.checkpoint, directory)
        rate = r["bytes"] / r["total"]
        print(f"\ncheckpoint of {args.checkpoint} ({r['params'] / 1e6:.0f}M parameters, fp32 params + bf16 "
              f"moments): {r['bytes'] / 2**30:.2f} GiB; training blocked {r['blocking']:.2f} s, committed "
              f"after {r['total']:.2f} s ({rate / 2**20:,.0f} MiB/s to local disk)")
    if args.loop:
        with tempfile.TemporaryDirectory() as directory:
            r = bench_loop(args.loop, args.batch, args.seq_len, max(args.steps, 4), directory)
            print(f"train.fit on {args.loop} (vocabulary 4,096): {r['tokens_per_s']:,.0f} tokens/s, "
                  f"{r['data_wait']:.2%} of the time waiting for data, the rest computing")
            if args.host_seconds:
                slow = bench_loop(args.loop, args.batch, args.seq_len, max(args.steps, 4), directory, args.host_seconds)
                device, host = r["seconds"], args.host_seconds
                print(f"with a host that takes {host * 1e3:,.0f} ms per batch in the loop's thread: "
                      f"{slow['seconds'] * 1e3:,.0f} ms per step against {device * 1e3:,.0f} ms without it; "
                      f"max(device, host) = {max(device, host) * 1e3:,.0f} ms, their sum {(device + host) * 1e3:,.0f} ms")


if __name__ == "__main__":
    main()
