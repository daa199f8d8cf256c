"""cli.py, as every script uses it: one-line usage errors with exit status 2, a short --help.

Each case runs a script as a user would; the errors come before any model work, so each run
costs about the script's imports.
"""

import ast
import os
import subprocess
import sys

import pytest

import forked
from conftest import REPO

MISSING = "no/such/path"
# script: arguments that name a missing file (and write under {tmp})
CASES = {
    "train.py": ["--flagfile=configs/tiny.flags", f"--tokenizer={MISSING}.model", "--train_data=x",
                 "--output_dir={tmp}/out"],
    "sft.py": [f"--init_from={MISSING}", "--train_data=x", "--output_dir={tmp}/out"],
    "generate.py": [f"--checkpoint={MISSING}", "--prompt=x"],
    "evaluate.py": [f"--checkpoint={MISSING}"],
    "convert.py": ["--to=hf", f"--checkpoint={MISSING}", "--out={tmp}/hf"],
    "tokenizer.py": [f"--input={MISSING}.txt", "--model_prefix={tmp}/tok"],
    "dpo.py": [f"--init_from={MISSING}", "--train_data=x", "--output_dir={tmp}/out"],
    "data.py": ["prepare", "--input=x.txt", "--output={tmp}/out", f"--tokenizer={MISSING}.model"],
}
# data.py's --help leads with its command's usage, not its docstring's first line.
HELP_LIKE_DOCSTRING = [script for script in CASES if script != "data.py"]
# Flags are parsed by cli.run alike in every script: a few kinds of bad value suffice.
MALFORMED = [("train.py", "--steps=many"), ("tokenizer.py", "--vocab_size=-"), ("convert.py", "--to=xml")]


def run(script: str, *args: str, cwd: str) -> subprocess.CompletedProcess:
    return forked.run([sys.executable, os.path.join(REPO, script), *args], cwd=cwd,
                      capture_output=True, text=True, timeout=120)


def assert_one_line_usage_error(result: subprocess.CompletedProcess, script: str, *named: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), result.stderr
    for name in named:
        assert name in lines[0]


@pytest.mark.parametrize("script", CASES)
def test_a_missing_file_is_one_line_naming_the_path_with_exit_status_2(script, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in CASES[script]]
    result = run(script, *args, cwd=REPO)
    assert_one_line_usage_error(result, script, MISSING)
    assert "not found" in result.stderr or "no checkpoint" in result.stderr or "does not exist" in result.stderr


@pytest.mark.parametrize("script, bad", MALFORMED)
def test_a_malformed_flag_is_one_line_naming_it_with_exit_status_2(script, bad, tmp_path):
    assert_one_line_usage_error(run(script, bad, cwd=tmp_path), script, bad)


def test_an_unknown_or_missing_flag_is_one_line_naming_it(tmp_path):
    result = run("tokenizer.py", "--input=a.txt", "--model_prefx=tok", cwd=tmp_path)
    assert_one_line_usage_error(result, "tokenizer.py", "model_prefx", "Did you mean: model_prefix")
    result = run("tokenizer.py", "--input=a.txt", cwd=tmp_path)
    assert_one_line_usage_error(result, "tokenizer.py", "--model_prefix is required")


@pytest.mark.parametrize("script", HELP_LIKE_DOCSTRING)
def test_help_is_the_docstring_summary_then_the_flags(script, tmp_path):
    result = run(script, "--help", cwd=tmp_path)
    assert result.returncode == 0 and not result.stderr, result.stderr
    with open(os.path.join(REPO, script), encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read()), clean=False)
    first_line, last_paragraph = doc.strip().splitlines()[0], doc.strip().split("\n\n")[-1]
    help_lines = result.stdout.splitlines()
    assert help_lines[0] == first_line
    flags_at = help_lines.index(f"{script} flags:")
    assert flags_at < 12  # a summary, not the docstring
    assert last_paragraph.strip().splitlines()[0].strip() not in result.stdout  # the long part stays out
    assert sum(line.startswith("  --") for line in help_lines[flags_at:]) >= 3
