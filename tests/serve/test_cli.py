"""serve.cli driven as a user would: programmatic style over a pipe, on models trained by train/train.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ENV, ROOT, common, run

END = " __END_OF_A_MESSAGE_47582648__"


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    out = {}
    for mode, extra in (("full", {}), ("lora", {"lora": True})):
        d = tmp_path_factory.mktemp(f"chat-{mode}")
        run("train.py", common(tiny_llama, d, max_steps=2, per_device_train_batch_size=2, save_strategy="no", **extra))
        out[mode] = d
    return out


def chat(model_dir, messages: list[str], *extra: str) -> subprocess.CompletedProcess:
    stdin = "".join(f"{m}{END}\n" for m in messages)
    return subprocess.run([sys.executable, "-m", "serve.cli", "--model-path", str(model_dir), "--style", "programmatic",
                           "--temperature", "1", "--seed", "3", "--max-new-tokens", "8", *extra],
                          input=stdin, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)


def replies(stdout: str) -> list[str]:
    """Reply texts (which may span lines): from `[!OP:ASSISTANT]: ` to the end-of-message marker."""
    parts = stdout.split("[!OP:ASSISTANT]: ")[1:]
    return [p.split(END)[0] for p in parts]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_programmatic_chat_and_commands(trained, mode, tmp_path):
    saved = tmp_path / "chat.json"
    proc = chat(trained[mode], ["Who are you?", "!!regen", "And then?", f"!!save {saved}", "!!remove", "!!reset",
                                "Who are you?", f"!!load {saved}", "!!exit", "never read"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = replies(proc.stdout)
    assert len(out) == 4  # first, regenerated, second, after reset
    assert out[0] == out[1] == out[3]  # seeded: regen and a fresh conversation give the same reply
    assert all(r.strip() for r in out)
    assert "[removed the last exchange]" in proc.stdout and "[conversation reset]" in proc.stdout
    assert f"[loaded 4 messages from {saved}]" in proc.stdout and "never read" not in proc.stdout
    record = json.loads(saved.read_text())
    assert [t["from"] for t in record["conversations"]] == ["human", "gpt", "human", "gpt"]
    assert record["conversations"][1]["value"] == out[1]
    # the saved chat is valid training data
    assert subprocess.run([sys.executable, "-m", "data.validate", str(saved)], cwd=ROOT, env=ENV).returncode == 0


@pytest.mark.slow
def test_template_comes_from_training_and_can_be_overridden(trained):
    proc = chat(trained["lora"], ["hi"], "--debug")
    assert "<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n" in proc.stdout  # chatml, from chattune.json
    proc = chat(trained["lora"], ["hi"], "--debug", "--conv-template", "vicuna_v1.1")
    assert "USER: hi ASSISTANT:" in proc.stdout


@pytest.mark.slow
def test_merged_and_unmerged_adapter_reply_identically(trained):
    plain = replies(chat(trained["lora"], ["Tell me something"]).stdout)
    merged = replies(chat(trained["lora"], ["Tell me something"], "--merge").stdout)
    assert plain == merged and len(plain) == 1


def test_bad_paths_and_values_fail_clearly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "serve.cli", "--model-path", str(tmp_path / "nope")],
                          capture_output=True, text=True, cwd=ROOT, env=ENV, input="")
    assert proc.returncode == 1 and "no such directory" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "serve.cli", "--model-path", "x", "--temperature", "5"],
                          capture_output=True, text=True, cwd=ROOT, env=ENV, input="")
    assert proc.returncode == 2 and "--temperature must be in [0, 2]" in proc.stderr


def test_plain_model_without_template_is_refused(tiny_llama, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_llama, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    for f in bare.glob("chat_template.*"):
        f.unlink()
    from serve.loading import ServeLoadError, load_for_chat

    with pytest.raises(ServeLoadError, match="pass --conv-template"):
        load_for_chat(str(bare))
    assert load_for_chat(str(bare), conv_template="chatml").template == "chatml"
