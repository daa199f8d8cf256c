"""evaluate.py in French: the `french` preset through lm-eval's own task definitions, checked
against lm-eval's `hf` backend on the tiny model exported with convert.py; bits per byte against
transformers; tokenizer.py --stats.

XWinograd-fr is scored on its 77 real items (samples/eval_fr/); the preset's other tasks on a few
records per task built here in the schema each task's YAML reads (tests/french_records.py).
"""

import os
import shutil
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("accelerate")  # lm-eval's hf backend needs it

import eval_tasks  # noqa: E402
import evaluate  # noqa: E402
import french_records  # noqa: E402
import forked
from conftest import REPO  # noqa: E402
from tokenizer import BOS_ID  # noqa: E402

FR_DIR = os.path.join(REPO, "samples", "eval_fr")
PER_TASK = 4  # built records per task: each task's request shapes, in seconds
LOGPROB_ATOL = 1e-3  # fp32 on both sides: a wrong token or position is off by O(1)


@pytest.fixture(scope="module")
def french_dir(tmp_path_factory):
    """XWinograd-fr's real items beside records built in every other French task's schema."""
    directory = tmp_path_factory.mktemp("eval_fr")
    french_records.write_records(str(directory), PER_TASK)
    shutil.copy(os.path.join(FR_DIR, "xwinograd_fr.jsonl"), directory)
    return str(directory)


@pytest.fixture(scope="module")
def hf_output(tiny_hf, french_dir):
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=tiny_hf, dtype="float32", batch_size=64, device="cpu")
    return eval_tasks.evaluate_with(lm, ["french"], french_dir, log_samples=True)


@pytest.fixture(scope="module")
def our_output(tiny, french_dir):
    # Large passes of one row length (the tiny model's context): few compiled shapes (the
    # answers do not depend on them: test_evaluate.py checks that).
    lm = evaluate.JulianLM(*tiny, dtype="float32", batch_size=64, row_lengths=(128,))
    return eval_tasks.evaluate_with(lm, ["french"], french_dir, log_samples=True)


def _responses(output, task):
    """Per item, per choice: (log-likelihood, is greedy)."""
    samples = sorted(output["samples"][task], key=lambda s: s["doc_id"])
    return [[tuple(r[0]) for r in sample["resps"]] for sample in samples]


def test_the_presets_name_the_report_and_french_tasks_and_lm_eval_knows_each(tmp_path):
    from lm_eval.tasks import TaskManager

    assert eval_tasks.expand_tasks(["report"]) == list(eval_tasks.REPORT_TASKS)
    assert eval_tasks.expand_tasks(["french"]) == [
        "xwinograd_fr", "xnli_fr", "paws_fr", "belebele_fra_Latn", "lambada_openai_mt_fr",
        "french_bench_hellaswag", "french_bench_arc_challenge", "french_bench_boolqa", "french_bench_grammar",
        "french_bench_vocab", "french_bench_reading_comp", "french_bench_topic_based_nli", "french_bench_xnli"]
    assert eval_tasks.expand_tasks(["all"]) == eval_tasks.expand_tasks(["report", "french"])
    assert eval_tasks.expand_tasks(["piqa", "french", "xnli_fr", "xnli_de"])[:3] == ["piqa", "xwinograd_fr", "xnli_fr"]
    assert eval_tasks.expand_tasks(["piqa", "french", "xnli_fr", "xnli_de"])[-1] == "xnli_de"
    # Each preset task is the installed lm-eval's own task, from the file lm-eval indexes it under.
    index = TaskManager().task_index
    for task in eval_tasks.expand_tasks(["all"]):
        assert os.path.samefile(index[task].yaml_path, eval_tasks._stock_task_file(task)), task
    # ...and the split it scores offline is the one lm-eval scores (its test split, else validation).
    assert eval_tasks.task_source("xnli_fr") == ("facebook/xnli", "fr", "validation")
    assert eval_tasks.task_source("french_bench_xnli") == ("facebook/xnli", "fr", "test")
    assert eval_tasks.task_source("paws_fr") == ("google-research-datasets/paws-x", "fr", "test")
    assert eval_tasks.task_source("french_bench_grammar") == ("manu/french-bench-grammar-vocab-reading", None, "Grammar")
    assert eval_tasks.task_source("french_bench_hellaswag") == ("manu/french_bench_hellaswag", None, "validation")


def test_xwinograd_fr_real_items_choices_equal_the_hf_backend(our_output, hf_output):
    ours, theirs = _responses(our_output, "xwinograd_fr"), _responses(hf_output, "xwinograd_fr")
    assert len(ours) == len(theirs) == 77
    for item, (a, b) in enumerate(zip(ours, theirs)):
        np.testing.assert_allclose([x[0] for x in a], [x[0] for x in b], atol=LOGPROB_ATOL, err_msg=f"item {item}")
        assert [x[1] for x in a] == [x[1] for x in b], f"item {item}: greedy flags differ"
        assert np.argmax([x[0] for x in a]) == np.argmax([x[0] for x in b]), f"item {item}: choice differs"
    assert our_output["results"]["xwinograd_fr"]["acc,none"] == hf_output["results"]["xwinograd_fr"]["acc,none"]


@pytest.mark.parametrize("task", [t for t in eval_tasks.FRENCH_TASKS if t != "xwinograd_fr"])
def test_every_other_french_task_runs_in_its_schema_and_scores_as_the_hf_backend(task, our_output, hf_output):
    ours, theirs = _responses(our_output, task), _responses(hf_output, task)
    assert len(ours) == len(theirs) == PER_TASK
    for item, (a, b) in enumerate(zip(ours, theirs)):
        np.testing.assert_allclose([x[0] for x in a], [x[0] for x in b], atol=LOGPROB_ATOL, err_msg=f"{task} item {item}")
        assert [x[1] for x in a] == [x[1] for x in b], f"{task} item {item}: greedy flags differ"
        assert np.argmax([x[0] for x in a]) == np.argmax([x[0] for x in b]), f"{task} item {item}: choice differs"
    for metric in ("acc,none", "acc_norm,none"):
        assert our_output["results"][task].get(metric) == hf_output["results"][task].get(metric), metric


def test_the_comparison_table_has_a_french_section_with_the_published_baselines(our_output):
    table = eval_tasks.report_table({"hellaswag": {"acc_norm,none": 0.3}, **our_output["results"]})
    assert "| hellaswag | acc_norm | 30.0 | 25 |  | 53.5 |" in table
    assert "| French task | metric | julian | BLOOM-560m | XGLM-564M | BLOOM-1b1 |" in table
    acc = 100 * our_output["results"]["xnli_fr"]["acc,none"]
    assert f"| xnli_fr | acc | {acc:.1f} | 45.29 | 45.49 | 47.15 |" in table
    assert "| paws_fr | acc |" in table and "| 47.95 | 50.8 | 46.15 |" in table
    assert "| xwinograd_fr | acc |" in table and "| 60.24 | 57.83 | 66.27 |" in table
    assert "| french_bench_hellaswag | acc_norm |" in table and "| lambada_openai_mt_fr | perplexity |" in table
    assert "2023 harness" in table and "prompts differ slightly" in table


def test_a_data_dir_without_a_tasks_file_is_refused_in_one_line_naming_task_and_file(tiny_run):
    result = forked.run(
        [sys.executable, "evaluate.py", f"--checkpoint={tiny_run}", "--tasks=xwinograd_fr,xnli_fr",
         f"--data_dir={FR_DIR}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"evaluate.py: error: --data_dir '{os.path.abspath(FR_DIR)}' lacks 1 of 2 "
                               "tasks' files: xnli_fr.jsonl")
    assert "xnli_fr.jsonl: the 'validation' split of facebook/xnli (fr)" in lines[0]
    assert "xwinograd_fr" not in lines[0]  # its file is there


def _hf_logprob(hf_model, tokenizer, text):
    ids = torch.tensor([[BOS_ID, *tokenizer.encode(text)]])
    with torch.no_grad():
        logprobs = torch.log_softmax(hf_model(ids).logits[0, :-1].double(), dim=-1)
    return float(logprobs.gather(1, ids[0, 1:, None]).sum())


def test_bits_per_byte_per_language_is_the_hf_models_log_likelihood_over_the_same_bytes(tiny, tiny_hf, tmp_path):
    import transformers

    _, tokenizer = tiny
    docs = {}
    for lang, source in (("en", "en_doyle_sign_of_four.txt"), ("fr", "fr_maupassant_bel_ami.txt")):
        with open(os.path.join(REPO, "samples", source), encoding="utf-8") as f:
            lines = [line.strip() for line in f if 80 < len(line) < 300][:4]
        assert all(len(tokenizer.encode(line)) < 128 for line in lines)  # one window each
        docs[lang] = lines
        (tmp_path / source).write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = evaluate.perplexity(*tiny, [str(p) for p in sorted(tmp_path.iterdir())], dtype="float32")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32)
    for lang, lines in docs.items():
        n_bytes = sum(len(line.encode("utf-8")) for line in lines)
        bits = -sum(_hf_logprob(hf_model, tokenizer, line) for line in lines) / np.log(2)
        assert out[lang]["bytes"] == n_bytes
        assert out[lang]["bits_per_byte"] == pytest.approx(bits / n_bytes, abs=1e-5)
    assert out["fr"]["bytes"] > sum(len(line) for line in docs["fr"])  # accents: bytes, not characters
    table = eval_tasks.perplexity_table(out)
    assert table.splitlines()[0].startswith("| data | bits/byte | bytes |")
    assert f"| fr | {out['fr']['bits_per_byte']:.4f} | {out['fr']['bytes']} |" in table


def test_tokenizer_stats_give_tokens_per_word_and_bytes_per_token_per_language(tiny_tokenizer_path, tmp_path):
    import sentencepiece as spm

    texts = {"en_a.txt": "The cat sleeps.\nIt was a dark and stormy night.\n",
             "fr_b.txt": "Le chat dort près de la cheminée.\n\nÉtait-ce là un présage ?\n",
             "fr_c.txt": "Il était une fois.\n"}
    for name, text in texts.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    result = forked.run(
        [sys.executable, "tokenizer.py", f"--model={tiny_tokenizer_path}",
         "--stats=" + ",".join(str(tmp_path / n) for n in texts)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    sp = spm.SentencePieceProcessor(model_file=tiny_tokenizer_path)
    for lang, names in (("en", ["en_a.txt"]), ("fr", ["fr_b.txt", "fr_c.txt"])):
        lines = [line for n in names for line in texts[n].split("\n") if line]
        tokens = sum(len(sp.encode(line)) for line in lines)
        words = sum(len(line.split()) for line in lines)
        n_bytes = sum(len(line.encode()) for line in lines)
        row = f"| {lang} | {tokens / words:.3f} | {n_bytes / tokens:.3f} | {words} | {n_bytes} | {tokens} |"
        assert row in result.stdout, result.stdout
    missing = forked.run([sys.executable, "tokenizer.py", f"--model={tiny_tokenizer_path}", "--stats=nowhere.txt"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip() == "tokenizer.py: error: --stats file 'nowhere.txt' does not exist"
