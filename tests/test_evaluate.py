"""evaluate.py: our lm-eval backend, checked against lm-eval's own `hf` backend on the same weights.

The reference is always independent of our code: lm-eval's HFLM (transformers' Llama, torch) on
the tiny trained model exported with convert.py, run through the same offline task files, and
transformers' forward pass for perplexity.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("accelerate")  # lm-eval's hf backend needs it

import eval_tasks  # noqa: E402
import evaluate  # noqa: E402
import packed_scoring  # noqa: E402
import forked
from conftest import REPO  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from tokenizer import BOS_ID  # noqa: E402
from tokenizer_files import open_tokenizer

DATA_DIR = os.path.join(REPO, "samples", "eval")
TASKS = list(eval_tasks.REPORT_TASKS)
LIMIT = 5  # items per task: every request shape of every task, in seconds
LOGPROB_ATOL = 1e-3  # fp32 on both sides: a wrong token or position is off by O(1)
BF16_LOGPROB_ATOL = 0.1  # bf16 keeps 8 bits: 0.03 nats at most measured here, a wrong token O(1)


@pytest.fixture(scope="module")
def hf_lm(tiny_hf):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=tiny_hf, dtype="float32", batch_size=16, device="cpu")


@pytest.fixture(scope="module")
def hf_output(hf_lm):
    return eval_tasks.evaluate_with(hf_lm, TASKS, DATA_DIR, LIMIT, log_samples=True)


@pytest.fixture(scope="module")
def our_output(tiny):
    lm = evaluate.JulianLM(*tiny, dtype="float32")
    return eval_tasks.evaluate_with(lm, TASKS, DATA_DIR, LIMIT, log_samples=True)


def _responses(output, task):
    """Per item, per choice: (log-likelihood, is greedy)."""
    return [[tuple(r[0]) for r in sample["resps"]] for sample in sorted(output["samples"][task], key=lambda s: s["doc_id"])]


def _assert_same_answers(ours, reference, task, atol=LOGPROB_ATOL):
    ours, reference = _responses(ours, task), _responses(reference, task)
    assert len(ours) == len(reference) > 0
    for item, (a, b) in enumerate(zip(ours, reference)):
        np.testing.assert_allclose([x[0] for x in a], [x[0] for x in b], atol=atol, err_msg=f"{task} item {item}")
        assert [x[1] for x in a] == [x[1] for x in b], f"{task} item {item}: greedy flags differ"
        assert np.argmax([x[0] for x in a]) == np.argmax([x[0] for x in b]), f"{task} item {item}: choice differs"


@pytest.mark.parametrize("task", TASKS)
def test_every_report_task_scores_as_lm_evals_hf_backend_on_the_exported_model(task, our_output, hf_output):
    _assert_same_answers(our_output, hf_output, task)
    ours, theirs = our_output["results"][task], hf_output["results"][task]
    for metric in ("acc,none", "acc_norm,none"):
        assert ours.get(metric) == theirs.get(metric), metric
    if "perplexity,none" in theirs:
        assert ours["perplexity,none"] == pytest.approx(theirs["perplexity,none"], rel=1e-3)


def test_the_bundled_samples_are_long_enough_to_exercise_truncation(tiny):
    # boolq passages exceed the tiny model's 128-token context: lm-eval cuts from the left, and
    # the parity above covers that path only if it is taken.
    _, tokenizer = tiny
    with open(os.path.join(DATA_DIR, "boolq.jsonl")) as f:
        passages = [json.loads(line)["passage"] for line in f][:LIMIT]
    assert max(len(tokenizer.encode(p)) for p in passages) > 128


def test_batch_size_and_row_lengths_do_not_change_the_answers(tiny, our_output):
    # Rows of 40 tokens split hellaswag's four choices over units and rows; odd lengths pack differently.
    lm = evaluate.JulianLM(*tiny, dtype="float32", batch_size=3, row_lengths=(40, 72, 200))
    tasks = ["hellaswag", "boolq"]
    other = eval_tasks.evaluate_with(lm, tasks, DATA_DIR, LIMIT, log_samples=True)
    for task in tasks:
        _assert_same_answers(other, our_output, task, atol=1e-4)


def test_planned_rows_hold_every_request_once_and_short_trees_share_rows():
    # Items of a 40-80-token context and two short choices: prefix trees of 55-125 tokens. One such
    # tree per 128-token row left the rows about 70% full; cut to half the shortest row, they share.
    rng = np.random.default_rng(0)
    requests = []
    for _ in range(300):
        context = rng.integers(8, 4000, rng.integers(40, 80)).tolist()
        requests += [(context, rng.integers(8, 4000, rng.integers(5, 25)).tolist()) for _ in range(2)]
    passes = packed_scoring.plan_passes(requests, 2048, packed_scoring.ROW_LENGTHS, lambda length: 1024 // length)
    placed = sorted(i for p in passes for row in p.rows for unit in row for i in unit.members)
    assert placed == list(range(len(requests)))
    assert all(len(p.rows) <= p.n_rows for p in passes)
    assert all(sum(unit.length for unit in row) <= p.length for p in passes for row in p.rows)
    tree_tokens = sum(unit.length for p in passes for row in p.rows for unit in row)
    assert tree_tokens / sum(p.n_rows * p.length for p in passes) > 0.85


def test_rolling_loglikelihood_matches_the_hf_backend_scoring_text_after_bos(tiny, tiny_hf):
    from lm_eval.models.huggingface import HFLM

    # add_bos_token=False: the text is scored after <s> without <s> being scored as text itself.
    reference = HFLM(pretrained=tiny_hf, dtype="float32", batch_size=4, device="cpu", add_bos_token=False)
    with open(os.path.join(REPO, "samples", "en_doyle_sign_of_four.txt")) as f:
        texts = [line.strip() for line in f if len(line) > 40][:3]
    texts.append(" ".join(texts))  # longer than the 128-token context: several windows
    assert len(tiny[1].encode(texts[-1])) > 2 * 128
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    ours = evaluate.JulianLM(*tiny, dtype="float32", batch_size=4).loglikelihood_rolling(requests)
    np.testing.assert_allclose(ours, reference.loglikelihood_rolling(requests), atol=LOGPROB_ATOL)


@pytest.mark.slow  # lm-eval's HF backend generating beside ours
def test_generate_until_matches_the_hf_backend_greedy_generation(tiny, hf_lm):
    settings = {"until": ["\n", "."], "max_gen_toks": 24, "do_sample": False}
    prompts = ["Sherlock Holmes took his bottle", "Il était une fois", "The door opened and"]
    requests = [Instance("generate_until", {}, (p, dict(settings)), i) for i, p in enumerate(prompts)]
    ours = evaluate.JulianLM(*tiny, dtype="float32", batch_size=2).generate_until(requests)
    assert ours == hf_lm.generate_until(requests)
    assert any(ours) and not any("\n" in t or "." in t for t in ours)


def _hf_document_logprob(hf_dir, tokenizer, text):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ids = torch.tensor([[BOS_ID, *tokenizer.encode(text)]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    return float(logprobs.gather(1, ids[0, 1:, None]).sum())


def test_perplexity_reports_loss_perplexity_and_bits_per_byte_per_language(tiny, tiny_hf, tmp_path):
    _, tokenizer = tiny
    docs = {"en": ["It was a dark night.", "Holmes smiled at me."], "fr": ["Il était une fois un roi."]}
    paths = []
    for lang, lines in docs.items():
        path = tmp_path / f"{lang}_heldout.txt"
        path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
        paths.append(str(path))
    paths.append(f"fr={tmp_path / 'en_heldout.txt'}")  # an explicit label wins over the name
    docs["fr"] += docs["en"]
    out = evaluate.perplexity(*tiny, paths, dtype="float32")
    assert set(out) == {"en", "fr", "all"}
    for lang, lines in docs.items():
        nll = -sum(_hf_document_logprob(tiny_hf, tokenizer, t) for t in lines)
        tokens = sum(len(tokenizer.encode(t)) for t in lines)
        n_bytes = sum(len(t.encode()) for t in lines)
        assert out[lang]["documents"] == len(lines) and out[lang]["tokens"] == tokens
        assert out[lang]["loss"] == pytest.approx(nll / tokens, abs=1e-4)
        assert out[lang]["perplexity"] == pytest.approx(np.exp(nll / tokens), rel=1e-4)
        assert out[lang]["bits_per_byte"] == pytest.approx(nll / np.log(2) / n_bytes, abs=1e-4)


def test_perplexity_of_held_out_shards_is_the_hf_models_loss_on_their_records(tiny, tiny_hf, tmp_path,
                                                                              tiny_tokenizer_path):
    import torch
    import transformers

    import data
    from conftest import DATA_FILES

    _, tokenizer = tiny
    manifest = data.prepare(data.PrepareConfig(
        inputs=(DATA_FILES[0],), output=str(tmp_path / "shards"), tokenizer=tiny_tokenizer_path,
        seq_len=64, num_shards=1, languages=(("en", None), ("fr", None)), num_cpus=1,
        validation_fraction=0.02, dedup=False))
    out = evaluate.perplexity(*tiny, [str(tmp_path / "shards")], dtype="float32")["validation shards"]
    # The records, read with NumPy straight from the files the manifest names.
    shards = manifest["validation"]["shards"]
    records = np.concatenate([np.fromfile(tmp_path / "shards" / s["name"], manifest["dtype"]) for s in shards])
    records = records.reshape(-1, manifest["record_len"]).astype(np.int64)
    hf = transformers.LlamaForCausalLM.from_pretrained(tiny_hf, torch_dtype=torch.float32)
    with torch.no_grad():
        logits = hf(torch.from_numpy(records[:, :-1])).logits
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(records[:, 1:]).flatten(),
                                            reduction="sum").item()
    assert out["documents"] == len(records) > 0 and out["tokens"] == records[:, 1:].size
    assert out["loss"] == pytest.approx(nll / records[:, 1:].size, abs=1e-4)
    assert out["bits_per_byte"] > 0


def test_run_tasks_returns_lm_evals_results_keyed_by_task(tiny, our_output):
    results = evaluate.run_tasks(*tiny, ["piqa", "winogrande"], DATA_DIR, limit=LIMIT, dtype="float32")
    assert set(results) == {"piqa", "winogrande"}
    for task in results:
        assert results[task]["acc,none"] == our_output["results"][task]["acc,none"]


# ---------------------------------------------------------------------------------------------
# Bad input.


def test_a_data_dir_missing_a_task_file_names_the_file_and_the_split_it_should_hold(tmp_path, tiny):
    (tmp_path / "hellaswag.jsonl").write_text(open(os.path.join(DATA_DIR, "hellaswag.jsonl")).read())
    lm = evaluate.JulianLM(*tiny)
    with pytest.raises(FileNotFoundError, match=r"lacks 1 of 2 tasks' files: piqa\.jsonl \(e\.g\. piqa\.jsonl: the 'validation' split of baber/piqa"):
        eval_tasks.evaluate_with(lm, ["hellaswag", "piqa"], str(tmp_path))
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        eval_tasks.evaluate_with(lm, ["piqa"], str(tmp_path / "nowhere"))


def test_an_unknown_task_is_named_in_the_error(tiny):
    with pytest.raises(ValueError, match="unknown task 'hellaswagg'"):
        eval_tasks.evaluate_with(evaluate.JulianLM(*tiny), ["hellaswagg"], DATA_DIR)


def test_the_command_line_names_a_missing_checkpoint(tmp_path):
    missing = str(tmp_path / "no_run")
    result = forked.run([sys.executable, "evaluate.py", f"--checkpoint={missing}", "--tasks=piqa"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"--checkpoint {missing!r} does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_tasks_whose_file_leaves_metric_defaults_implicit_load_without_lm_evals_warnings(tmp_path, caplog):
    from lm_eval.tasks import TaskManager

    eval_tasks.write_task_configs(["boolq", "piqa"], DATA_DIR, str(tmp_path))
    with caplog.at_level("WARNING"):
        loaded = TaskManager(include_path=str(tmp_path), include_defaults=False).load(["boolq", "piqa"])
    boolq = loaded["tasks"]["boolq"]
    assert boolq.aggregation()["acc"].__name__ == "mean" and boolq.higher_is_better() == {"acc": True}
    assert not [r for r in caplog.records if "is defined, but" in r.getMessage()], caplog.text


def test_the_report_table_puts_chance_beside_each_score_and_marks_scores_within_two_sigma_of_it():
    n = 40  # 2 binomial sigmas of chance on 40 items: 5.5 items at 25%, 6.3 at 50%, none at 0%
    table = eval_tasks.report_table({
        "hellaswag": {"acc_norm,none": 15 / n, "sample_len": n},  # 15 vs 10 +- 5.5
        "arc_easy": {"acc,none": 16 / n, "sample_len": n},  # 16 vs 10 +- 5.5
        "piqa": {"acc,none": 26 / n, "sample_len": n},  # 26 vs 20 +- 6.3
        "winogrande": {"acc,none": 27 / n, "sample_len": n},
        "boolq": {"acc,none": 9 / n, "sample_len": n},  # always "no" on 31 "yes" of 40
        "lambada_openai": {"acc,none": 0.0, "perplexity,none": 9.1e7, "sample_len": n},
        "arc_challenge": {"acc_norm,none": 1 / n, "sample_len": n}})
    assert "| task | metric | julian | chance | vs chance | report (600M base) |" in table
    for row in ("| hellaswag | acc_norm | 37.5 | 25 | at chance | 53.5 |", "| arc_easy | acc | 40.0 | 25 | above |  |",
                "| piqa | acc | 65.0 | 50 | at chance | 66.8 |", "| winogrande | acc | 67.5 | 50 | above |  |",
                "| boolq | acc | 22.5 | 50 | below |  |", "| lambada_openai | acc | 0.0 | 0 | at chance | 37.3 |",
                "| arc_challenge | acc_norm | 2.5 | 25 | below |  |"):
        assert row in table, table
    assert eval_tasks.versus_chance(2.5, 0.0, n) == "above"  # one right answer is more than chance's none
    assert "| lambada_openai | perplexity | not predicted (> 1,000) |" in table  # not nine digits


def test_lm_evals_own_table_names_an_unpredicted_perplexity_instead_of_printing_its_digits():
    output = {"results": {"lambada_openai": {"alias": "lambada_openai", "acc,none": 0.0, "acc_stderr,none": 0.0,
                                             "perplexity,none": 166270678.169, "perplexity_stderr,none": 525712115.38}},
              "versions": {"lambada_openai": 1.0}, "n-shot": {"lambada_openai": 0}, "higher_is_better": {}}
    table = evaluate.make_table(eval_tasks.readable(output))
    assert "not predicted (> 1,000)" in table and "166270678" not in table and "525712115" not in table
    assert output["results"]["lambada_openai"]["perplexity,none"] == 166270678.169  # the JSON keeps the value
    sensible = evaluate.make_table(eval_tasks.readable(
        {**output, "results": {"lambada_openai": {"perplexity,none": 12.5, "perplexity_stderr,none": 0.4}}}))
    assert "12.5" in sensible and "0.4" in sensible and "not predicted" not in sensible


def test_the_command_line_prints_both_tables_and_writes_the_results_json(tiny_run, tmp_path):
    output = tmp_path / "results.json"
    result = forked.run(
        [sys.executable, "evaluate.py", f"--checkpoint={tiny_run}", "--tasks=lambada_openai",
         f"--data_dir={DATA_DIR}", "--limit=2", "--bootstrap_iters=0", f"--output={output}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "|lambada_openai|" in result.stdout.replace(" ", "")  # lm-eval's table...
    assert "| lambada_openai | acc |" in result.stdout and "37.3" in result.stdout  # ...and the report's
    results = json.loads(output.read_text())
    assert set(results) == {"lambada_openai"}
    assert {"acc,none", "perplexity,none"} <= set(results["lambada_openai"])
    assert "bootstrapping for stddev" not in result.stdout


# ---------------------------------------------------------------------------------------------
# Two processes.

WORKER = textwrap.dedent("""
    import json, os, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
    import eval_tasks, evaluate, hf_llama
    model, tokenizer, _ = hf_llama.import_hf(sys.argv[3])
    lm = evaluate.JulianLM(model, tokenizer, dtype="float32", batch_size=4)
    out = eval_tasks.evaluate_with(lm, ["hellaswag"], sys.argv[4], limit=2, log_samples=True)
    answers = {t: [[r[0] for r in s["resps"]] for s in sorted(out["samples"][t], key=lambda s: s["doc_id"])]
               for t in out["samples"]}
    with open(sys.argv[5], "w") as f:
        json.dump({"answers": answers, "scored": lm.scored_requests}, f)
""")


@pytest.mark.slow
def test_two_processes_share_the_requests_and_both_return_the_single_process_answers(tiny, tiny_hf, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONPATH=REPO)
    outs = [tmp_path / f"process{i}.json" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(i), tiny_hf, DATA_DIR, str(outs[i])],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=400)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    results = [json.loads(o.read_text()) for o in outs]
    single_lm = evaluate.JulianLM(*tiny, dtype="float32", batch_size=4)
    single = eval_tasks.evaluate_with(single_lm, ["hellaswag"], DATA_DIR, limit=2, log_samples=True)
    assert results[0]["answers"] == results[1]["answers"]  # every process gets every answer
    for task, items in results[0]["answers"].items():
        reference = _responses(single, task)
        for got, want in zip(items, reference):
            np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=1e-4)
            assert [g[1] for g in got] == [w[1] for w in want]
    # ...and each computed only its share.
    assert all(r["scored"] > 0 for r in results)
    assert results[0]["scored"] + results[1]["scored"] == single_lm.scored_requests


def test_a_continuation_longer_than_the_context_is_scored_in_pieces_after_the_text_before_them(tiny, tiny_hf):
    # lm-eval's hf backend refuses such a request; the reference is transformers on each piece.
    import transformers

    model, tokenizer = tiny
    with open(os.path.join(REPO, "samples", "en_doyle_sign_of_four.txt")) as f:
        ids = tokenizer.encode(" ".join(line.strip() for line in f.readlines()[:40]))
    context, continuation = [BOS_ID, *ids[:30]], ids[30:330]  # 300 > 128 tokens: pieces of 64
    (ours, _), = evaluate.JulianLM(model, tokenizer, dtype="float32").score([(context, continuation)])
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32)
    expected, text = 0.0, context + continuation
    for start in range(0, len(continuation), 64):
        end = len(context) + min(start + 64, len(continuation))
        window = torch.tensor([text[max(0, end - 129): end]])  # at most 128 inputs + the last target
        with torch.no_grad():
            logprobs = torch.log_softmax(hf_model(window[:, :-1]).logits[0].double(), dim=-1)
        n = end - len(context) - start
        expected += float(logprobs[-n:].gather(1, window[0, -n:, None]).sum())
    assert ours == pytest.approx(expected, abs=LOGPROB_ATOL)


@pytest.mark.slow
def test_a_second_evaluate_process_loads_its_programs_from_a_gcs_cache(tiny_run, gcs_bucket):
    # A pod's hosts share one cache in the bucket; JAX logs each hit and miss with these switches.
    from google.cloud import storage

    env = dict(os.environ, JAX_LOG_COMPILES="1", JAX_EXPLAIN_CACHE_MISSES="1")
    args = [sys.executable, "evaluate.py", f"--checkpoint={tiny_run}", "--tasks=hellaswag,lambada_openai",
            f"--data_dir={DATA_DIR}", "--limit=3", "--bootstrap_iters=0", "--dtype=float32",
            f"--compilation_cache_dir=gs://{gcs_bucket}/jax-cache"]
    bucket = storage.Client.create_anonymous_client().bucket(gcs_bucket)
    runs = []
    for _ in range(2):
        result = forked.run(args, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append((result, sorted(b.name for b in bucket.list_blobs(prefix="jax-cache/"))))
    (first, written), (second, after) = runs
    assert "PERSISTENT COMPILATION CACHE MISS" in first.stderr and written
    assert "PERSISTENT COMPILATION CACHE MISS" not in second.stderr
    assert "Persistent compilation cache hit" in second.stderr
    assert after == written
    assert first.stdout.split("|")[:40] == second.stdout.split("|")[:40]  # the same scores


def test_bf16_log_likelihoods_stay_near_the_hf_backends_fp32_ones(tiny, hf_output):
    """The default dtype: bf16 matmuls over an fp32 residual stream. Its log-likelihoods stay
    within a few hundredths of a nat of fp32 ones (a wrong token or position is off by O(1))."""
    lm = evaluate.JulianLM(*tiny)
    ours = eval_tasks.evaluate_with(lm, TASKS, DATA_DIR, LIMIT, log_samples=True)
    errors = [abs(a[0] - b[0]) for task in TASKS
              for mine, theirs in zip(_responses(ours, task), _responses(hf_output, task)) for a, b in zip(mine, theirs)]
    print(f"bf16 against fp32: largest error {max(errors):.4f} nats, mean {np.mean(errors):.4f}")
    assert max(errors) < BF16_LOGPROB_ATOL


def test_with_a_models_own_hugging_face_tokenizer_requests_are_encoded_as_the_hf_backend_encodes_them(
        llama3_tokenizer_dir):
    """lm-eval's TemplateLM builds every request from tok_encode, prefix_token_id and eot_token_id:
    ours on the Llama-3-style tokenizer (conftest) against HFLM's on the same files."""
    import jax
    import transformers
    from lm_eval.models.huggingface import HFLM

    from model import ModelConfig, Transformer

    tok = open_tokenizer(llama3_tokenizer_dir)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    config = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64)
    theirs = HFLM(pretrained=transformers.LlamaForCausalLM(config), tokenizer=hf_tokenizer, batch_size=1, device="cpu")
    ours = evaluate.JulianLM(Transformer(ModelConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2,
                                                     d_ff=32, max_seq_len=64), jax.random.key(0)), tok)
    assert (ours.prefix_token_id, ours.eot_token_id) == (theirs.prefix_token_id, theirs.eot_token_id)
    texts = ["The cat sat.", " Il était une fois", "<|begin_of_text|>Holmes said", "", "x\n\n  y"]
    for text in texts:
        for special in (None, True, False):
            assert ours.tok_encode(text, add_special_tokens=special) == theirs.tok_encode(
                text, add_special_tokens=special), (text, special)
    requests = [Instance("loglikelihood", {}, (context, continuation), 0)
                for context, continuation in [("Sherlock", " Holmes"), ("Le chat ", "dort."), ("x", "\n\ny")]]
    assert [ours._encode_pair(*r.args) for r in requests] == [theirs._encode_pair(*r.args) for r in requests]
