"""benchmarks/accelerator.py: its --smoke run goes through every section on this CPU."""

import json

import pytest

from conftest import run_script


@pytest.mark.slow
def test_accelerator_smoke_run_measures_every_section_and_writes_the_table_as_json(tmp_path):
    out = tmp_path / "accelerator.json"
    printed = run_script("benchmarks/accelerator.py", "--smoke", f"--out={out}").stdout
    result = json.loads(out.read_text())
    assert result["smoke"] and result["backend"] == "cpu" and result["auto_attention"] == "einsum"
    rows = result["rows"]
    training = [r for r in rows if r["section"] == "training"]
    # Every attention implementation x remat policy, einsum and an interpreted Pallas kernel.
    assert {(r["attention"], r["remat"]) for r in training} == {
        (a, m) for a in ("einsum", "flash") for m in ("none", "dots")}
    for r in training:
        assert r["batch"] == 4, r  # the largest candidate fits a CPU's memory
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["compile_s"] > 0 and r["memory_gib"] > 0
        assert r["peak_gib"] is None  # a CPU reports no memory_stats
    generation = [r for r in rows if r["section"] == "generation"]
    assert [r["batch"] for r in generation] == [1, 4] and all(r["tokens_per_s"] > 0 for r in generation)
    (evaluation,) = [r for r in rows if r["section"] == "evaluation"]
    assert evaluation["requests"] == 40 and evaluation["requests_per_s"] > evaluation["cold_requests_per_s"] > 0
    (saved,) = [r for r in rows if r["section"] == "checkpoint"]
    assert 0 < saved["blocked_s"] <= saved["commit_s"] and saved["gib"] > 0
    # One table: a header, a rule and one line per JSON row.
    table = [line for line in printed.splitlines() if line.startswith("|")]
    assert "throughput" in table[0] and "MFU" in table[0] and len(table) == 2 + len(rows)
