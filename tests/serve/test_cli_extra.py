"""Context trimming, and the rich style driven through a real pseudo-terminal."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest
from helpers import ENV, ROOT, common, make_tiny_llama, run

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


@pytest.mark.slow
def test_ctrl_c_stops_the_reply_only(tokenizers, tmp_path):
    """A real SIGINT while a long greedy reply streams: that reply ends, the chat goes on, !!exit works.
    The model has a long context and may write 30,000 tokens, so a reply cannot finish before the signal
    lands however slowly this test process reads."""
    import queue
    import signal
    import threading
    model = make_tiny_llama(tmp_path / "long-context", tokenizers["smollm2"], context=32768)

    end = " __END_OF_A_MESSAGE_47582648__"
    proc = subprocess.Popen([sys.executable, "-m", "serve.cli", "--model-path", model, "--conv-template", "chatml",
                             "--style", "programmatic", "--temperature", "0", "--max-new-tokens", "30000"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT,
                            bufsize=0)
    chunks: queue.Queue[bytes] = queue.Queue()
    threading.Thread(target=lambda: [chunks.put(b) for b in iter(lambda: proc.stdout.read(64), b"")],
                     daemon=True).start()
    seen = b""

    def wait_for(marker: bytes, times: int = 1, timeout: float = 120) -> None:
        nonlocal seen
        deadline = time.time() + timeout
        while seen.count(marker) < times:
            assert time.time() < deadline, f"timed out waiting for {marker!r}; got {seen[-500:]!r}"
            try:
                seen += chunks.get(timeout=0.5)
            except queue.Empty:
                pass

    try:
        proc.stdin.write(f"Tell me a long story{end}\n".encode())
        wait_for(b"[!OP:ASSISTANT]: ")
        start = len(seen)
        while len(seen) - start < 20:  # the reply is streaming
            wait_for(b"", timeout=60)
            seen += chunks.get(timeout=60)
        proc.send_signal(signal.SIGINT)
        wait_for(b"[reply interrupted]")
        proc.stdin.write(f"second message{end}\n".encode())
        wait_for(b"[!OP:ASSISTANT]: ", times=2)
        start = len(seen)
        while len(seen) - start < 20:
            seen += chunks.get(timeout=60)
        proc.send_signal(signal.SIGINT)  # also stops the second reply
        wait_for(b"[reply interrupted]", times=2)
        saved = tmp_path / "chat.json"
        proc.stdin.write(f"!!save {saved}{end}\n".encode())
        wait_for(b"[saved ")
        proc.stdin.write(f"!!exit{end}\n".encode())
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()[-2000:]
    finally:
        proc.kill()
    text = seen.decode(errors="replace")
    shown = [part.split(end)[0] for part in text.split("[!OP:ASSISTANT]: ")[1:3]]
    assert 0 < len(shown[0]) and "[!OP:USER]: second message" in text
    assert "Traceback" not in text
    # the history kept exactly what was shown of each interrupted reply, and the chat went on after it
    turns = json.loads(saved.read_text())["conversations"]
    assert [t["from"] for t in turns] == ["human", "gpt", "human", "gpt"]
    assert [turns[1]["value"], turns[3]["value"]] == shown


@pytest.fixture(scope="module")
def lora_output(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    run("train.py", common(tiny_llama, out, max_steps=1, per_device_train_batch_size=2, save_strategy="no", lora=True))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_serving_of_full_and_adapter_outputs(tiny_llama, lora_output, bits):
    """--load-4bit/--load-8bit (bitsandbytes, CPU backend here): layers are quantized, logits stay close to
    the full-precision ones, and the CLI chats with the quantized adapter model."""
    import torch

    from serve.loading import load_for_chat

    out = lora_output
    ref = load_for_chat(str(out))
    quant = load_for_chat(str(out), load_4bit=bits == 4, load_8bit=bits == 8)
    assert quant.kind == "adapter" and quant.template == ref.template
    layer_types = {type(m).__name__ for m in quant.model.modules()}
    assert ("Linear4bit" if bits == 4 else "Linear8bitLt") in layer_types
    ids = torch.tensor([ref.tokenizer.encode("Hello, who are you?")])
    with torch.no_grad():
        a, b = ref.model(ids).logits, quant.model(ids).logits
    assert (a - b).abs().max() < 0.25 * a.abs().max() and not torch.equal(a, b)
    flag = f"--load-{bits}bit"
    proc = subprocess.run([sys.executable, "-m", "serve.cli", "--model-path", str(out), flag, "--style", "programmatic",
                           "--temperature", "0", "--max-new-tokens", "5"],
                          input="hi __END_OF_A_MESSAGE_47582648__\n", capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("[!OP:ASSISTANT]: ") == 1
    full = load_for_chat(tiny_llama, conv_template="chatml", load_4bit=bits == 4, load_8bit=bits == 8)
    assert full.kind == "full" and ("Linear4bit" if bits == 4 else "Linear8bitLt") in {
        type(m).__name__ for m in full.model.modules()}


def test_unavailable_device_and_conflicting_quantization_are_refused(tiny_llama):
    import torch

    proc = subprocess.run([sys.executable, "-m", "serve.cli", "--model-path", tiny_llama, "--load-4bit", "--load-8bit"],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, input="")
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr
    if not torch.backends.mps.is_available():
        proc = subprocess.run([sys.executable, "-m", "serve.cli", "--model-path", tiny_llama, "--device", "mps"],
                              capture_output=True, text=True, env=ENV, cwd=ROOT, input="")
        assert proc.returncode == 1 and "--device mps: Apple's Metal backend is not available" in proc.stderr
    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, "-m", "serve.openai_api_server", "--model-path", tiny_llama,
                               "--device", "cuda"], capture_output=True, text=True, env=ENV, cwd=ROOT, input="")
        assert proc.returncode == 1 and "--device cuda: no CUDA GPU" in proc.stderr
