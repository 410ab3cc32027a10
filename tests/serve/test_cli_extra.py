"""Context trimming, and the rich style driven through a real pseudo-terminal."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest
from helpers import ENV, ROOT, common, run

from serve.cli import trim_to_context
from serve.loading import LoadedModel


def test_oldest_turns_are_dropped_to_fit_the_context(tokenizers):
    tok = tokenizers["smollm2"]
    loaded = LoadedModel(None, tok, "chatml", set(), [], "x", "full", context_length=120)
    msgs = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        msgs += [{"role": "user", "content": f"question {i} " * 4}, {"role": "assistant", "content": f"answer {i} " * 4}]
    msgs.append({"role": "user", "content": "last question"})
    ids, dropped = trim_to_context(loaded, msgs, max_new_tokens=40)
    assert dropped > 0 and dropped % 2 == 0 and len(ids) + 40 <= 120
    assert msgs[0]["role"] == "system" and msgs[-1]["content"] == "last question"
    assert msgs[1]["content"].startswith(f"question {dropped // 2} ")  # the oldest went first
    with pytest.raises(ValueError, match="exceeds the model's context"):
        trim_to_context(loaded, [{"role": "user", "content": "long " * 200}], max_new_tokens=40)


@pytest.mark.slow
def test_rich_style_in_a_terminal(tiny_llama, tmp_path):
    out = tmp_path / "m"
    run("train.py", common(tiny_llama, out, max_steps=1, per_device_train_batch_size=2, save_strategy="no"))
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "serve.cli", "--model-path", str(out), "--style", "rich",
                             "--temperature", "1", "--seed", "1", "--max-new-tokens", "6"],
                            stdin=slave, stdout=slave, stderr=subprocess.DEVNULL, env={**ENV, "TERM": "xterm"},
                            cwd=ROOT)
    os.close(slave)
    seen = b""

    def read_until(marker: bytes, times: int = 1, timeout: float = 120) -> None:
        nonlocal seen
        deadline = time.time() + timeout
        while seen.count(marker) < times and time.time() < deadline:
            r, _, _ = select.select([master], [], [], 0.5)
            if r:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    return

    read_until(b"USER:")
    os.write(master, b"Hello there\r")
    read_until(b"ASSISTANT:")
    read_until(b"USER:", times=2)  # the reply finished and the next prompt is up
    before = seen.count(b"Hello there")
    os.write(master, b"\x1b[A")  # up arrow: prompt_toolkit history recalls the last message
    read_until(b"Hello there", times=before + 1, timeout=20)
    assert seen.count(b"Hello there") > before
    os.write(master, b"\x15!!exit\r")  # ctrl-u clears the recalled line
    proc.wait(timeout=60)
    os.close(master)
    assert proc.returncode == 0
    assert b"ASSISTANT:" in seen and seen.count(b"USER:") >= 2  # a reply was rendered, then a new prompt
