"""train.fast_exit.exit_fast: what the interpreter's exit guarantees still happens, and the exit status is kept."""

from __future__ import annotations

import subprocess
import sys

from helpers import ROOT

CODE = """
import atexit, sys, threading, time
from pathlib import Path
from train.fast_exit import exit_fast
out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))
def late():
    time.sleep(0.3)
    (out / "thread").write_text("finished")
threading.Thread(target=late).start()  # non-daemon: an exit waits for it
sys.stdout.write("buffered, no newline")
sys.stderr.write("to stderr")
exit_fast(3)
"""


def test_threads_atexit_handlers_and_buffered_output_survive_and_the_status_is_kept(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CODE, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "buffered, no newline" and proc.stderr == "to stderr"
    assert (tmp_path / "thread").read_text() == "finished"
    assert (tmp_path / "atexit").read_text() == "ran"
