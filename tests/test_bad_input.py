"""Bad input, end to end: every script's command line against the inputs a user gets wrong.

Each row runs one script as its own process, as a user would (forked with its libraries already
imported: tests/forked.py), and checks its exit status (2 for bad input, 0 where bad records stay
under --max_bad_fraction and are counted and skipped; never a traceback), that the error is one
short line, `SCRIPT.py: error: ...`, naming the file, line, flag or shape at fault and what was
expected, and, for the runs that go through, the counts they print. The rows of a script write into
one output location; after them, a good run into that same location succeeds
(`test_then_a_good_run_into_the_same_output_succeeds`): nothing a failed run left behind is trusted
or blocks it.

Most rows fail on validation, before any compile, engine or pool: about a second each. The runs that
train (bad records below the limit, the good runs) use the session's tiny model and tokenizer
(conftest.py), two steps, and the shared compilation cache. The selected rows are independent
processes: they run at once, one per core (`results`), and each test checks its own.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest

import forked
from conftest import DATA_FILES, REPO

SAMPLES = os.path.join(REPO, "samples")
SFT_DATA = os.path.join(SAMPLES, "sft", "en_alpaca_seed_tasks.jsonl")  # 175 records
PAIRS_200 = os.path.join(SAMPLES, "preference", "en_hh_rlhf_harmless_test_pairs_first200.jsonl")
PAIRS_100 = os.path.join(SAMPLES, "preference", "en_hh_rlhf_sample100_pairs.jsonl")
TEXT = os.path.join(SAMPLES, "en_doyle_sign_of_four.txt")
EVAL_DIR = os.path.join(SAMPLES, "eval")

TRAIN = ["--flagfile=configs/tiny.flags", "--tokenizer={tok}", "--steps=2", "--warmup_steps=0", "--eval_every=0"]
SFT = ["--flagfile=configs/sft_tiny.flags", "--init_from={run}", "--steps=2", "--warmup_steps=0", "--eval_every=0"]
DPO = ["--flagfile=configs/dpo_tiny.flags", "--init_from={run}", "--epochs=0", "--steps=2", "--warmup_ratio=0",
       "--warmup_steps=0", "--eval_every=0"]
EVALUATE = ["--checkpoint={run}", "--limit=2", "--bootstrap_iters=0"]
DATA = ["prepare", "--tokenizer={tok}", "--seq_len=64", "--num_shards=1", "--num_cpus=1", "--validation_fraction=0.05",
        "--block_records=4", "--languages=en,fr"]


@dataclasses.dataclass(frozen=True)
class Row:
    """`script args` exits `status`; its error line (status 2) or stdout (status 0) names each of
    `named`. Placeholders: {in} the bad inputs, {out} the script's shared output location,
    {own} this row's own folder, {run} the tiny run, {tok} its tokenizer, {hf} its HF export."""
    id: str
    script: str
    args: list[str]
    status: int
    named: tuple[str, ...]
    slow: bool = False


ROWS = [
    # tokenizer.py
    Row("tokenizer-missing-file", "tokenizer.py", ["--input={in}/none.txt", "--model_prefix={out}/tok"], 2,
        ("--input", "none.txt", "not found", "expected UTF-8 text files")),
    Row("tokenizer-empty-file", "tokenizer.py", ["--input={in}/empty.txt", "--model_prefix={out}/tok"], 2,
        ("empty.txt", "is empty", "expected UTF-8 text")),
    Row("tokenizer-binary-file", "tokenizer.py", ["--input={in}/binary.bin", "--model_prefix={out}/tok",
                                                  "--vocab_size=2000"], 2, ("binary.bin", "not UTF-8", "line 1")),
    Row("tokenizer-unwritable-output", "tokenizer.py", [f"--input={TEXT}", "--model_prefix={in}/a_file/tok"], 2,
        ("a_file/tok", "expected a writable")),
    Row("tokenizer-vocab-out-of-range", "tokenizer.py", [f"--input={TEXT}", "--model_prefix={out}/tok",
                                                         "--vocab_size=10"], 2, ("vocab_size=10", "must exceed")),
    Row("tokenizer-truncated-model", "tokenizer.py", ["--model={in}/truncated.model", f"--stats={TEXT}"], 2,
        ("truncated.model", "not a SentencePiece model")),
    # data.py (its validation before the engine starts is issue 21's)
    Row("data-missing-file", "data.py", [*DATA, "--input={in}/none.txt", "--output={out}"], 2, ("none.txt",)),
    Row("data-empty-file", "data.py", [*DATA, "--input={in}/empty.txt", "--output={out}"], 2, ("empty.txt",)),
    Row("data-binary-file", "data.py", [*DATA, "--input={in}/binary.bin", "--output={out}"], 2,
        ("binary.bin", "expected")),
    Row("data-truncated-tokenizer", "data.py", [*DATA, f"--input={TEXT}", "--output={out}",
                                                "--tokenizer={in}/truncated.model"], 2, ("truncated.model",)),
    Row("data-unwritable-output", "data.py", [*DATA, f"--input={TEXT}", "--output={in}/a_file/data"], 2,
        ("a_file/data",)),
    Row("data-flag-out-of-range", "data.py", [*DATA, f"--input={TEXT}", "--output={out}", "--num_shards=0"], 2,
        ("--num_shards=0", "must be positive")),
    # train.py
    Row("train-missing-file", "train.py", [*TRAIN, "--train_data={in}/none.txt", "--output_dir={out}"], 2,
        ("none.txt", "does not exist")),
    Row("train-empty-file", "train.py", [*TRAIN, "--train_data={in}/empty.txt", "--output_dir={out}"], 2,
        ("empty.txt", "0 tokens", "expected")),
    Row("train-binary-file", "train.py", [*TRAIN, "--train_data={in}/binary.bin", "--output_dir={out}"], 2,
        ("binary.bin", "not UTF-8", "expected")),
    Row("train-data-is-a-run-folder", "train.py", [*TRAIN, "--train_data={run}", "--output_dir={out}"], 2,
        ("manifest.json", "data.py prepare")),
    Row("train-tokenizer-vocabulary-differs", "train.py",
        [*TRAIN, "--tokenizer={in}/tok2000.model", f"--train_data={TEXT}", "--output_dir={out}"], 2,
        ("tok2000.model", "2000 pieces", "--vocab_size=4096")),
    Row("train-truncated-tokenizer", "train.py",
        [*TRAIN, "--tokenizer={in}/truncated.model", f"--train_data={TEXT}", "--output_dir={out}"], 2,
        ("truncated.model", "not a SentencePiece model")),
    Row("train-steps-out-of-range", "train.py", [*TRAIN, "--steps=0", f"--train_data={TEXT}", "--output_dir={out}"], 2,
        ("--steps=0", ">= 1")),
    Row("train-learning-rate-out-of-range", "train.py",
        [*TRAIN, "--learning_rate=-1", f"--train_data={TEXT}", "--output_dir={out}"], 2, ("--learning_rate=-1", "> 0")),
    Row("train-eval-tasks-without-their-data", "train.py",
        [*TRAIN, f"--train_data={TEXT}", "--output_dir={out}", "--eval_every=1", "--eval_tasks=piqa",
         "--eval_data_dir={in}/eval"], 2, ("piqa.jsonl is empty",)),
    Row("train-unwritable-output", "train.py", [*TRAIN, f"--train_data={TEXT}", "--output_dir={in}/a_file/run"], 2,
        ("--output_dir", "a_file/run", "not writable")),
    # The run's own settings (tiny.flags' warmup; a longer --steps may extend a run): only the damage is at fault.
    Row("train-resume-from-truncated-checkpoint", "train.py",
        [*(a for a in TRAIN if not a.startswith("--warmup_steps")), "--steps=200",
         f"--train_data={','.join(DATA_FILES)}", "--output_dir={in}/truncated_run"], 2,
        ("truncated_run", "is damaged", "the step before it")),
    # sft.py: the first three are issue 22's crashes (a TypeError in prepared.py), now counted and skipped
    Row("sft-bad-records-below-the-limit", "sft.py",
        [*SFT, "--train_data={in}/sft_1_truncated.jsonl,{in}/sft_1_foo.jsonl", "--prepared_dir=", "--output_dir={own}"],
        0, ("bad records: invalid JSON 1, wrong shape 1", "sft done: step 2")),
    Row("sft-bad-records-above-the-limit", "sft.py", [*SFT, "--train_data={in}/sft_5_truncated.jsonl",
                                                      "--output_dir={out}"], 2,
        ("sft_5_truncated.jsonl, line 4", "line 8", "5 of 175 records are bad", "--max_bad_fraction=0.01")),
    Row("sft-missing-file", "sft.py", [*SFT, "--train_data={in}/none.jsonl", "--output_dir={out}"], 2,
        ("none.jsonl", "does not exist")),
    Row("sft-empty-file", "sft.py", [*SFT, "--train_data={in}/empty.jsonl", "--output_dir={out}"], 2,
        ("empty.jsonl", "no records", "expected a JSON array or JSONL")),
    Row("sft-binary-file", "sft.py", [*SFT, "--train_data={in}/binary.bin", "--output_dir={out}"], 2,
        ("binary.bin", "not UTF-8")),
    Row("sft-json-object-not-jsonl", "sft.py", [*SFT, "--train_data={in}/object.json", "--output_dir={out}"], 2,
        ("object.json, line 1", "wrong shape", "expected one of messages")),
    Row("sft-preference-pairs-not-conversations", "sft.py", [*SFT, f"--train_data={PAIRS_100}", "--output_dir={out}"],
        2, ("en_hh_rlhf_sample100_pairs.jsonl, line 1", "'chosen'", "100 of 100 records are bad")),
    Row("sft-init-from-a-hugging-face-folder-we-do-not-run", "sft.py",
        [*SFT, "--init_from={in}/hf_sliding_window", f"--train_data={SFT_DATA}", "--output_dir={out}"], 2,
        ("hf_sliding_window/config.json", "sliding_window=4096 (sliding-window attention)", "supported: a Llama")),
    Row("sft-init-from-a-truncated-checkpoint", "sft.py",
        [*SFT, "--init_from={in}/truncated_run", f"--train_data={SFT_DATA}", "--output_dir={out}"], 2,
        ("truncated_run", "is damaged")),
    Row("sft-tokenizer-vocabulary-differs", "sft.py",
        [*SFT, "--tokenizer={in}/tok2000.model", f"--train_data={SFT_DATA}", "--output_dir={out}"], 2,
        ("tok2000.model (2000 pieces)", "is not the tokenizer of --init_from", "4096 pieces")),
    Row("sft-flag-out-of-range", "sft.py",
        [*SFT, "--max_bad_fraction=2", f"--train_data={SFT_DATA}", "--output_dir={out}"], 2,
        ("--max_bad_fraction=2", "range [0, 1]")),
    Row("sft-seq-len-beyond-the-context", "sft.py",
        [*SFT, "--seq_len=4096", f"--train_data={SFT_DATA}", "--output_dir={out}"], 2,
        ("--seq_len=4096", "context of 128")),
    Row("sft-unwritable-output", "sft.py", [*SFT, f"--train_data={SFT_DATA}", "--output_dir={in}/a_file/run"], 2,
        ("--output_dir", "a_file/run", "not writable")),
    # dpo.py
    Row("dpo-one-bad-pair-of-200", "dpo.py", [*DPO, "--train_data={in}/pairs_1_truncated_of_200.jsonl",
                                              "--output_dir={own}"], 0,
        ("bad records: invalid JSON 1", "dpo done: step 2"), slow=True),
    Row("dpo-bad-records-above-the-limit", "dpo.py", [*DPO, "--train_data={in}/pairs_3_foo.jsonl",
                                                      "--output_dir={out}"], 2,
        ("pairs_3_foo.jsonl, line 4", "line 8", "3 of 100 records are bad", "expected chosen and rejected")),
    Row("dpo-conversations-not-pairs", "dpo.py", [*DPO, f"--train_data={SFT_DATA}", "--output_dir={out}"], 2,
        ("en_alpaca_seed_tasks.jsonl, line 1", "expected chosen and rejected")),
    Row("dpo-empty-file", "dpo.py", [*DPO, "--train_data={in}/empty.jsonl", "--output_dir={out}"], 2,
        ("empty.jsonl", "no records")),
    Row("dpo-flag-out-of-range", "dpo.py", [*DPO, "--beta=-1", f"--train_data={PAIRS_100}", "--output_dir={out}"],
        2, ("--beta=-1", "positive")),
    # evaluate.py
    Row("evaluate-offline-without-data-dir", "evaluate.py", ["--checkpoint={run}"], 2,
        ("--data_dir", "offline", "docs/evaluation.md", "mirror")),
    Row("evaluate-french-tasks-missing", "evaluate.py", [*EVALUATE, "--tasks=french", "--data_dir={samples}/eval_fr"],
        2, ("lacks 12 of 13", "xnli_fr.jsonl", "docs/evaluation.md")),
    Row("evaluate-data-dir-missing", "evaluate.py", [*EVALUATE, "--tasks=piqa", "--data_dir={in}/none"], 2,
        ("none", "is not a directory")),
    Row("evaluate-empty-task-file", "evaluate.py", [*EVALUATE, "--tasks=piqa", "--data_dir={in}/eval"], 2,
        ("piqa.jsonl is empty", "expected")),
    Row("evaluate-binary-task-file", "evaluate.py", [*EVALUATE, "--tasks=boolq", "--data_dir={in}/eval"], 2,
        ("boolq.jsonl: line 1", "not UTF-8")),
    Row("evaluate-task-file-of-another-schema", "evaluate.py", [*EVALUATE, "--tasks=hellaswag", "--data_dir={in}/eval"],
        2, ("hellaswag.jsonl", "ctx_a", "Hugging Face schema")),
    Row("evaluate-hugging-face-folder-we-do-not-run", "evaluate.py",
        [*EVALUATE, "--checkpoint={in}/hf_sliding_window", "--tasks=piqa", f"--data_dir={EVAL_DIR}"], 2,
        ("hf_sliding_window/config.json", "sliding_window=4096", "supported: a Llama")),
    Row("evaluate-truncated-checkpoint", "evaluate.py", [*EVALUATE, "--checkpoint={in}/truncated_run", "--tasks=piqa",
                                                         f"--data_dir={EVAL_DIR}"], 2, ("truncated_run", "is damaged")),
    Row("evaluate-flag-out-of-range", "evaluate.py", [*EVALUATE, "--limit=0", "--tasks=piqa", f"--data_dir={EVAL_DIR}"],
        2, ("--limit=0", "positive")),
    Row("evaluate-unwritable-output", "evaluate.py", [*EVALUATE, "--tasks=piqa", f"--data_dir={EVAL_DIR}",
                                                      "--output={in}/a_file/results.json"], 2,
        ("--output", "a_file", "not writable")),
    Row("evaluate-empty-ppl-file", "evaluate.py", [*EVALUATE, "--ppl_data={in}/empty.txt"], 2,
        ("empty.txt", "holds no text")),
    # generate.py
    Row("generate-hugging-face-folder-of-a-mixture-of-experts", "generate.py",
        ["--checkpoint={in}/hf_moe", "--prompt=Hello"], 2,
        ("hf_moe/config.json", "num_local_experts=8 (a mixture of experts)", "supported: a Llama")),
    Row("generate-truncated-checkpoint", "generate.py", ["--checkpoint={in}/truncated_run", "--prompt=Hello"], 2,
        ("truncated_run", "is damaged")),
    Row("generate-a-folder-without-checkpoints", "generate.py", ["--checkpoint={in}", "--prompt=Hello"], 2,
        ("no checkpoint in", "expected an Orbax step directory")),
    Row("generate-flag-out-of-range", "generate.py", ["--checkpoint={run}", "--prompt=Hello", "--top_p=2"], 2,
        ("--top_p=2", "range [0, 1]")),
    # convert.py
    Row("convert-missing-folder", "convert.py", ["--to=julian", "--hf={in}/none", "--out={out}"], 2,
        ("none/config.json", "does not exist")),
    Row("convert-a-julian-run-as-hugging-face", "convert.py", ["--to=julian", "--hf={run}", "--out={out}"], 2,
        ("config.json names no model_type", "--to=hf")),
    Row("convert-truncated-safetensors", "convert.py", ["--to=julian", "--hf={in}/hf_truncated", "--out={out}"], 2,
        ("model.safetensors", "not a readable safetensors file")),
    Row("convert-tokenizer-larger-than-the-vocabulary", "convert.py",
        ["--to=julian", "--hf={in}/hf_vocab1000", "--out={out}"], 2,
        ("tokenizer.model has 4096 pieces", "vocab_size is only 1000")),
    Row("convert-truncated-checkpoint", "convert.py", ["--to=hf", "--checkpoint={in}/truncated_run", "--out={out}"], 2,
        ("truncated_run", "is damaged")),
    Row("convert-into-a-run-folder", "convert.py", ["--to=julian", "--hf={hf}", "--out={run}"], 2,
        ("already holds checkpoint step", "expected a new or empty directory")),
    Row("convert-unwritable-output", "convert.py", ["--to=julian", "--hf={hf}", "--out={in}/a_file/out"], 2,
        ("--out", "a_file/out", "not writable")),
]

# script: a good run into the location its rows wrote to ({out})
GOOD = {
    "tokenizer.py": [f"--input={TEXT}", "--model_prefix={out}/tok", "--vocab_size=2000"],
    "data.py": [*DATA, "--input=" + ",".join(DATA_FILES), "--output={out}"],
    "train.py": [*TRAIN, "--train_data=" + ",".join(DATA_FILES), "--output_dir={out}"],
    "sft.py": [*SFT, f"--train_data={SFT_DATA}", "--output_dir={out}"],
    "dpo.py": [*DPO, f"--train_data={PAIRS_100}", "--output_dir={out}"],
    "evaluate.py": [*EVALUATE, "--tasks=piqa", f"--data_dir={EVAL_DIR}", "--output={out}/results.json"],
    "generate.py": ["--checkpoint={run}", "--prompt=Hello", "--max_new_tokens=2"],
    "convert.py": ["--to=julian", "--hf={hf}", "--out={out}"],
}
SLOW_GOOD = {"data.py", "dpo.py"}


def _with_lines(path: str, replace: dict[int, str]) -> list[str]:
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for index, line in replace.items():
        lines[index] = line if line != "truncate" else lines[index][:40]
    return lines


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_run, tiny_hf) -> str:
    """A folder of the bad inputs the rows name."""
    from tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("bad_inputs")

    def write(name: str, content: str | bytes | list[str]) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, list):
            content = "\n".join(content) + "\n"
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)

    binary = bytes(range(128, 256)) * 32  # no UTF-8 text starts with a continuation byte
    write("empty.txt", "")
    write("empty.jsonl", "")
    write("binary.bin", binary)
    write("a_file", "not a folder")
    write("object.json", json.dumps({"data": [{"instruction": "Say hi.", "output": "Hi."}]}))
    write("sft_1_truncated.jsonl", _with_lines(SFT_DATA, {10: "truncate"}))
    write("sft_1_foo.jsonl", _with_lines(SFT_DATA, {20: '{"foo": "bar"}'}))
    write("sft_5_truncated.jsonl", _with_lines(SFT_DATA, {i: "truncate" for i in (3, 7, 11, 15, 19)}))
    write("pairs_1_truncated_of_200.jsonl", _with_lines(PAIRS_200, {50: "truncate"}))
    write("pairs_3_foo.jsonl", _with_lines(PAIRS_100, {i: '{"foo": "bar"}' for i in (3, 7, 11)}))
    write("eval/piqa.jsonl", "")
    write("eval/boolq.jsonl", binary)
    write("eval/hellaswag.jsonl", [json.dumps({"question": "?", "label": 0})])
    train_tokenizer([TEXT], str(root / "tok2000"), vocab_size=2000)
    (root / "truncated.model").write_bytes((root / "tok2000.model").read_bytes()[:1000])
    truncated_run = root / "truncated_run"
    shutil.copytree(tiny_run, truncated_run)
    newest = max(int(p.name) for p in truncated_run.iterdir() if p.name.isdigit())
    params = max((truncated_run / str(newest) / "params").rglob("*"), key=lambda p: p.stat().st_size)
    os.truncate(params, params.stat().st_size // 2)
    shutil.copytree(tiny_hf, root / "hf_truncated")
    os.truncate(root / "hf_truncated" / "model.safetensors", 100_000)
    for name, edit in (("hf_sliding_window", {"model_type": "mistral", "sliding_window": 4096}),
                       ("hf_moe", {"model_type": "mixtral", "num_local_experts": 8}),
                       ("hf_vocab1000", {"vocab_size": 1000})):
        shutil.copytree(tiny_hf, root / name)
        with open(root / name / "config.json") as f:
            config = json.load(f)
        with open(root / name / "config.json", "w") as f:
            json.dump({**config, **edit}, f)
    return str(root)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, str]:
    """script: the output location its rows and then its good run write to."""
    root = tmp_path_factory.mktemp("outputs")
    return {script: str(root / script.removesuffix(".py")) for script in GOOD}


@pytest.fixture(scope="module")
def places(bad_inputs, outputs, tiny_run, tiny_tokenizer_path, tiny_hf) -> dict[str, str]:
    return {"in": bad_inputs, "run": tiny_run, "tok": tiny_tokenizer_path, "hf": tiny_hf, "samples": SAMPLES}


def run(script: str, args: list[str], places: dict[str, str]) -> subprocess.CompletedProcess:
    args = [arg.format(**places) for arg in args]
    # Offline, as the tests' rule is; the Hub checks of evaluate.py see it at once.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return forked.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO, env=env,
                      capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def results(request, places, outputs, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Row id: its run, for the rows this session selected, run one per core at a time."""
    selected = [item.callspec.params["row"] for item in request.session.items
                if item.module is request.module and "row" in getattr(getattr(item, "callspec", None), "params", {})]

    def run_row(row: Row) -> subprocess.CompletedProcess:
        own = str(tmp_path_factory.mktemp(row.id))
        return run(row.script, row.args, {**places, "out": outputs[row.script], "own": own})

    with concurrent.futures.ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        return dict(zip([row.id for row in selected], pool.map(run_row, selected)))


def params(rows):
    return [pytest.param(row, id=row.id, marks=[pytest.mark.slow] if row.slow else []) for row in rows]


@pytest.mark.parametrize("row", params(ROWS))
def test_bad_input_is_one_line_naming_what_was_expected(row, places, results):
    result = results[row.id]
    shown = f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    assert result.returncode == row.status, shown
    assert "Traceback" not in result.stderr, shown
    if row.status == 2:
        errors = [line for line in result.stderr.splitlines() if line.startswith(f"{row.script}: error: ")]
        assert len(errors) == 1 and result.stderr.rstrip("\n").endswith(errors[0]), shown
        assert len(errors[0]) < 600, errors[0]  # a line, not a dump
        text = errors[0]
    else:
        text = result.stdout
    for name in row.named:
        assert name.format(**places) in text, (name, shown)


@pytest.mark.parametrize("script", [pytest.param(s, marks=[pytest.mark.slow] if s in SLOW_GOOD else [])
                                    for s in GOOD])
def test_then_a_good_run_into_the_same_output_succeeds(script, places, outputs):
    result = run(script, GOOD[script], {**places, "out": outputs[script]})
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
