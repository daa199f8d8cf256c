"""Signals at any moment after the work is saved: a SIGTERM or SIGINT that lands while a finished
run cleans up (closing the checkpointer, plotting the loss, the interpreter's shutdown) ends it
with status 0 and leaves the final checkpoint whole.

The signal is sent again and again from the moment the final step's checkpoint directory
appears (Orbax renames it into place once committed) until the process is gone, so it lands at
every stage of the cleanup the process goes through; before the fix, one such run ended -15.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

import forked
from conftest import DATA_FILES, REPO

STEPS = 2


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_cleanup_after_the_final_checkpoint_exits_0(signum, tiny_tokenizer_path, tmp_path):
    import checkpoint

    out = tmp_path / "run"
    process = forked.Popen(
        [sys.executable, os.path.join(REPO, "train.py"), "--flagfile=configs/tiny.flags",
         f"--tokenizer={tiny_tokenizer_path}", "--train_data=" + ",".join(DATA_FILES), f"--steps={STEPS}",
         "--warmup_steps=0", "--eval_every=0", f"--output_dir={out}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (out / str(STEPS)).is_dir():
            assert process.poll() is None, process.communicate()
            assert time.time() < deadline, "no final checkpoint within 300 s"
            time.sleep(0.01)
        sent = 0
        while process.poll() is None:
            process.send_signal(signum)
            sent += 1
            time.sleep(0.02)
        stdout, stderr = process.communicate()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert sent and process.returncode == 0, (sent, process.returncode, stdout, stderr)
    assert "Traceback" not in stderr, stderr
    assert checkpoint.latest_step(str(out)) == STEPS
