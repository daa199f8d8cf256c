"""One prepared measurement of whatever accelerator JAX finds: training, evaluation, generation and
the emergency checkpoint, in one table and one JSON file.

    python benchmarks/accelerator.py                   # one H100/H200 or TPU host: under 6 minutes
    python benchmarks/accelerator.py --smoke           # the same code paths on tiny shapes (CPU, < 1 min)
    python benchmarks/accelerator.py --sizes=600m --attention=flash,cudnn --remat=dots

Accelerator time comes in short slots, so everything here goes through the repository's own
functions (train.py's step, evaluate.py's batching, generate.py's sampler, checkpoint.py's
Checkpointer) and the run is bounded: training rows stop starting once --train_budget_s is spent
(the rest are listed as not run), and the JSON is rewritten after every section, so a run cut
short still leaves what it measured.

1) Training: forward, backward and AdamW with bf16 moments (train_step.make_train_step) at sequence
   2,048 for each size x attention implementation x remat policy, at the largest per-device batch
   of --batches that fits: the compiled step's memory (XLA's memory analysis) is checked against
   the device's limit before running, and an out-of-memory error tries the next smaller batch.
   tokens/s over --steps timed steps after one untimed; MFU = model.flops_per_token (6N +
   attention) x tokens/s / the chips' bf16 peak (budget.device_peak_flops: its table; a CPU
   measures its own); "memory" is the compiled step's (arguments + outputs not aliased to
   donated inputs + temporaries); "peak" is memory_stats()'s high-water mark of the process so far
   (None on a CPU); "compile" is lowering plus compiling.
2) Evaluation: the 600m model with random weights scores 1,000 HellaSwag-shaped requests (each
   item: one context, four endings; token lengths of the bundled samples/eval/hellaswag.jsonl items
   under a tokenizer trained here on samples/, ids drawn at random) through evaluate.JulianLM.score,
   evaluate.py's own grouping, bucketing and batching. Cold includes compiling each padded shape;
   warm is the same requests again.
3) Generation: the 600m model, greedy, 256 new tokens after 128-token prompts, batch 1 and 32,
   through generate.generate (no stop token, so every row decodes all 256). Warm is the second call.
4) Emergency checkpoint: the 600m training state (fp32 parameters, bf16 moments filled with noise,
   which does not compress) saved by checkpoint.Checkpointer to local disk: seconds the caller is
   blocked (device to host copy) and seconds until committed, against the 30 s preemption budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
if "--smoke" in sys.argv:
    # The smoke run checks code paths, not speed: unoptimised machine code compiles in half the time
    # (read before JAX starts, so before argparse).
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import budget  # noqa: E402
import checkpoint  # noqa: E402
import evaluate  # noqa: E402
import generate  # noqa: E402
import optim  # noqa: E402
import parallel  # noqa: E402
import train  # noqa: E402
import train_step  # noqa: E402
from layer_ops import AUTO_ATTENTION  # noqa: E402
from model import ModelConfig, Transformer, flops_per_token, num_params  # noqa: E402
from tokenizer import BOS_ID, Tokenizer, train_tokenizer  # noqa: E402
from tokenizer_files import open_tokenizer  # noqa: E402

SEQ_LEN = 2048
# What each backend can run; the first is what --attention=auto picks there (layer_ops.AUTO_ATTENTION).
IMPLS = {"gpu": ("flash", "cudnn", "einsum"), "tpu": ("splash", "einsum"), "cpu": ("einsum",)}
REMATS = ("none", "dots", "full")
# --smoke: the same code paths on shapes a CPU runs in seconds (sequence 128: one kernel tile).
SMOKE = dict(sizes=("tiny",), seq_len=128, batches=(4, 2, 1), steps=2, requests=40, eval_size="tiny",
             generate_batches=(1, 4), new_tokens=16, prompt=16, remats=("none", "dots"))
FULL = dict(seq_len=SEQ_LEN, batches=(16, 8, 4, 2, 1), steps=5, requests=1000, eval_size="600m",
            generate_batches=(1, 32), new_tokens=256, prompt=128)
TINY = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=2, d_ff=128)
SHAPE_FLAGS = ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff")


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def model_config(size: str, seq_len: int, **execution) -> ModelConfig:
    """The shape of configs/<size>.flags (its includes followed), or the smoke run's tiny one."""
    if size == "tiny":
        return ModelConfig(**TINY, max_seq_len=seq_len, **execution)
    values: dict[str, int] = {}

    def read(path: str) -> None:
        with open(path) as f:
            for line in f:
                name, _, value = line.strip().lstrip("-").partition("=")
                if name == "flagfile":
                    read(os.path.join(ROOT, value))
                elif name in SHAPE_FLAGS:
                    values[name] = int(value)

    read(os.path.join(ROOT, "configs", f"{size}.flags"))
    return ModelConfig(**values, max_seq_len=seq_len, **execution)


def is_out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def memory_limit() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return stats.get("bytes_limit") if stats else None


def device_peak_gib() -> float | None:
    stats = jax.devices()[0].memory_stats()
    return stats["peak_bytes_in_use"] / 2**30 if stats and "peak_bytes_in_use" in stats else None


# --- Training -------------------------------------------------------------------------------------

def compile_step(config: ModelConfig, per_device: int, mesh):
    """(compiled train step, its TrainConfig, compile seconds) for `per_device` sequences per device."""
    train_config = train.TrainConfig(steps=1_000, batch_size=per_device * mesh.size, warmup_steps=10,
                                     opt_state_dtype="bfloat16")
    optimizer = optim.make_optimizer(train_config)
    abstract = train_step.abstract_state(config, optimizer, mesh)
    tokens = jax.ShapeDtypeStruct((1, train_config.batch_size, config.max_seq_len + 1), jnp.int32,
                                  sharding=parallel.batch_sharding(mesh))
    start = time.perf_counter()
    compiled = train_step.make_train_step(optimizer, parallel.shardings(abstract), mesh).lower(
        abstract, {"tokens": tokens}, jax.random.key(0), jax.ShapeDtypeStruct((), jnp.int32),
        jax.ShapeDtypeStruct((), jnp.bool_), jax.ShapeDtypeStruct((mesh.size,), jnp.bool_)).compile()
    return compiled, train_config, time.perf_counter() - start


def time_step(config: ModelConfig, compiled, train_config: train.TrainConfig, mesh, steps: int) -> float:
    """Seconds per step of `compiled` on a fresh state, over `steps` steps after one untimed."""
    optimizer = optim.make_optimizer(train_config)
    abstract = train_step.abstract_state(config, optimizer, mesh)
    state = jax.jit(lambda k: train_step.init_state(config, optimizer, k),
                    out_shardings=parallel.shardings(abstract))(jax.random.key(0))
    rows = np.random.default_rng(0).integers(0, config.vocab_size, (train_config.batch_size, config.max_seq_len + 1))
    batch = parallel.global_batch({"tokens": rows.astype(np.int32)}, 1, mesh)
    key, step, nan = jax.random.key(1), jnp.int32(0), jnp.bool_(False)
    votes = parallel.stop_votes(False, mesh)
    # The step's last argument is its loss function's own arrays: none for pretraining's loss.
    args = (*jax.device_put((key, step, nan, votes), compiled.input_shardings[0][2:6]), None)
    state, metrics = jax.block_until_ready(compiled(state, batch, *args))
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch, *args)
    jax.block_until_ready((state, metrics))
    seconds = (time.perf_counter() - start) / steps
    if not np.isfinite(float(metrics["loss"])):
        raise RuntimeError(f"non-finite loss {float(metrics['loss'])} for {config}")
    return seconds


def train_row(size: str, attention: str, remat: str, setup: dict, mesh, start_batch: int) -> dict:
    """One training row at the largest per-device batch of setup["batches"] (from start_batch down) that fits."""
    config = model_config(size, setup["seq_len"], attention=attention, remat=remat)
    row = {"section": "training", "model": size, "attention": attention, "remat": remat, "batch": None,
           "tokens_per_s": None, "mfu": None, "memory_gib": None, "peak_gib": None, "compile_s": None,
           "note": ""}
    limit = memory_limit()
    candidates = [b for b in setup["batches"] if b <= start_batch]
    while candidates:
        per_device = candidates.pop(0)
        try:
            compiled, train_config, compile_s = compile_step(config, per_device, mesh)
            needed = budget.peak_bytes(compiled.memory_analysis())
            if limit and needed > limit:
                # Temporaries grow with the batch: jump to the largest batch they would fit at.
                fixed = needed - compiled.memory_analysis().temp_size_in_bytes
                per_sequence = compiled.memory_analysis().temp_size_in_bytes / per_device
                candidates = [b for b in candidates if fixed + per_sequence * b <= limit] or candidates[-1:]
                log(f"  {size} {attention} {remat} batch {per_device}: needs {needed / 2**30:.1f} GiB > "
                    f"{limit / 2**30:.1f} GiB; next {candidates[0]}")
                continue
            seconds = time_step(config, compiled, train_config, mesh, setup["steps"])
        except Exception as e:  # noqa: BLE001 - an OOM tries a smaller batch; anything else ends the row
            gc.collect()
            if is_out_of_memory(e) and candidates:
                log(f"  {size} {attention} {remat} batch {per_device}: out of memory; next {candidates[0]}")
                continue
            row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            return row
        tokens = train_config.batch_size * config.max_seq_len
        peak = budget.device_peak_flops()
        row.update(batch=per_device, tokens_per_s=tokens / seconds,
                   mfu=flops_per_token(config, config.max_seq_len) * tokens / seconds / peak,
                   memory_gib=needed / 2**30, peak_gib=device_peak_gib(), compile_s=compile_s)
        del compiled
        gc.collect()
        return row
    row["note"] = "no batch fits"
    return row


def training(setup: dict, sizes, impls, remats, budget_s: float, rows: list[dict], save) -> None:
    """Rows in order of interest: the largest size first, the backend's default attention first."""
    mesh = parallel.make_mesh(1)
    started, longest = time.perf_counter(), 0.0
    best: dict[tuple[str, str], int] = {}  # (size, attention) -> batch at the previous remat
    for size in sorted(sizes, key=lambda s: -num_params(model_config(s, setup["seq_len"]))):
        for attention in impls:
            for remat in remats:
                spent = time.perf_counter() - started
                if spent + longest > budget_s:
                    rows.append({"section": "training", "model": size, "attention": attention, "remat": remat,
                                 "note": f"not run: --train_budget_s={budget_s:g} spent"})
                    continue
                # More recomputation never needs more memory: start where the previous remat fitted.
                start_batch = max(setup["batches"]) if remat == remats[0] else best.get((size, attention), 1) * 4
                log(f"training {size} attention={attention} remat={remat} ...")
                row_start = time.perf_counter()
                row = train_row(size, attention, remat, setup, mesh, start_batch)
                longest = max(longest, time.perf_counter() - row_start)
                if row["batch"]:
                    best[(size, attention)] = row["batch"]
                rows.append(row)
                save()


# --- Evaluation, generation, checkpoint -----------------------------------------------------------

def random_model(size: str, setup: dict) -> Transformer:
    config = model_config(size, setup["seq_len"])
    return jax.jit(lambda k: Transformer(config, k))(jax.random.key(0))


def hellaswag_requests(tokenizer: Tokenizer, count: int, vocab_size: int, seed: int = 0
                       ) -> list[tuple[list[int], list[int]]]:
    """`count` requests shaped like HellaSwag's: lm-eval's context (activity label, ctx_a, ctx_b)
    and " " + ending, at the token lengths of the bundled items, with random ids (4 per context)."""
    with open(os.path.join(ROOT, "samples", "eval", "hellaswag.jsonl")) as f:
        items = [json.loads(line) for line in f if line.strip()]
    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(8, vocab_size, n).tolist()
    requests = []
    while len(requests) < count:
        item = items[rng.integers(len(items))]
        context = f"{item['activity_label']}: {item['ctx_a']} {item['ctx_b'].capitalize()}"
        shared = [BOS_ID, *ids(len(tokenizer.encode(context)))]
        requests += [(shared, ids(len(tokenizer.encode(" " + ending)))) for ending in item["endings"]]
    return requests[:count]


def evaluation(model: Transformer, tokenizer: Tokenizer, size: str, count: int) -> dict:
    lm = evaluate.JulianLM(model, tokenizer)
    requests = hellaswag_requests(tokenizer, count, model.config.vocab_size)
    times = []
    for _ in range(2):  # cold (compiles each padded shape), then warm
        start = time.perf_counter()
        lm.score(requests, disable_tqdm=True)
        times.append(time.perf_counter() - start)
    return {"section": "evaluation", "model": size, "batch": lm.batch_size, "requests": count,
            "requests_per_s": count / times[1], "cold_requests_per_s": count / times[0],
            "compile_s": times[0] - times[1], "peak_gib": device_peak_gib()}


def generation(model: Transformer, size: str, batch: int, setup: dict) -> dict:
    prompts = np.random.default_rng(batch).integers(8, model.config.vocab_size, (batch, setup["prompt"])).tolist()
    times = []
    for _ in range(2):  # cold (compiles prefill and step), then warm
        start = time.perf_counter()
        out = generate.generate(model, prompts, setup["new_tokens"], jax.random.key(0), temperature=0.0, stop_ids=())
        times.append(time.perf_counter() - start)
    new = sum(len(row) for row in out)
    return {"section": "generation", "model": size, "batch": batch, "new_tokens": setup["new_tokens"],
            "tokens_per_s": new / times[1], "compile_s": times[0] - times[1], "peak_gib": device_peak_gib()}


def emergency_checkpoint(model: Transformer, size: str, directory: str) -> dict:
    """Save the whole training state twice (the first also lays out the directory); the second's figures."""
    optimizer = optim.make_optimizer(train.TrainConfig(steps=10, batch_size=1, warmup_steps=1))
    opt_state = jax.jit(optimizer.init)(model)
    # Fresh moments are zeros, which compress to nothing: give them trained-like noise.
    noise = lambda x: (1e-3 * jax.random.normal(jax.random.key(1), x.shape)).astype(x.dtype)
    opt_state = jax.block_until_ready(jax.tree.map(
        lambda x: noise(x) if jnp.issubdtype(x.dtype, jnp.floating) else x, opt_state))
    ckpt = checkpoint.Checkpointer(directory, keep=1)
    meta = {"data_offset": 0, "rollbacks": 0, "rng": [0, 0]}
    for step in (1, 2):
        start = time.perf_counter()
        ckpt.save(step, model, opt_state, meta, {"model": dataclasses.asdict(model.config)}, b"tokenizer")
        blocked = time.perf_counter() - start
        ckpt.wait()
        committed = time.perf_counter() - start
    ckpt.close()
    size_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(directory, "2"))
                     for f in fs)
    return {"section": "checkpoint", "model": size, "blocked_s": blocked, "commit_s": committed,
            "gib": size_bytes / 2**30}


# --- The table ------------------------------------------------------------------------------------

def table(rows: list[dict]) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    lines = [("section", "model", "attention", "remat", "batch", "throughput", "MFU", "memory GiB",
              "peak GiB", "compile s", "note")]
    for r in rows:
        section = r["section"]
        if section == "training":
            throughput = fmt(r.get("tokens_per_s"), ",.0f") + " tok/s" if r.get("tokens_per_s") else "-"
        elif section == "evaluation":
            throughput = f"{r['requests_per_s']:,.1f} req/s (cold {r['cold_requests_per_s']:,.1f})"
        elif section == "generation":
            throughput = f"{r['tokens_per_s']:,.1f} tok/s"
        else:
            throughput = f"blocked {r['blocked_s']:.2f} s, committed {r['commit_s']:.2f} s"
        lines.append((section, r["model"], r.get("attention", "-"), r.get("remat", "-"), fmt(r.get("batch"), "d"),
                      throughput, fmt(r.get("mfu"), ".1%"), fmt(r.get("memory_gib"), ".3g"),
                      fmt(r.get("peak_gib"), ".3g"), fmt(r.get("compile_s"), ".1f"),
                      r.get("note") or (f"{r['gib']:.2f} GiB" if section == "checkpoint" else "")))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(lines[0]))]
    out = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="Tiny shapes on any backend (a CPU in < 1 min).")
    parser.add_argument("--out", default="accelerator.json", help="JSON of every row (rewritten after each section).")
    parser.add_argument("--sizes", default="100m,250m,600m", help="Training sizes (configs/<size>.flags).")
    parser.add_argument("--attention", default="", help="Attention implementations (default: all this backend runs).")
    parser.add_argument("--remat", default="", help="Remat policies of the training rows (default: none,dots,full; "
                        "--smoke: none,dots).")
    parser.add_argument("--train_budget_s", type=float, default=150.0,
                        help="No training row starts once this is spent (with the longest row so far).")
    parser.add_argument("--sections", default="training,evaluation,generation,checkpoint", help="What to run.")
    parser.add_argument("--checkpoint_dir", default=None, help="Local directory for the checkpoint (default: a temporary one).")
    args = parser.parse_args()

    backend = jax.default_backend()
    setup = {**FULL, "sizes": tuple(args.sizes.split(","))} if not args.smoke else SMOKE
    impls = tuple(args.attention.split(",")) if args.attention else IMPLS.get(backend, ("einsum",))
    if args.smoke and not args.attention:
        impls = (*IMPLS.get(backend, ()), "flash") if backend == "cpu" else impls  # a kernel path, interpreted
    sections = args.sections.split(",")
    eval_size = setup["eval_size"]
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "backend": backend, "device_kind": jax.devices()[0].device_kind, "devices": jax.device_count(),
              "smoke": args.smoke, "auto_attention": AUTO_ATTENTION.get(backend), "rows": []}
    rows = result["rows"]

    def save() -> None:
        with open(args.out + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(args.out + ".tmp", args.out)

    log(f"{jax.device_count()} x {result['device_kind']} ({backend}); attention {impls}")
    if "training" in sections:
        remats = tuple(args.remat.split(",")) if args.remat else setup.get("remats", REMATS)
        training(setup, setup["sizes"], impls, remats, args.train_budget_s, rows, save)
    if {"evaluation", "generation", "checkpoint"} & set(sections):
        model = random_model(eval_size, setup)
        if "checkpoint" in sections:
            log(f"checkpoint {eval_size} ...")
            with tempfile.TemporaryDirectory(dir=args.checkpoint_dir) as directory:
                rows.append(emergency_checkpoint(model, eval_size, directory))
            save()
        if "generation" in sections:
            for batch in setup["generate_batches"]:
                log(f"generation {eval_size} batch {batch} ...")
                rows.append(generation(model, eval_size, batch, setup))
            save()
        if "evaluation" in sections:
            log(f"evaluation {eval_size}: {setup['requests']} requests ...")
            with tempfile.TemporaryDirectory() as work:
                texts = [os.path.join(ROOT, "samples", name) for name in sorted(os.listdir(os.path.join(ROOT, "samples")))
                         if name.endswith(".txt")]
                tokenizer = open_tokenizer(train_tokenizer(texts, os.path.join(work, "tok"), vocab_size=4096,
                                                           max_sentences=20_000))
            rows.append(evaluation(model, tokenizer, eval_size, setup["requests"]))
            save()
    save()
    print(f"{result['devices']} x {result['device_kind']} ({backend}), {result['date']}"
          f"{' (--smoke)' if args.smoke else ''}; sequence {setup['seq_len']}")
    print(table(rows))


if __name__ == "__main__":
    main()
