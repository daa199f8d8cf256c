"""runlog.py: the interval logger's records."""

import json

from runlog import IntervalLogger


def test_a_stopping_run_logs_the_steps_since_its_last_record(tmp_path):
    logger = IntervalLogger(str(tmp_path), every=10, steps=100, schedule=lambda s: 1e-3,
                                  tokens_per_step=8, flops_per_step=1.0, peak_flops=1.0)
    lines = [logger.log(s, {"loss": float(s), "grad_norm": 1.0, "skipped": False, "supervised_tokens": 8},
                        0.0, {}, last=s == 13) for s in range(1, 14)]
    logger.close()
    assert [bool(line) for line in lines] == [s in (10, 13) for s in range(1, 14)]
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss"]) for r in records] == [(10, 5.5), (13, 12.0)]  # means of 1..10 and 11..13
