"""Ollama export: the generated Go TEMPLATE renders training's prompt text and ids; the Modelfile reads back as
written; the Go template renderer follows Go's semantics and refuses what it does not implement.

Expected renderer outputs and Modelfile readings below were produced by Go's own text/template (Go 1.19) and by
Ollama's parser/parser.go, run on the same inputs.
"""

from __future__ import annotations

import copy
import random
import zlib

import pytest
from helpers import random_conversation

from data.gotemplate import GoTemplateError, ollama_data, parse, render
from data.ollama import (
    ModelfileError,
    modelfile,
    ollama_template,
    parse_modelfile,
    stop_strings,
    write_modelfile,
)
from data.pieces import TemplateError
from data.templates import VICUNA_SYSTEM, jinja_chat_template, render_text
from data.tokenize import encode_prompt
from data.tokenizer import run_encoder

# Each built-in chat template with the real tokenizer of its family (Llama-2 SentencePiece for the FastChat ones,
# Llama-3 BPE for llama-3, SmolLM2 for chatml and its own Jinja template), and one cross pairing.
PAIRS = [("vicuna_v1.1", "llama-spm"), ("alpaca", "llama-spm"), ("llama-2", "llama-spm"), ("mistral", "llama-spm"),
         ("zephyr", "llama-spm"), ("chatml", "smollm2"), ("llama-3", "llama-bpe"), ("tokenizer", "smollm2"),
         ("vicuna_v1.1", "llama-bpe")]
HARD = [  # contents that trip up quoting, trimming and stripping
    'He said "hi" and {{ .Content }} and `ticks` and \\n', "  leading and trailing  ", "\n\nnewlines\n\nfirst\n",
    "\u3000wide\u00a0spaces\u2028", "tabs\tand\r\nwindows", "", "ünïcødé 日本語 🙂",
]


def conversations(seed: str) -> list[list[dict]]:
    """Generated conversations (system prompt or none, 1-4 turns, tricky contents), each cut to end in a user turn
    (a generation prompt) and also kept whole (ending in a reply), plus hand-picked hard cases."""
    rng = random.Random(zlib.crc32(seed.encode()))
    out = []
    for k in range(12):
        msgs = random_conversation(rng, system=k % 2 == 0)
        out += [msgs[:-1], msgs]
    for k, text in enumerate(HARD):
        out.append([{"role": "system", "content": text}, {"role": "user", "content": HARD[k - 1]},
                    {"role": "assistant", "content": text}, {"role": "user", "content": HARD[k - 2]}])
    out.append([{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}])
    return out


def runtime_text(rendered: str, tok) -> str:
    """The text the runtime tokenizes: the rendered prompt after the BOS it prepends itself."""
    enc = run_encoder(tok)
    return enc.prefix_text + rendered if enc.prefix_ids else rendered


def training_text(msgs: list[dict], template: str, tok) -> str:
    text = render_text(msgs, template, tok, add_generation_prompt=True)
    enc = run_encoder(tok)
    return text if not enc.prefix_ids or text.startswith(enc.prefix_text) else enc.prefix_text + text


@pytest.mark.parametrize("template,asset", PAIRS, ids=[f"{t}-{a}" for t, a in PAIRS])
def test_template_renders_training_prompt_and_ids(template, asset, tokenizers):
    tok = tokenizers[asset]
    go = parse(ollama_template(template, tok))
    enc = run_encoder(tok)
    for msgs in conversations(f"{template}-{asset}"):
        rendered = go.render(ollama_data(msgs))
        assert runtime_text(rendered, tok) == training_text(msgs, template, tok), msgs
        # the runtime's ids: its own BOS, then the rendered text with its special tokens
        assert tok(rendered, add_special_tokens=True).input_ids == encode_prompt(msgs, tok, template), msgs
        if enc.prefix_ids:  # the BOS is never doubled
            assert not rendered.startswith(enc.prefix_text)


def test_bos_text_is_left_to_a_runtime_that_adds_it(tokenizers):
    """The TEMPLATE leaves out the BOS the runtime prepends (a Llama-3 tokenizer that adds <|begin_of_text|>), keeps
    it where the runtime does not add it, and never writes one training's text lacks (Llama-2's <s>)."""
    from tokenizers import processors

    msgs = [{"role": "user", "content": "Hi"}]
    plain = tokenizers["llama-bpe"]
    assert not run_encoder(plain).prefix_ids
    assert parse(ollama_template("llama-3", plain)).render(ollama_data(msgs)).startswith("<|begin_of_text|><|start")
    tok = copy.deepcopy(plain)
    tok.__dict__.pop("_chattune_run_encoder", None)
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)])
    assert run_encoder(tok).prefix_ids == [bos]
    rendered = parse(ollama_template("llama-3", tok)).render(ollama_data(msgs))
    assert rendered.startswith("<|start_header_id|>user")
    assert tok(rendered).input_ids == encode_prompt(msgs, tok, "llama-3") and tok(rendered).input_ids.count(bos) == 1
    spm = tokenizers["llama-spm"]
    assert parse(ollama_template("llama-2", spm)).render(ollama_data(msgs)) == "[INST] Hi [/INST]"


def test_modelfile_system_is_inserted_as_ollama_does(tokenizers):
    """A Modelfile SYSTEM becomes the first message of a chat that has none; the template's own default system
    prompt (vicuna's) is used only when neither gives one."""
    tok = tokenizers["llama-spm"]
    go = parse(ollama_template("vicuna_v1.1", tok))
    chat = [{"role": "user", "content": "Hi"}]
    assert go.render(ollama_data(chat)) == f"{VICUNA_SYSTEM} USER: Hi ASSISTANT:"
    assert go.render(ollama_data(chat, system="Be brief.")) == "Be brief. USER: Hi ASSISTANT:"
    own = [{"role": "system", "content": "Mine."}, *chat]
    assert go.render(ollama_data(own, system="Be brief.")) == "Mine. USER: Hi ASSISTANT:"
    assert go.render(ollama_data(chat, system="")) == f"{VICUNA_SYSTEM} USER: Hi ASSISTANT:"


def test_ollama_collates_consecutive_turns_as_merge_consecutive_does(tokenizers):
    tok = tokenizers["smollm2"]
    go = parse(ollama_template("chatml", tok))
    data = ollama_data([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert [m["Content"] for m in data["Messages"]] == ["a\n\nb"]
    merged = [{"role": "user", "content": "a\n\nb"}]  # what --merge_consecutive trains on
    assert go.render(data) == render_text(merged, "chatml", tok, add_generation_prompt=True)


@pytest.mark.parametrize("template,asset", [("qwen2.5", "qwen2"), ("qwen3", "qwen2"), ("llama-3.1", "llama-bpe")])
def test_tool_and_reasoning_templates_are_refused(template, asset, tokenizers):
    with pytest.raises(TemplateError) as err:
        ollama_template(template, tokenizers[asset])
    message = str(err.value)
    assert "\n" not in message and repr(template) in message and "tool" in message


def test_tokenizer_templates_that_do_not_fit_are_refused(tokenizers):
    tok = tokenizers["llama-spm"]
    saved = tok.chat_template
    try:
        # the text after a message depends on whether it is the last one, not only on the roles
        tok.chat_template = ("{% for m in messages %}{{ m['role'] }}{% if loop.last %}!{% endif %}: {{ m['content'] }}"
                             "\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
        with pytest.raises(TemplateError, match="depends on more than their two roles"):
            ollama_template("tokenizer", tok)
        # the text equals training's, but the runtime's tokens would not: after its own BOS, SentencePiece puts a
        # word-boundary space that training (which had BOS in the text) did not
        tok.chat_template = "{{ bos_token }}" + jinja_chat_template("mistral")
        with pytest.raises(TemplateError, match="tokenize .* differently"):
            ollama_template("tokenizer", tok)
        tok.chat_template = jinja_chat_template("mistral")  # the same template without BOS text is fine
        assert ollama_template("tokenizer", tok) == ollama_template("mistral", tok)
    finally:
        tok.chat_template = saved


def test_a_template_that_renders_wrong_is_never_returned(tokenizers, monkeypatch):
    import data.ollama as ollama

    real = ollama._go_template
    monkeypatch.setattr(ollama, "_go_template", lambda shape: real(shape).replace('" ASSISTANT:"', '" ASSISTANT: "'))
    with pytest.raises(TemplateError, match="renders .* where training renders"):
        ollama_template("vicuna_v1.1", tokenizers["llama-spm"])


@pytest.mark.parametrize("template,asset,stops", [
    ("chatml", "smollm2", ["<|im_end|>"]), ("llama-3", "llama-bpe", ["<|eot_id|>", "<|end_of_text|>"]),
    ("llama-2", "llama-spm", ["</s>"]), ("vicuna_v1.1", "llama-bpe", ["</s>", "<|end_of_text|>"]),
    ("tokenizer", "qwen2", ["<|im_end|>", "<|endoftext|>"]),
])
def test_stop_strings(template, asset, stops, tokenizers):
    assert stop_strings(template, tokenizers[asset]) == stops


def test_modelfile_text(tokenizers):
    tok = tokenizers["smollm2"]
    system = 'Answer "briefly".\nNever write """ mid-line.'
    text = modelfile("model.gguf", "chatml", tok, system=system)
    lines = text.splitlines()
    assert lines[1] == "FROM ./model.gguf"
    assert lines[2].startswith('TEMPLATE """{{- $prev := "" }}')
    assert 'PARAMETER stop "<|im_end|>"' in lines
    assert text.endswith(f'SYSTEM """{system}"""\n')
    assert parse_modelfile(text) == [("model", "./model.gguf"), ("template", ollama_template("chatml", tok)),
                                     ("stop", "<|im_end|>"), ("system", system)]
    assert "SYSTEM" not in modelfile("/abs/m.gguf", "chatml", tok) and "SYSTEM" not in modelfile("m", "chatml", tok, "")
    assert parse_modelfile(modelfile("/abs/with space.gguf", "chatml", tok))[0] == ("model", "/abs/with space.gguf")


@pytest.mark.parametrize("system,problem", [
    ('say """\nhi', "cannot be quoted"),  # a line ending in triple quotes ends a triple-quoted value; a
    ('a"""\nb', "cannot be quoted"),  # line ending in a quote ends a double-quoted one
    ("bell \x07 and \u2028", r"drops: U\+0007, U\+2028"),  # dropped by the parser
])
def test_modelfile_refuses_what_ollama_would_misread(system, problem, tokenizers):
    with pytest.raises(ModelfileError, match=problem):
        modelfile("m.gguf", "chatml", tokenizers["smollm2"], system=system)


def test_write_modelfile(tmp_path, tokenizers):
    tok = tokenizers["smollm2"]
    gguf = tmp_path / "out" / "model-q8_0.gguf"
    path = write_modelfile(tmp_path / "out", gguf, "chatml", tok, system="Hi.")
    assert path == tmp_path / "out" / "Modelfile"
    assert parse_modelfile(path.read_text())[0] == ("model", "./model-q8_0.gguf")
    elsewhere = write_modelfile(tmp_path / "other", gguf, "chatml", tok)
    assert parse_modelfile(elsewhere.read_text())[0] == ("model", str(gguf.resolve()))


# Readings by Ollama's parser/parser.go of the same files (None: it refuses the file).
MODELFILES = [
    ('FROM ./m.gguf\nSYSTEM """a\n"b"\n"""\n', [("model", "./m.gguf"), ("system", 'a\n"b"\n')]),
    ('FROM ./m.gguf\nSYSTEM """a"""\nb"""\n', None),  # the value ended at the first line ending in quotes
    ('FROM ./m.gguf\nPARAMETER stop "a"b"\nPARAMETER stop  <x> \n', [("model", "./m.gguf"), ("stop", 'a"b'),
                                                                      ("stop", "<x>")]),
    ('FROM ./m.gguf\nSYSTEM "x\x07y"\n', [("model", "./m.gguf"), ("system", "xy")]),
    ('FROM ./m.gguf\nSYSTEM "a"\nb"\n', None),
    ("SYSTEM x\n", None),
    ('# c\nfrom  /a b.gguf \nTEMPLATE """{{ .Content }}"""', [("model", "/a b.gguf"), ("template", "{{ .Content }}")]),
]


@pytest.mark.parametrize("text,commands", MODELFILES)
def test_parse_modelfile_reads_as_ollama_does(text, commands):
    if commands is None:
        with pytest.raises(ModelfileError):
            parse_modelfile(text)
    else:
        assert parse_modelfile(text) == commands


# --- the Go template renderer ---------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "S"}, {"role": "user", "content": " u\n"},
            {"role": "assistant", "content": "a"}, {"role": "user", "content": "hé"}]
GO_OUTPUTS = [  # (template, what Go's text/template renders with MESSAGES and System "SYS")
    ("{{- range $i, $_ := .Messages }}[{{ $i }}:{{ .Role }}]{{ end }}", "[0:system][1:user][2:assistant][3:user]"),
    ('a  {{- "b" -}}  c\n{{- " d" }} {{ 3 }}', "abc d 3"),
    ('{{ $p := "" }}{{ range .Messages }}{{ if eq $p "" }}A{{ else if eq $p "user" }}B{{ else }}C{{ end }}'
     "{{ $p = .Role }}{{ end }}{{ $p }}", "ACBCuser"),
    ("{{ range $i, $m := .Messages }}{{ if eq (len (slice $.Messages $i)) 1 }}last:{{ $m.Content }}{{ end }}{{ end }}",
     "last:hé"),
    ('{{ $x := "a" }}{{ if true }}{{ $x := "b" }}{{ $x }}{{ end }}{{ $x }}{{ if true }}{{ $x = "c" }}{{ end }}{{ $x }}',
     "bac"),
    ('{{ range .Messages }}{{ if eq .Role "assistant" }}{{ break }}{{ end }}{{ if eq .Role "system" }}{{ continue }}'
     "{{ end }}{{ .Role }}{{ end }}", "user"),
    ('{{ $c := (index .Messages 3).Content }}{{ len $c }} {{ index $c 1 }} {{ slice $c 0 1 }} {{ eq (slice $c 1) "é" }}',
     "3 195 h true"),
    ('{{ and 1 0 }} {{ or 0 "" }} {{ and "a" "b" }} {{ or "" "x" }} {{ not "" }} {{ and 0 (index .Messages 9) }}',
     "0  b x true 0"),
    ('{{ "a\\tb\\x41\\u00e9\\101\\"" }}{{ `raw\\n` }}', 'a\tbAéA"raw\\n'),
    ('{{ .Missing }}|{{ .System }}|{{ eq "a" "b" "a" }} {{ ne 1 2 }} {{ lt 1 2 }} {{ ge "b" "a" }}',
     "<no value>|SYS|true true true true"),
    ('{{ range .Tools }}x{{ else }}none{{ end }}{{ define "t" }}<{{ . }}>{{ end }}{{ template "t" .System }}',
     "none<SYS>"),
    ("{{ (index .Messages 0).Role | len }}", "6"),
    ("{{ range $k := 3 }}{{ $k }}{{ end }}", "012"),  # range over an int: Go 1.24
]


@pytest.mark.parametrize("source,output", GO_OUTPUTS)
def test_renderer_matches_go(source, output):
    data = ollama_data(MESSAGES)
    data["System"] = "SYS"
    assert render(source, data) == output


@pytest.mark.parametrize("source,problem", [
    ("{{ with .System }}x{{ end }}", "outside the supported subset"),
    ('{{ printf "%s" .System }}', "'printf' is outside the supported subset"),
    ("{{ .System | json }}", "'json' is outside the supported subset"),
    ("{{/* note */}}", "comments"),
    ("{{ 1.5 }}", "unsupported syntax"),
    ("{{ if .System }}x", "unclosed"),
    ("{{ .System ", "unclosed action"),
    ("{{ break }}", "outside a range"),
    ("{{ end }}", "unexpected"),
    ('{{ eq .System 1 }}', "incompatible types"),
    ("{{ (index .Messages 0).Nope }}", "can't evaluate field Nope"),
    ("{{ index .Messages 7 }}", "out of range"),
    ('{{ slice "ab" 1 3 }}', "out of range"),
    ("{{ range .System }}{{ end }}", "can't iterate"),
    ("{{ .Messages }}", "printing a slice"),
    ('{{ template "nope" }}', "no such template"),
])
def test_renderer_refuses_what_it_does_not_implement_or_go_rejects(source, problem):
    with pytest.raises(GoTemplateError, match=problem):
        render(source, ollama_data(MESSAGES))


def test_ollama_data_shape():
    data = ollama_data([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], system="S")
    assert [(m["Role"], m["Content"]) for m in data["Messages"]] == [("system", "S"), ("user", "a"), ("assistant", "b")]
    assert data["System"] == "S" and data["Tools"] is None and data["Response"] == ""
    two = ollama_data([{"role": "system", "content": "x"}, {"role": "system", "content": "y"}])
    assert data["Messages"][0].keys() >= {"Thinking", "ToolCalls"} and two["System"] == "x\n\ny"
    assert [m["Content"] for m in two["Messages"]] == ["x\n\ny"]
