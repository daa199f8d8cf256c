"""Zero-shot evaluation with lm-evaluation-harness, in process on model.py; and perplexity.

    python evaluate.py --checkpoint=runs/600m --tasks=hellaswag,piqa,lambada_openai --output=results.json
    python evaluate.py --checkpoint=runs/demo/tiny --data_dir=samples/eval          # offline, bundled samples
    python evaluate.py --checkpoint=runs/600m --tasks=french --data_dir=eval_data   # presets: report, french, all
    python evaluate.py --checkpoint=runs/600m --ppl_data=heldout/en_a.txt,heldout/fr_b.txt

`JulianLM` is an lm_eval `LM` (registered as "julian"). lm-eval's own task definitions build the
requests and score them, so the numbers compare with published ones; we only answer
`loglikelihood`, `loglikelihood_rolling` and `generate_until` (the latter with generate.py's
KV-cache sampler). The tokenization of a (context, continuation) pair is lm-eval's own
(`TemplateLM`: <s> + context, continuation = the rest of the encoded whole), which is what its
`hf` backend does on our exported tokenizer, or on an imported model's own Hugging Face tokenizer
(its document start, its eos), so both see the same tokens.

Speed (fp32, same per-item choices: benchmarks/README.md has the figures against the `hf` backend):
  * Requests are scored as prefix trees packed into rows, every shared prefix computed once and
    only the continuations' positions through the vocabulary-sized head (packed_scoring.py).
  * bf16 matmuls by default (`--dtype=float32` for exact comparisons); log-softmax in fp32.

Which tasks (presets: report, french, all), offline task data (`--data_dir`) and the comparison
tables are eval_tasks.py's.

Multi-host: lm-eval runs in every process on all requests (it sees world_size 1, so it needs no
torch.distributed); `JulianLM` deals the prefix trees out to the processes (tree i, longest first,
to process i mod P), each scores its share on one local device, and all-gather the answers, so
every process returns the same results (train.py's --eval_tasks calls it from every host). The
parameters are gathered to each process whole: costly for large FSDP-sharded ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, make_table
from tqdm import tqdm

import budget
import checkpoint
import cli
import generate
import storage
import stream
from eval_tasks import check_task_data, evaluate_with, perplexity_table, readable, report_table
from model import ModelConfig, Transformer, num_params
from packed_scoring import ROW_LENGTHS, compile_scoring, plan_passes, rows_per_pass, score_pass
from parallel import make_mesh
from runlog import check_writable
from tokenizer import Tokenizer, language_of
from tokenizer_files import tokenizer_from_bytes

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defined on demand, not at import: other scripts and the tests import this file."""
    flags.DEFINE_string("checkpoint", None, "train.py --output_dir (newest step), local or gs://, or a Hugging "
                        "Face Llama folder (imported on the way in).")
    flags.DEFINE_integer("step", None, "Evaluate this step instead of the newest.")
    flags.DEFINE_list("tasks", ["report"], "lm-eval task names, or presets: report (the report's "
                      "seven English tasks), french (XWinograd, XNLI, PAWS-X, Belebele, LAMBADA "
                      "and FrenchBench in French), all (both).")
    flags.DEFINE_string("data_dir", None, "Offline: a directory with one <task>.jsonl per task "
                        "(Hugging Face schema, the split the task scores). Default: the hub.")
    flags.DEFINE_integer("limit", None, "Evaluate only the first N items of each task.",
                         lower_bound=1)
    flags.DEFINE_integer("batch_size", 16, "Requests per forward pass: generation batches this "
                         "many prompts; scoring packs about 64 tokens per request into a pass (256 on "
                         "an accelerator).", lower_bound=1)
    flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Activation/matmul dtype.")
    flags.DEFINE_integer("bootstrap_iters", 1000, "lm-eval's bootstrap iterations for standard "
                         "errors (0: none).", lower_bound=0)
    flags.DEFINE_string("compilation_cache_dir", None, checkpoint.COMPILATION_CACHE_HELP)
    flags.DEFINE_bool("dry_run", False, "Compile the largest scoring pass for one chip of --hardware "
                      "(the model's shape from --checkpoint, no weights loaded): memory, kernels, fit.")
    flags.DEFINE_enum("hardware", "", ["", *budget.HARDWARE], "--dry_run for this pod's chip (budget.py).")
    flags.DEFINE_string("output", None, "Write lm-eval's results dict (keyed by task) here as JSON.")
    flags.DEFINE_list("ppl_data", [], "Instead of tasks: loss, perplexity and bits per byte of text "
                      "files (one document per line), per language: [lang=]path; without 'lang=', "
                      "a file named xx_*.txt counts as language xx. A shard manifest (data.py "
                      "prepare: manifest.json, its directory, or gs://) scores its validation split.")


def _gather_from_processes(mine: dict) -> dict:
    """Every process's dict merged, on every process (JSON through a uint8 all-gather)."""
    if jax.process_count() == 1:
        return mine
    data = np.frombuffer(json.dumps(list(mine.items())).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([data.size]))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    everyone = multihost_utils.process_allgather(padded)
    merged = {}
    for size, row in zip(sizes.reshape(-1), everyone):
        merged.update({int(k): v for k, v in json.loads(row[: int(size)].tobytes())})
    return merged


def _local_copy(model: Transformer) -> Transformer:
    """The model on this process's first device: every process evaluates on its own."""
    device = jax.local_devices()[0]

    def local(x):
        if not isinstance(x, jax.Array):
            return x
        if not x.is_fully_addressable:
            x = multihost_utils.process_allgather(x, tiled=True)
        return jax.device_put(x, device)

    return jax.tree.map(local, model)


def for_inference(model: Transformer, dtype: str) -> Transformer:
    """The same weights, run in another activation dtype over an fp32 residual stream (in bf16 it
    cut the worst log-likelihood error against fp32 on the report tasks (100m) from 0.11 to 0.07
    nats, mean 0.017 -> 0.013, for free), with layers under `lax.scan` (one program per padded
    shape: a scanned stack compiles in a fraction of an unrolled one's time)."""
    config = dataclasses.replace(model.config, dtype=dtype, scan_layers=True, fp32_residual=True)
    like = eqx.filter_eval_shape(Transformer, config, jax.random.key(0))
    return jax.tree.unflatten(jax.tree.structure(like), jax.tree.leaves(model))


@register_model("julian")
class JulianLM(TemplateLM):
    """lm-eval's view of a julian model: `JulianLM(model, tokenizer)`, or by name once this file
    is imported: `lm_eval.simple_evaluate(model="julian", model_args="checkpoint=DIR,dtype=float32")`."""

    def __init__(self, model: Transformer | None = None, tokenizer: Tokenizer | None = None,
                 checkpoint: str | None = None, batch_size: int | str = 16, dtype: str = "bfloat16",
                 row_lengths: Sequence[int] = ROW_LENGTHS, max_gen_toks: int = 256,
                 max_batch_size: int | None = None, device: str | None = None):
        del max_batch_size, device  # lm-eval passes them to every model; JAX places arrays itself
        super().__init__()
        if checkpoint is not None:
            model, tokenizer_bytes, _ = load_checkpoint(checkpoint)
            tokenizer = tokenizer_from_bytes(tokenizer_bytes)
        if model is None or tokenizer is None:
            raise ValueError("JulianLM needs a model and its tokenizer, or checkpoint=DIR")
        self.model = for_inference(_local_copy(model), dtype)
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        # Any single request fits a row of the model's context.
        self.row_lengths = tuple(sorted(set(row_lengths) | {self.max_length}))
        self.max_gen_toks = max_gen_toks
        self.scored_requests = 0  # by this process: the others score their own share

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is scored after: bos, or eos where the tokenizer has none (as
        lm-eval's HF backend)."""
        return self.tokenizer.eos_id if self.tokenizer.bos_id is None else self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self.model.config.max_seq_len

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The text's ids after what the tokenizer starts a document with (<s> for ours; nothing
        when add_special_tokens=False), as lm-eval's HF backend encodes with the same tokenizer's
        files; a text that already starts with the prefix token's string ("<s>") starts with it."""
        start = self.tokenizer.id_to_piece(self.prefix_token_id)
        if add_special_tokens is None and string.startswith(start):
            return [self.prefix_token_id, *self.tokenizer.encode_as_transformers(string[len(start):], False)]
        return self.tokenizer.encode_as_transformers(string, add_special_tokens is not False)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        # lm-eval's tokenizing bar, like ours, only on a terminal (tqdm's disable=None), not in logs.
        return super().loglikelihood(requests, disable_tqdm=True if disable_tqdm else None)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        scores = self.score([(list(ctx), list(cont)) for _, ctx, cont in requests], disable_tqdm)
        for (request, _, _), answer in zip(requests, scores):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return scores

    def score(self, requests: Sequence[tuple[list[int], list[int]]], disable_tqdm: bool = False
              ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding gives it) per token-id pair. A
        continuation longer than the model's context (lm-eval's `hf` backend refuses those) is
        scored in pieces of half the context, each after as much preceding text as fits."""
        pieces, owners = [], []
        for i, (context, continuation) in enumerate(requests):
            step = len(continuation) if len(continuation) <= self.max_length else self.max_length // 2
            for start in range(0, len(continuation), step):
                pieces.append((list(context) + list(continuation[:start]), list(continuation[start: start + step])))
                owners.append(i)
        rank, world = jax.process_index(), jax.process_count()
        passes = plan_passes(pieces, self.max_length, self.row_lengths, self.rows_per_pass, rank, world)
        sizes = [sum(len(unit.members) for row in packed.rows for unit in row) for packed in passes]
        mine: dict[int, tuple[float, bool]] = {}
        # Each process scores its share; process 0's bar shows its own.
        with tqdm(total=sum(sizes), desc="loglikelihood",
                  disable=True if disable_tqdm or rank != 0 else None) as bar:
            for packed, size in zip(passes, sizes):
                mine.update(score_pass(self.model, packed, pieces, self.max_length))
                self.scored_requests += size
                bar.update(size)
        answers = _gather_from_processes(mine)
        totals = [[0.0, True] for _ in requests]
        for piece, owner in enumerate(owners):
            logprob, greedy = answers[piece]
            totals[owner][0] += logprob
            totals[owner][1] &= greedy
        return [(logprob, greedy) for logprob, greedy in totals]

    def rows_per_pass(self, length: int) -> int:
        return rows_per_pass(self.batch_size, length, jax.default_backend() != "cpu")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        totals = self.rolling([req.args[0] for req in requests], disable_tqdm)
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def rolling(self, texts: Sequence[str], disable_tqdm: bool = False) -> list[float]:
        """log p(text | <s>) of each text, in windows of the model's context where it is longer
        (lm-eval's rolling windows: every token predicted once, with as much context as fits).
        The text itself is encoded without <s>, so <s> is not scored as if it were text."""
        windows, owners = [], []
        for owner, text in enumerate(texts):
            tokens = self.tok_encode(text, add_special_tokens=False)
            for window in get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owners.append(owner)
        totals = [0.0] * len(texts)
        for owner, (logprob, _) in zip(owners, self.score(windows, disable_tqdm)):
            totals[owner] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, if the task asks) continuations on generate.py's KV-cache sampler,
        cut at the task's stop strings."""
        by_settings: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            by_settings.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        rank, world = jax.process_index(), jax.process_count()
        mine: dict[int, str] = {}
        number = 0
        with tqdm(total=len(requests), desc="generate_until",
                  disable=True if disable_tqdm or rank != 0 else None) as bar:
            for indices in by_settings.values():
                settings = dict(requests[indices[0]].args[1])
                until = settings.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = min(int(settings.pop("max_gen_toks", self.max_gen_toks)), self.max_length - 1)
                sampled = settings.get("do_sample", False)
                temperature = float(settings.get("temperature", 1.0)) if sampled else 0.0
                prompts = {i: self.tok_encode(requests[i].args[0])[-(self.max_length - max_new):]
                           for i in indices}
                order = sorted(indices, key=lambda i: -len(prompts[i]))
                for start in range(0, len(order), self.batch_size):
                    chunk = order[start: start + self.batch_size]
                    if number % world == rank:
                        texts = generate.complete(
                            self.model, self.tokenizer, [prompts[i] for i in chunk], max_new,
                            jax.random.key(number), temperature=temperature,
                            top_k=int(settings.get("top_k") or 0), top_p=float(settings.get("top_p") or 1.0),
                            stop_strings=until)
                        mine.update(zip(chunk, texts))
                        self.scored_requests += len(chunk)
                    number += 1
                    bar.update(len(chunk))
        answers = _gather_from_processes(mine)
        for i, req in enumerate(requests):
            self.cache_hook.add_partial("generate_until", req.args, answers[i])
        return [answers[i] for i in range(len(requests))]


def check_checkpoint(directory: str) -> None:
    """A message that names the directory when nothing is there."""
    if "://" not in directory and not os.path.isdir(directory):
        raise FileNotFoundError(f"--checkpoint {directory!r} does not exist: expected a train.py "
                                "--output_dir holding Orbax step directories")


def load_checkpoint(directory: str, step: int | None = None) -> tuple[Transformer, bytes, dict]:
    """checkpoint.load, after check_checkpoint."""
    check_checkpoint(directory)
    return checkpoint.load(directory, step)


# --------------------------------------------------------------------------------------------
# What train.py and sft.py call.


def run_tasks(model: Transformer, tokenizer: Tokenizer, tasks: list[str], data_dir: str | None,
              limit: int | None = None, batch_size: int = 16, dtype: str = "bfloat16",
              bootstrap_iters: int = 0) -> dict:
    """lm-eval's `results` dict keyed by task (metrics such as "acc,none", "acc_norm,none").
    In a multi-host run, call it from every process: they share the work and all get the results."""
    lm = JulianLM(model, tokenizer, batch_size=batch_size, dtype=dtype)
    return evaluate_with(lm, tasks, data_dir, limit, bootstrap_iters=bootstrap_iters)["results"]


def benchmark_scorer(tokenizer: Tokenizer, tasks: list[str], data_dir: str | None, limit: int | None,
                     mesh: jax.sharding.Mesh) -> Callable[[Transformer], dict[str, float]]:
    """For train.fit's --eval_tasks: the lm-eval scores of a model sharded over `mesh`, as
    {"task/metric": value}. Every process calls it; each gets a whole local copy of the
    parameters (run_tasks splits the requests between processes). The tasks' data is checked
    now, before training starts."""
    check_task_data(tasks, data_dir)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def score(model: Transformer) -> dict[str, float]:
        gathered = jax.jit(lambda m: m, out_shardings=replicated)(model)
        local = jax.tree.map(lambda x: x.addressable_data(0), gathered)
        results = run_tasks(local, tokenizer, tasks, data_dir, limit)
        return {f"{task}/{name.split(',')[0]}": float(value) for task, metrics in results.items()
                for name, value in metrics.items()
                if isinstance(value, (int, float)) and "stderr" not in name and name != "alias"}

    return score


def perplexity(model: Transformer, tokenizer: Tokenizer, paths: Sequence[str], batch_size: int = 16,
               dtype: str = "bfloat16") -> dict[str, dict[str, float]]:
    """Per language (and "all"): loss (nats per token), perplexity and bits per byte of held-out
    text files, one document per non-empty line, each scored on its own after <s> (lm-eval's
    rolling log-likelihood). `paths` are [lang=]path; xx_*.txt counts as language xx."""
    documents: dict[str, list[str]] = {}
    manifests: dict[str, str] = {}
    for spec in paths:
        label, path = language_of(spec)
        if storage.is_gcs(path) or path.endswith(".json") or os.path.isdir(path):
            manifests[label if "=" in spec else "validation shards"] = path
            continue
        lines = stream.read_documents(path, "--ppl_data")
        if not lines:
            raise ValueError(f"--ppl_data file {path!r} holds no text: expected one document per line")
        documents.setdefault(label, []).extend(lines)
    lm = JulianLM(model, tokenizer, batch_size=batch_size, dtype=dtype)
    sums = {}
    for label, docs in documents.items():
        logprob = sum(lm.rolling(docs))
        tokens = sum(len(ids) for ids in tokenizer.encode_batch(docs))
        sums[label] = (-logprob, tokens, sum(len(d.encode("utf-8")) for d in docs), len(docs))
    for label, spec in manifests.items():
        sums[label] = _held_out_records_nll(lm, tokenizer, spec)
    if len(sums) > 1:
        sums["all"] = tuple(sum(column) for column in zip(*sums.values()))
    return {label: {"loss": nll / tokens, "perplexity": math.exp(nll / tokens),
                    "bits_per_byte": nll / math.log(2) / n_bytes, "tokens": tokens, "bytes": n_bytes,
                    "documents": docs}
            for label, (nll, tokens, n_bytes, docs) in sums.items()}


def _held_out_records_nll(lm: "JulianLM", tokenizer: Tokenizer, spec: str) -> tuple[float, int, int, int]:
    """(summed NLL, tokens, bytes, records) of a manifest's validation records: each record is
    scored as it is, every token after its first predicted from the ones before (packed
    documents are not separated: this is the loss training reports). Bytes are those of the
    predicted tokens' text, control tokens counting none. Languages are mixed in a record, so
    shards give one row; per-language figures need text files."""
    manifest, _ = stream.load_manifest(spec)
    validation = stream.open_train_data(spec, tokenizer=tokenizer, seq_len=manifest["seq_len"], seed=0,
                                        global_batch_size=1, split="validation")
    records = [validation.batch(i)[0] for i in range(validation.num_sequences)]
    scored = lm.score([([int(r[0])], r[1:].tolist()) for r in records])
    n_bytes = sum(len(tokenizer.decode(r[1:].tolist()).encode("utf-8")) for r in records)
    return -sum(logprob for logprob, _ in scored), sum(len(r) - 1 for r in records), n_bytes, len(records)


# --------------------------------------------------------------------------------------------
# The command line.


def dry_run(directory: str, step: int | None, hardware: str, batch_size: int, dtype: str) -> None:
    """The largest scoring pass (rows of the model's whole context, every position scored) compiled
    for one chip of `hardware` (budget.py), on the checkpoint's model shape; no arrays loaded."""
    step = checkpoint.latest_step(directory) if step is None else step
    if step is None:
        raise FileNotFoundError(f"--checkpoint {directory!r} holds no checkpoint step")
    saved = checkpoint.Checkpointer(directory).restore_config(step)["model"]
    model_config = dataclasses.replace(ModelConfig(**saved), dtype=dtype)
    devices, compiled_for = budget.dry_run_devices(hardware)
    pod = budget.HARDWARE.get(hardware)
    length = model_config.max_seq_len
    rows = rows_per_pass(batch_size, length, pod is not None or devices[0].platform != "cpu")
    program = budget.compile_program(lambda m, c, mesh: compile_scoring(m, rows, length, devices[0]),
                                     model_config, None, make_mesh(1, devices[:1]))
    lines = [("parameters", f"{num_params(model_config):,}"),
             ("compiled for", f"{compiled_for} (one chip scores; each process uses one)"),
             ("scoring pass", f"{rows} rows x {length} tokens, every position scored (--batch_size={batch_size})"),
             *budget.program_rows(program, pod)]
    if pod:
        limit = budget.FIT_FRACTION * pod.memory_gib * 2**30
        fits = program.peak is not None and program.peak <= limit
        lines.append(("verdict (one chip)", f"fits: {program.peak / 2**30:.1f} GiB of {pod.memory_gib:g} GiB" if fits else
                      f"does NOT fit {budget.FIT_FRACTION:.0%} of a {pod.memory_gib:g} GiB chip: lower --batch_size"))
    budget.print_rows(lines)


def _write_json(path: str, content: dict) -> None:
    """Written under a temporary name and renamed: a crash never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(content, f, indent=2, default=str)
    os.replace(path + ".tmp", path)


def main(argv):
    del argv
    checkpoint.quiet_logging(FLAGS["verbosity"].present)
    checkpoint.use_compilation_cache(FLAGS.compilation_cache_dir)
    # lm-eval bootstraps standard errors in forked workers; forking a process that runs JAX's
    # threads can deadlock, so it bootstraps in process.
    os.environ.setdefault("DISABLE_MULTIPROC", "1")
    if not FLAGS.checkpoint:
        raise app.UsageError("--checkpoint is required: a train.py --output_dir")
    if FLAGS.dry_run and FLAGS.hardware:
        budget.prepare_host(FLAGS.hardware)
    try:
        check_checkpoint(FLAGS.checkpoint)
        if FLAGS.dry_run:
            return dry_run(FLAGS.checkpoint, FLAGS.step, FLAGS.hardware, FLAGS.batch_size, FLAGS.dtype)
        if FLAGS.output:
            check_writable(os.path.dirname(os.path.abspath(FLAGS.output)), "--output")
        if not FLAGS.ppl_data:  # before the model loads: the tasks' data is there
            check_task_data(FLAGS.tasks, FLAGS.data_dir)
        model, tokenizer_bytes, _ = load_checkpoint(FLAGS.checkpoint, FLAGS.step)
        tokenizer = tokenizer_from_bytes(tokenizer_bytes)
        start = time.perf_counter()
        if FLAGS.ppl_data:
            results = perplexity(model, tokenizer, FLAGS.ppl_data, FLAGS.batch_size, FLAGS.dtype)
            summary = perplexity_table(results)
        else:
            lm = JulianLM(model, tokenizer, batch_size=FLAGS.batch_size, dtype=FLAGS.dtype)
            output = evaluate_with(lm, FLAGS.tasks, FLAGS.data_dir, FLAGS.limit,
                                   bootstrap_iters=FLAGS.bootstrap_iters)
            results = output["results"]
            seconds = time.perf_counter() - start
            summary = (f"{make_table(readable(output))}\n{report_table(results)}\n\n{lm.scored_requests} requests "
                       f"in {seconds:.1f} s ({lm.scored_requests / seconds:.1f} requests/s, this process)")
    except (FileNotFoundError, ValueError) as e:  # bad input: say what, in one line, no usage dump
        cli.error(str(e))
    if jax.process_index() == 0:
        print(summary)
        if FLAGS.output:
            _write_json(FLAGS.output, results)
            print(f"wrote {FLAGS.output}")

if __name__ == "__main__":
    define_flags()
    logging.set_verbosity(logging.WARNING)
    cli.run(main)
