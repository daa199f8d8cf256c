"""Which benchmarks, from where, and how they are reported: the task presets (the report's seven
English tasks, the French ones), lm-eval's task files pointed at offline JSONL, lm-eval's run of
any LM (ours or its `hf` backend), and the comparison tables. evaluate.py is the backend.

Offline (`--data_dir=DIR`): DIR holds one JSONL per task, named after it (`hellaswag.jsonl`...),
in the Hugging Face schema the task loads, holding the split the task scores (its test split if
it has one, else validation). For each task we write a YAML that includes lm-eval's stock task
file and points it at that file (`dataset_path: json`); docs/evaluation.md shows how to mirror the hub.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pathlib
import random
import socket
import sys
import tempfile
import threading
import urllib.parse
from collections.abc import Sequence

import numpy as np
import yaml
from lm_eval import evaluator as lm_evaluator
from lm_eval.api.registry import AGGREGATION_REGISTRY, get_metric_aggregation, is_higher_better
from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED
from lm_eval.tasks import TaskManager
from lm_eval.tasks._index import Kind
from lm_eval.tasks._yaml_loader import load_yaml

from runlog import UNPREDICTED_PERPLEXITY, perplexity_text

LM_EVAL_TASKS = os.path.join(os.path.dirname(lm_evaluator.__file__), "tasks")
# The report's seven tasks, each with lm-eval's task file (so that naming them needs no scan of
# lm-eval's 14,000 task files) and the metric the report quotes.
REPORT_TASKS = {
    "hellaswag": ("hellaswag/hellaswag.yaml", "acc_norm"),
    "piqa": ("piqa/piqa.yaml", "acc"),
    "lambada_openai": ("lambada/lambada_openai.yaml", "acc"),
    "arc_easy": ("arc/arc_easy.yaml", "acc"),
    "arc_challenge": ("arc/arc_challenge.yaml", "acc_norm"),
    "winogrande": ("winogrande/default.yaml", "acc"),
    "boolq": ("super_glue/boolq/default.yaml", "acc"),
}
# The report's zero-shot scores for its 600M base model, in percent (as quoted in design.md;
# the other tasks' figures are not in our notes).
REPORT_SCORES = {"hellaswag": 53.5, "piqa": 66.8, "lambada_openai": 37.3}
# What answering at random scores, in percent: one over the choices (hellaswag 4 endings; ARC
# 4 choices, a few items 3 or 5; the others 2); lambada's exact next word out of the vocabulary, ~0.
CHANCE_SCORES = {"hellaswag": 25.0, "piqa": 50.0, "lambada_openai": 0.0, "arc_easy": 25.0,
                 "arc_challenge": 25.0, "winogrande": 50.0, "boolq": 50.0}
# French: lm-eval's French configs of multilingual sets, and FrenchBench's (CroissantLLM) tasks
# that are scored by likelihood: comparable with the English preset, cheap, no generation
# settings to choose (its generative tasks run by name through --tasks).
FRENCH_TASKS = {
    "xwinograd_fr": ("xwinograd/xwinograd_fr.yaml", "acc"),
    "xnli_fr": ("xnli/xnli_fr.yaml", "acc"),
    "paws_fr": ("paws-x/paws_fr.yaml", "acc"),
    "belebele_fra_Latn": ("belebele/belebele_fra_Latn.yaml", "acc"),
    "lambada_openai_mt_fr": ("lambada_multilingual/lambada_mt_fr.yaml", "acc"),
    "french_bench_hellaswag": ("french_bench/french_bench_hellaswag.yaml", "acc_norm"),
    "french_bench_arc_challenge": ("french_bench/french_bench_arc_challenge.yaml", "acc_norm"),
    "french_bench_boolqa": ("french_bench/french_bench_boolqa.yaml", "acc"),
    "french_bench_grammar": ("french_bench/french_bench_grammar.yaml", "acc"),
    "french_bench_vocab": ("french_bench/french_bench_vocab.yaml", "acc"),
    "french_bench_reading_comp": ("french_bench/french_bench_reading_comp.yaml", "acc"),
    "french_bench_topic_based_nli": ("french_bench/french_bench_topic_based_nli.yaml", "acc"),
    "french_bench_xnli": ("french_bench/french_bench_xnli.yaml", "acc"),
}
KNOWN_TASKS = {**REPORT_TASKS, **FRENCH_TASKS}
PRESETS = {"report": list(REPORT_TASKS), "french": list(FRENCH_TASKS), "all": list(KNOWN_TASKS)}
# Published zero-shot accuracies (percent) from lm-eval's archived results of 2023 (its
# `pawsx_fr` is today's `paws_fr`); that harness's prompts differ slightly from today's.
FRENCH_BASELINES = {
    "BLOOM-560m": {"xnli_fr": 45.29, "paws_fr": 47.95, "xwinograd_fr": 60.24},
    "XGLM-564M": {"xnli_fr": 45.49, "paws_fr": 50.80, "xwinograd_fr": 57.83},
    "BLOOM-1b1": {"xnli_fr": 47.15, "paws_fr": 46.15, "xwinograd_fr": 66.27},
}


# --------------------------------------------------------------------------------------------
# Tasks, online or from a data_dir.


def expand_tasks(names: Sequence[str]) -> list[str]:
    """Task names with presets (report, french, all) replaced by their tasks, each task once."""
    tasks = [task for name in names for task in PRESETS.get(name, [name])]
    return list(dict.fromkeys(tasks))


def _stock_task_file(task: str) -> str:
    if task in KNOWN_TASKS:
        return os.path.join(LM_EVAL_TASKS, KNOWN_TASKS[task][0])
    unknown = ValueError(f"unknown task {task!r}: lm-eval has no such task (presets: "
                         f"{', '.join(PRESETS)}; `lm_eval ls tasks` lists all)")
    # Indexing lm-eval's ~14,000 task files takes seconds: a name none of them mentions is a typo.
    if not any(task in p.read_text(errors="ignore") for p in pathlib.Path(LM_EVAL_TASKS).rglob("*.yaml")):
        raise unknown
    entry = TaskManager().task_index.get(task)
    if entry is None:
        raise unknown
    if entry.kind not in (Kind.TASK, Kind.PY_TASK) or entry.yaml_path is None:
        raise ValueError(f"{task!r} is an lm-eval {entry.kind.name.lower()}, not a task: name its tasks")
    return str(entry.yaml_path)


def task_source(task: str) -> tuple[str, str | None, str]:
    """(Hugging Face dataset, config or None, split) that lm-eval's `task` scores: its test split
    if it has one, else validation (read from lm-eval's own task file)."""
    base = load_yaml(_stock_task_file(task), resolve_func=False)  # includes resolved, `!function`s not
    split = base.get("test_split") or base.get("validation_split")
    if split is None:
        raise ValueError(f"task {task!r} scores neither a test nor a validation split: not supported offline")
    return base.get("dataset_path"), base.get("dataset_name"), split


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached (offline mode set, or no connection within
    `timeout` seconds), or None when it answers: lm-eval's downloads would otherwise retry for
    half a minute before failing."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "offline mode is on (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)"
    url = urllib.parse.urlparse(constants.ENDPOINT)
    reason = []

    def connect() -> None:  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        except OSError as e:
            reason.append(f"{url.hostname} is unreachable ({e})")

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    if probe.is_alive():
        return f"{url.hostname} did not answer within {timeout:g} s"
    return reason[0] if reason else None


def _check_jsonl(path: str, task: str) -> None:
    """One JSON object per line (datasets' json loader fails on anything else, deep in lm-eval)."""
    expected = f"expected the {task} task's split as JSONL, one JSON object per line"
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}: line {line}: not UTF-8 text; {expected}") from None
    lines = [(number, line) for number, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not lines:
        raise ValueError(f"{path} is empty: {expected}")
    for number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {number}: invalid JSON ({e.msg}); {expected}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {number}: a JSON {type(record).__name__}; {expected}")


def check_task_data(tasks: Sequence[str], data_dir: str | None) -> None:
    """Before any model work: the tasks exist and their data can be read, from data_dir (every
    task's file there, all the missing ones named at once) or else from the Hub."""
    tasks = expand_tasks(tasks)
    for task in tasks:
        _stock_task_file(task)
    if data_dir is None:
        why = hub_unreachable()
        if why:
            raise FileNotFoundError(
                f"the Hugging Face Hub is needed for {', '.join(tasks[:3])}{' ...' if len(tasks) > 3 else ''} "
                f"without --data_dir, and {why}: give --data_dir=DIR, a directory of <task>.jsonl files "
                "(samples/eval holds 40 items of each report task; docs/evaluation.md, 'Offline "
                "data', shows how to mirror them)")
        return
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"--data_dir {data_dir!r} is not a directory")
    missing = [task for task in tasks if not os.path.isfile(os.path.join(data_dir, f"{task}.jsonl"))]
    for task in tasks:
        if task not in missing:
            _check_jsonl(os.path.join(data_dir, f"{task}.jsonl"), task)
    if missing:
        first = missing[0]
        dataset, config, split = task_source(first)
        raise FileNotFoundError(
            f"--data_dir {data_dir!r} lacks {len(missing)} of {len(tasks)} tasks' files: "
            f"{', '.join(f'{task}.jsonl' for task in missing)} (e.g. {first}.jsonl: the {split!r} split of "
            f"{dataset} ({config or 'default'}); docs/evaluation.md lists the split each file "
            "holds and how to mirror them)")


def write_task_configs(tasks: Sequence[str], data_dir: str | None, out_dir: str) -> None:
    """One YAML per task into out_dir: lm-eval's stock task, read from data_dir/<task>.jsonl if
    given (check_task_data first)."""
    check_task_data(tasks, data_dir)
    configs = {}
    for task in tasks:
        stock = _stock_task_file(task)
        configs[task] = {"include": stock, "task": task}
        if data_dir is None:
            continue
        _, _, split = task_source(task)
        path = os.path.abspath(os.path.join(data_dir, f"{task}.jsonl"))
        base = load_yaml(stock, resolve_func=False)
        configs[task].update(_explicit_metric_defaults(base))
        configs[task].update(dataset_path="json", dataset_name=None,
                             dataset_kwargs={"data_files": {split: path}}, training_split=None,
                             validation_split=split if split == base.get("validation_split") else None,
                             test_split=split if split == base.get("test_split") else None,
                             fewshot_split=None)
    for task, config in configs.items():
        with open(os.path.join(out_dir, f"{task}.yaml"), "w") as f:
            yaml.safe_dump(config, f)


def _explicit_metric_defaults(base: dict) -> dict:
    """The task's metric_list with lm-eval's defaults written out where its file leaves them
    implicit (boolq's), so that lm-eval does not warn, at every run, that it applies them."""
    metrics = base.get("metric_list") or []
    if all("aggregation" in m and "higher_is_better" in m for m in metrics):
        return {}
    names = {fn: name for name, fn in AGGREGATION_REGISTRY.items()}
    return {"metric_list": [{"aggregation": names[get_metric_aggregation(m["metric"])],
                             "higher_is_better": is_higher_better(m["metric"]), **m} for m in metrics]}


def evaluate_with(lm, tasks: Sequence[str], data_dir: str | None = None, limit: int | None = None,
                  log_samples: bool = False, bootstrap_iters: int = 0) -> dict:
    """lm-eval's evaluation of any LM (ours or its `hf` backend) on `tasks`, online or
    from data_dir; returns lm-eval's whole output (results, samples if asked, configs...)."""
    tasks = expand_tasks(tasks)
    # lm-eval's `evaluate` on its own task objects, not `simple_evaluate`: that one also imports
    # torch to seed it and then runs torch's environment report (pip, git, nvidia-smi
    # subprocesses), 3-4 s per run on a 2-core machine that our backend, without torch, would
    # pay for nothing. The settings it would apply are the ones below, with its default seeds.
    random.seed(DEFAULT_RANDOM_SEED)
    np.random.seed(DEFAULT_OTHER_SEED)
    if "torch" in sys.modules:  # a torch backend (lm-eval's hf) samples with torch's generator
        sys.modules["torch"].manual_seed(DEFAULT_OTHER_SEED)
    with tempfile.TemporaryDirectory() as configs:
        write_task_configs(tasks, data_dir, configs)
        try:
            loaded = TaskManager(include_path=configs, include_defaults=False).load(tasks)
        except Exception as e:  # lm-eval and datasets fail with whatever a record's shape provokes
            if data_dir is None:
                raise
            raise ValueError(f"lm-eval could not read {', '.join(f'{t}.jsonl' for t in tasks)} in --data_dir "
                             f"{data_dir!r} ({type(e).__name__}: {e}): expected each in the Hugging Face "
                             "schema of the split docs/evaluation.md names") from e
        for task in loaded["tasks"].values():
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
        # lm-eval prints "bootstrapping for stddev: <metric>" to stdout for every bootstrapped
        # metric: a line a user cannot act on, among the scores. Its other prints pass through.
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            output = lm_evaluator.evaluate(lm=lm, task_dict=loaded, limit=limit, log_samples=log_samples,
                                           bootstrap_iters=bootstrap_iters)
        sys.stdout.write("".join(line for line in printed.getvalue().splitlines(keepends=True)
                                 if not line.startswith("bootstrapping for stddev")))
        return output


def readable(output: dict) -> dict:
    """lm-eval's output for its own `make_table`, with each unpredicted perplexity (and its error)
    replaced by what it means."""
    results = {}
    for task, metrics in output["results"].items():
        metrics = dict(metrics)
        for key, value in list(metrics.items()):
            if key.startswith("perplexity,") and isinstance(value, float) and value > UNPREDICTED_PERPLEXITY:
                metrics[key] = perplexity_text(value)
                metrics[key.replace("perplexity,", "perplexity_stderr,")] = "N/A"
        results[task] = metrics
    return {**output, "results": results}


# --------------------------------------------------------------------------------------------
# Tables.


def report_table(results: dict) -> str:
    """Our scores beside chance and published ones, in percent, markdown: English tasks beside
    what answering at random scores and the report's 600M base model, French tasks beside BLOOM
    and XGLM (lm-eval's archived 2023 results)."""
    english = [t for t in results if t not in FRENCH_TASKS]
    french = [t for t in results if t in FRENCH_TASKS]
    lines = []
    if english:
        lines += ["| task | metric | julian | chance | vs chance | report (600M base) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for task in english:
            lines += _rows(task, results[task], [REPORT_SCORES.get(task)], with_chance=True)
        lines += ["", "vs chance: whether the score is within two standard deviations of what answering at "
                  "random scores on this many items (a binomial); below chance, the model favours one "
                  "kind of answer whatever the item."]
    if french:
        baselines = list(FRENCH_BASELINES)
        lines += ["", "| French task | metric | julian | " + " | ".join(baselines) + " |",
                  "| --- | --- | --- |" + " --- |" * len(baselines)]
        for task in french:
            lines += _rows(task, results[task], [FRENCH_BASELINES[b].get(task) for b in baselines])
        lines += ["", "Baselines: lm-eval's archived zero-shot results, from the 2023 harness (pawsx_fr "
                  "there is paws_fr); its prompts differ slightly from today's."]
    return "\n".join(lines).strip("\n")


def versus_chance(score: float, chance: float, items: int) -> str:
    """"at chance", "above" or "below": is `score` (percent) within two binomial standard
    deviations of `chance` (percent) on `items` items? (At chance 0, only a score of 0 is.)"""
    p = chance / 100
    if abs(score / 100 - p) * items <= 2 * math.sqrt(items * p * (1 - p)):
        return "at chance"
    return "above" if score / 100 > p else "below"


def _rows(task: str, metrics: dict, published: list, with_chance: bool = False) -> list[str]:
    metric = KNOWN_TASKS.get(task, (None, "acc"))[1]
    value = metrics.get(f"{metric},none")
    if value is None or isinstance(value, str):
        return []
    cells = ["" if p is None else f"{p}" for p in published]
    if with_chance:
        chance = CHANCE_SCORES.get(task)
        verdict = ("" if chance is None or "sample_len" not in metrics
                   else versus_chance(100 * value, chance, metrics["sample_len"]))
        cells = ["" if chance is None else f"{chance:g}", verdict, *cells]
    rows = [f"| {task} | {metric} | {100 * value:.1f} | " + " | ".join(cells) + " |"]
    if "perplexity,none" in metrics:
        rows.append(f"| {task} | perplexity | {perplexity_text(metrics['perplexity,none'])} |" + " |" * len(cells))
    return rows


def perplexity_table(results: dict) -> str:
    """Bits per byte first: unlike loss and perplexity (per token), it compares across tokenizers."""
    lines = ["| data | bits/byte | bytes | documents | tokens | loss | perplexity |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {k} | {v['bits_per_byte']:.4f} | {v['bytes']} | {v['documents']} | {v['tokens']} | "
              f"{v['loss']:.4f} | {perplexity_text(v['perplexity'])} |" for k, v in results.items()]
    return "\n".join(lines)
