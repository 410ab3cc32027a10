"""Chat templates that render a conversation as *pieces* whose ownership is known by construction.

A template never produces one opaque string that is later searched for role words (FastChat's
`tokenization mismatch` bug). It produces a list of `Piece`s (data/pieces.py): template text, a message's
content, its reasoning, its tool-call text or its end-of-turn text. Tokenization (data/tokenize.py) turns pieces
into ids and decides supervision from the piece kinds, so which tokens carry loss follows from how the prompt was
built.

Built-ins render exactly the prompt strings FastChat 0.2.36 renders for the same names (tested against
`fastchat.conversation`), except that `llama-2`'s dangling `<s>` after the final reply is dropped.
`chatml` is Qwen-style and `llama-3` is Meta's format. `qwen2.5`, `qwen3` and `llama-3.1` (tool calls and
reasoning) render what those families' published Jinja templates render (data/agent_templates.py). `tokenizer`
uses the tokenizer's own Jinja `chat_template`, with `tools=` and reasoning fields, split into pieces by
rendering it a second time with a placeholder in place of every piece of data (data/jinja_pieces.py).
"""

from __future__ import annotations

from collections.abc import Callable

from data.pieces import HEADER, PLAIN_KINDS, Piece, PieceKind, TemplateError  # noqa: F401  (re-exported)

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


def _split_system(messages: list[dict]) -> tuple[str | None, int]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], 0
    return None, HEADER


def _colon_two(roles: tuple[str, str], sep: str, sep2: str, default_system: str):
    """FastChat ADD_COLON_TWO (vicuna_v1.1, alpaca): `SYSTEM<sep>ROLE: msg<sep|sep2>...`."""

    def render(messages: list[dict], add_generation_prompt: bool) -> list[Piece]:
        system, sys_idx = _split_system(messages)
        pieces = [Piece(system, sys_idx, "content")] if system is not None else [Piece(default_system, HEADER, "template")]
        pieces.append(Piece(sep, sys_idx, "template"))
        for i, m in enumerate(messages):
            if m["role"] == "system":
                continue
            user = m["role"] == "user"
            pieces.append(Piece(f"{roles[0] if user else roles[1]}: ", i, "template"))
            pieces.append(Piece(m["content"], i, "content"))
            pieces.append(Piece(sep if user else sep2, i, "template" if user else "eot"))
        if add_generation_prompt:
            pieces.append(Piece(f"{roles[1]}:", HEADER, "template"))
        return pieces

    return render


def _llama2_style(system_template: str, sep2_eot: str, sep2_next: str):
    """FastChat LLAMA2 style (llama-2, mistral): `[INST] <sys>u1 [/INST] a1<sep2>[INST] u2 [/INST] ...`.

    FastChat's sep2 is split in two: the end-of-turn part (` </s>` / `</s>`) is supervised with the
    reply; the part that opens the next turn (`<s>` for llama-2) is template text and is emitted only
    when another turn follows (the dangling final `<s>` is dropped, see docs/design.md §2).
    """

    def render(messages: list[dict], add_generation_prompt: bool) -> list[Piece]:
        system, sys_idx = _split_system(messages)
        if system:
            pre, post = system_template.split("{system_message}")
            pieces = [Piece(pre, sys_idx, "template"), Piece(system, sys_idx, "content"), Piece(post, sys_idx, "template")]
        else:
            pieces = [Piece("[INST] ", HEADER, "template")]
        turn = 0
        for i, m in enumerate(messages):
            if m["role"] == "system":
                continue
            if m["role"] == "user":
                if turn > 0:
                    pieces.append(Piece(sep2_next + "[INST] ", i, "template") if sep2_next else Piece("[INST] ", i, "template"))
                pieces += [Piece(m["content"], i, "content"), Piece(" ", i, "template")]
            else:
                pieces += [Piece("[/INST] ", i, "template"), Piece(m["content"], i, "content"), Piece(sep2_eot, i, "eot")]
            turn += 1
        if add_generation_prompt:
            pieces.append(Piece("[/INST]", HEADER, "template"))
        return pieces

    return render


def _zephyr(messages: list[dict], add_generation_prompt: bool) -> list[Piece]:
    """FastChat `zephyr` (CHATML style with `</s>`): `<|system|>\\nSYS</s>\\n<|user|>\\nmsg</s>\\n...`."""
    system, sys_idx = _split_system(messages)
    pieces = [Piece("<|system|>\n", sys_idx, "template")]
    if system:
        pieces.append(Piece(system, sys_idx, "content"))
    pieces.append(Piece("</s>\n", sys_idx, "template"))
    for i, m in enumerate(messages):
        if m["role"] == "system":
            continue
        pieces += [Piece(f"<|{m['role']}|>\n", i, "template"), Piece(m["content"], i, "content")]
        if m["role"] == "assistant":
            pieces += [Piece("</s>", i, "eot"), Piece("\n", i, "template")]
        else:
            pieces.append(Piece("</s>\n", i, "template"))
    if add_generation_prompt:
        pieces.append(Piece("<|assistant|>\n", HEADER, "template"))
    return pieces


def _chatml(messages: list[dict], add_generation_prompt: bool) -> list[Piece]:
    """Qwen-style ChatML: `<|im_start|>role\\ncontent<|im_end|>\\n` per message, no default system."""
    pieces = []
    for i, m in enumerate(messages):
        pieces += [Piece(f"<|im_start|>{m['role']}\n", i, "template"), Piece(m["content"], i, "content")]
        pieces.append(Piece("<|im_end|>", i, "eot" if m["role"] == "assistant" else "template"))
        pieces.append(Piece("\n", i, "template"))
    if add_generation_prompt:
        pieces.append(Piece("<|im_start|>assistant\n", HEADER, "template"))
    return pieces


def _llama3(messages: list[dict], add_generation_prompt: bool) -> list[Piece]:
    """Meta's Llama-3 format; content is stripped as Meta's reference template does."""
    pieces = [Piece("<|begin_of_text|>", HEADER, "template")]
    for i, m in enumerate(messages):
        pieces.append(Piece(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", i, "template"))
        pieces.append(Piece(m["content"].strip(), i, "content"))
        pieces.append(Piece("<|eot_id|>", i, "eot" if m["role"] == "assistant" else "template"))
    if add_generation_prompt:
        pieces.append(Piece("<|start_header_id|>assistant<|end_header_id|>\n\n", HEADER, "template"))
    return pieces


RenderFn = Callable[..., list[Piece]]  # (messages, add_generation_prompt, tools=None, thinking=None)


def _chat_only(name: str, render) -> RenderFn:
    """A 2023-style template: no tool-call format (a record with calls or results is refused, naming the
    templates that have one); reasoning is written into the reply as a leading think block."""

    def wrapped(messages: list[dict], add_generation_prompt: bool, tools=None, thinking=None) -> list[Piece]:
        if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
            raise TemplateError(f"template {name!r} has no tool-call format; use qwen2.5, qwen3, llama-3.1 or "
                                "tokenizer (the model's own template) for records with tools")
        pieces = render(messages, add_generation_prompt)
        if not any(m.get("reasoning") for m in messages):
            return pieces
        out = []
        for p in pieces:
            m = messages[p.msg] if p.kind == "content" and p.msg != HEADER else None
            out += agent_templates.inline_reasoning(m, p.msg, p.text) if m and m["role"] == "assistant" else [p]
        return out

    return wrapped


from data import agent_templates  # noqa: E402  (it builds on the piece types above)

_CHAT_TEMPLATES = {
    "vicuna_v1.1": _colon_two(("USER", "ASSISTANT"), " ", "</s>", VICUNA_SYSTEM),
    "alpaca": _colon_two(("### Instruction", "### Response"), "\n\n", "</s>", ALPACA_SYSTEM),
    "llama-2": _llama2_style("[INST] <<SYS>>\n{system_message}\n<</SYS>>\n\n", " </s>", "<s>"),
    "mistral": _llama2_style("[INST] {system_message}\n", "</s>", ""),
    "zephyr": _zephyr,
    "chatml": _chatml,
    "llama-3": _llama3,
}
BUILTIN_TEMPLATES: dict[str, RenderFn] = {
    **{name: _chat_only(name, fn) for name, fn in _CHAT_TEMPLATES.items()},
    "qwen2.5": agent_templates.qwen25,
    "qwen3": agent_templates.qwen3,
    "llama-3.1": agent_templates.llama31,
}
# Built-ins whose rendering of a conversation only ever appends to its rendering of any prefix of it, so one
# sample trains every turn in its inference context. qwen3 drops earlier turns' reasoning (data/samples.py).
PREFIX_STABLE = frozenset(BUILTIN_TEMPLATES) - {"qwen3"}

# Stop strings a generator should honour for each template (the end-of-turn text).
END_OF_TURN: dict[str, list[str]] = {
    "vicuna_v1.1": ["</s>"], "alpaca": ["</s>"], "llama-2": ["</s>"], "mistral": ["</s>"],
    "zephyr": ["</s>"], "chatml": ["<|im_end|>"], "llama-3": ["<|eot_id|>"],
    "qwen2.5": ["<|im_end|>"], "qwen3": ["<|im_end|>"], "llama-3.1": ["<|eot_id|>", "<|eom_id|>"],
}

TEMPLATE_NAMES = [*BUILTIN_TEMPLATES, "tokenizer"]


def recorded_template(requested: str | None, recorded: str | None, tokenizer, where: str, flag: str) -> str:
    """The template a trained model is used with: the flag's value, else the one training recorded (chattune.json),
    else the tokenizer's own `chat_template`; never guessed. Errors name `where` (the model) and `flag`."""
    template = requested or recorded
    if template is None:
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(f"{where}: no chattune.json and no chat_template in the tokenizer; pass {flag} "
                                f"(one of {', '.join(TEMPLATE_NAMES)})")
        template = "tokenizer"
    if template not in TEMPLATE_NAMES:
        raise TemplateError(f"{flag} {template!r} is not one of {', '.join(TEMPLATE_NAMES)}")
    return template


def render_pieces(messages: list[dict], template: str, tokenizer=None, add_generation_prompt: bool = False,
                  tools: list[dict] | None = None, thinking: bool | None = None) -> list[Piece]:
    """Render normalized messages (see data/validate.py), with the record's `tools`, into pieces. Pure function.
    `thinking`: the generation prompt's `enable_thinking` (None: the template's default)."""
    if template == "tokenizer":
        if tokenizer is None:
            raise TemplateError("template 'tokenizer' needs a tokenizer")
        from data.jinja_pieces import jinja_pieces

        return jinja_pieces(messages, tokenizer, add_generation_prompt, tools, thinking)
    try:
        render = BUILTIN_TEMPLATES[template]
    except KeyError:
        raise TemplateError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATE_NAMES)}") from None
    return [p for p in render(messages, add_generation_prompt, tools, thinking) if p.text]


def render_text(messages: list[dict], template: str, tokenizer=None, add_generation_prompt: bool = False,
                tools: list[dict] | None = None, thinking: bool | None = None) -> str:
    return "".join(p.text for p in render_pieces(messages, template, tokenizer, add_generation_prompt, tools, thinking))


# --- the same templates as Jinja, for exported tokenizers (`chat_template`) and serving -------------
# Single-line sources with `-` whitespace control everywhere, so HF's trim_blocks/lstrip_blocks
# settings cannot change them. tests/data/test_templates_tokenize.py proves each renders exactly what
# render_text renders, with and without a generation prompt.


def _jinja_system(default: str | None, pre: str = "", post: str = "", empty: str = "", skip_empty: bool = False) -> str:
    """Emit the system block and set `loop_messages` to the rest of the conversation. `skip_empty`: an empty
    system prompt renders as none (FastChat's llama-2 style tests the prompt's truth, not its presence)."""
    with_sys = "{{ " + repr(pre) + " + messages[0]['content'] + " + repr(post) + " }}"
    without = "{{ " + repr(default if default is not None else empty) + " }}"
    has = "messages[0]['role'] == 'system'" + (" and messages[0]['content']" if skip_empty else "")
    return (
        "{%- if messages[0]['role'] == 'system' -%}{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
        "{%- if " + has + " -%}" + with_sys + "{%- else -%}" + without + "{%- endif -%}"
    )


def _jinja_colon_two(roles: tuple[str, str], sep: str, sep2: str, default_system: str) -> str:
    return (
        _jinja_system(default_system) + "{{ " + repr(sep) + " }}"
        "{%- for m in loop_messages -%}{%- if m['role'] == 'user' -%}"
        "{{ " + repr(roles[0] + ": ") + " + m['content'] + " + repr(sep) + " }}"
        "{%- else -%}{{ " + repr(roles[1] + ": ") + " + m['content'] + " + repr(sep2) + " }}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ " + repr(roles[1] + ":") + " }}{%- endif -%}"
    )


def _jinja_llama2_style(pre: str, post: str, sep2_eot: str, sep2_next: str) -> str:
    return (
        _jinja_system(None, pre, post, "[INST] ", skip_empty=True)
        + "{%- for m in loop_messages -%}{%- if m['role'] == 'user' -%}"
        "{%- if not loop.first -%}{{ " + repr(sep2_next + "[INST] ") + " }}{%- endif -%}{{ m['content'] + ' ' }}"
        "{%- else -%}{{ '[/INST] ' + m['content'] + " + repr(sep2_eot) + " }}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '[/INST]' }}{%- endif -%}"
    )


JINJA_TEMPLATES: dict[str, str] = {
    "vicuna_v1.1": _jinja_colon_two(("USER", "ASSISTANT"), " ", "</s>", VICUNA_SYSTEM),
    "alpaca": _jinja_colon_two(("### Instruction", "### Response"), "\n\n", "</s>", ALPACA_SYSTEM),
    "llama-2": _jinja_llama2_style("[INST] <<SYS>>\n", "\n<</SYS>>\n\n", " </s>", "<s>"),
    "mistral": _jinja_llama2_style("[INST] ", "\n", "</s>", ""),
    "zephyr": (
        "{{ '<|system|>\\n' }}" + _jinja_system(None, "", "", "") + "{{ '</s>\\n' }}"
        "{%- for m in loop_messages -%}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '</s>\\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
    ),
    "chatml": (
        "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    ),
    "llama-3": (
        "{{ '<|begin_of_text|>' }}{%- for m in messages -%}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
    ),
}


JINJA_TEMPLATES.update({"qwen2.5": agent_templates.JINJA_QWEN25, "qwen3": agent_templates.JINJA_QWEN3,
                        "llama-3.1": agent_templates.JINJA_LLAMA31})
# 2023-style templates use only plain Jinja; these three use what the published templates they mirror use
# (tojson, namespace, string methods), which llama.cpp's and vLLM's Jinja implement too
AGENT_JINJA = frozenset({"qwen2.5", "qwen3", "llama-3.1"})


def jinja_chat_template(template: str, tokenizer=None) -> str:
    """The Jinja `chat_template` equivalent of a template name (the tokenizer's own for 'tokenizer')."""
    if template == "tokenizer":
        if tokenizer is None or not tokenizer.chat_template:
            raise TemplateError("template 'tokenizer' needs a tokenizer with a chat_template")
        return tokenizer.chat_template
    if template not in JINJA_TEMPLATES:
        raise TemplateError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATE_NAMES)}")
    return JINJA_TEMPLATES[template]
