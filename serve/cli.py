"""Chat with a model in the terminal (FastChat's `fastchat.serve.cli`, on chattune's outputs).

    python -m serve.cli --model-path OUT [--style simple|rich|programmatic] [--conv-template T]

Commands: !!exit, !!reset, !!remove (last exchange), !!regen (last reply), !!save FILE (ShareGPT JSON, so
a chat can be trained on), !!load FILE. Ctrl-C during a reply stops that reply only. The programmatic
style reads and writes messages terminated by ` __END_OF_A_MESSAGE_47582648__` so scripts can drive it.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

from data.formats import Row
from data.records import to_sharegpt
from data.tokenize import encode_prompt
from data.validate import ValidationOptions, normalize_row
from serve.generation import GenerationResult, SamplingParams, stream_generate
from serve.loading import LoadedModel, ServeLoadError, add_model_args, load_from_args
from serve.tool_parsing import StreamParser, prompt_opens_think

END_OF_MESSAGE = " __END_OF_A_MESSAGE_47582648__"


class SimpleIO:
    def __init__(self, multiline: bool = False):
        self.multiline = multiline

    def read(self, role: str) -> str | None:
        try:
            if not self.multiline:
                return input(f"{role}: ")
            print(f"{role} [ctrl-d on an empty line to send]: ", flush=True)
            lines = []
            while True:
                try:
                    lines.append(input())
                except EOFError:
                    break
            return "\n".join(lines) if lines else None
        except EOFError:
            return None

    def start_reply(self, role: str) -> None:
        print(f"{role}: ", end="", flush=True)

    def write(self, delta: str, reasoning: bool = False) -> None:
        if reasoning and sys.stdout.isatty():
            delta = f"\033[2m{delta}\033[0m"  # dimmed, as a thought
        print(delta, end="", flush=True)

    def end_thinking(self) -> None:
        print(flush=True)

    def end_reply(self, text: str) -> None:
        print(flush=True)

    def notice(self, text: str) -> None:
        print(f"[{text}]", flush=True)


class ProgrammaticIO(SimpleIO):
    """FastChat's programmatic style: messages end with END_OF_MESSAGE, roles are announced as `[!OP:ROLE]: `."""

    def read(self, role: str) -> str | None:
        contents = ""
        end = END_OF_MESSAGE + "\n"
        while not contents.endswith(end):
            ch = sys.stdin.read(1)
            if ch == "":  # EOF: the driving program is done
                return None
            contents += ch
        contents = contents[:-len(end)]
        print(f"[!OP:{role}]: {contents}", flush=True)
        return contents

    def start_reply(self, role: str) -> None:
        print(f"[!OP:{role}]: ", end="", flush=True)

    def end_reply(self, text: str) -> None:
        print(END_OF_MESSAGE, flush=True)


class RichIO(SimpleIO):
    """Markdown-rendered replies (rich), re-rendered live as tokens stream in; prompt_toolkit input
    (line editing, history) when stdin is a terminal."""

    def __init__(self, multiline: bool = False):
        from rich.console import Console

        super().__init__(multiline)
        self.console = Console()
        self._live = None
        self._text = self._thought = ""
        self._session = None
        if sys.stdin.isatty():  # line editing and up-arrow history, as FastChat's rich style has
            from prompt_toolkit import PromptSession
            from prompt_toolkit.history import InMemoryHistory

            self._session = PromptSession(history=InMemoryHistory())

    def read(self, role: str) -> str | None:
        try:
            if self._session is None:
                return self.console.input(f"[bold]{role}:[/] ")
            return self._session.prompt(f"{role}: ", multiline=self.multiline)
        except EOFError:
            return None

    def start_reply(self, role: str) -> None:
        from rich.live import Live
        from rich.markdown import Markdown

        self.console.print(f"[bold]{role}:[/]")
        self._text = self._thought = ""
        self._live = Live(Markdown(""), console=self.console, refresh_per_second=8)
        self._live.start()

    def write(self, delta: str, reasoning: bool = False) -> None:
        from rich.console import Group
        from rich.markdown import Markdown
        from rich.text import Text

        if reasoning:
            self._thought += delta
        else:
            self._text += delta
        parts = [Text(self._thought, style="dim italic")] if self._thought else []
        self._live.update(Group(*parts, Markdown(self._text)))

    def end_thinking(self) -> None:
        pass

    def end_reply(self, text: str) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def notice(self, text: str) -> None:
        self.console.print(f"[dim]\\[{text}][/]")


class ReplyInterrupt:
    """While a reply streams, Ctrl-C only raises a flag that the loop checks after each shown delta, so the reply
    stops at a delta boundary and what was shown is exactly what is kept (a KeyboardInterrupt could land between
    writing a delta and recording it). At the prompt, Ctrl-C keeps its usual meaning (leave the chat)."""

    def __enter__(self):
        self.hit = False
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, signum, frame) -> None:
        self.hit = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)


def trim_to_context(loaded: LoadedModel, messages: list[dict], max_new_tokens: int) -> tuple[list[int], int]:
    """Prompt ids that leave room for the reply, dropping the oldest exchanges (never the system prompt
    or the newest user turn). Returns (ids, number of messages dropped)."""
    dropped = 0
    while True:
        ids = encode_prompt(messages, loaded.tokenizer, loaded.template)
        if len(ids) + max_new_tokens <= loaded.context_length:
            return ids, dropped
        first = 1 if messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            raise ValueError(f"the message alone ({len(ids)} tokens) plus --max-new-tokens {max_new_tokens} exceeds "
                             f"the model's context of {loaded.context_length} tokens")
        del messages[first:first + 2]
        dropped += 2


def show_reply(io: SimpleIO, events, shown: list[str], thought: list[str], visible_thought: bool) -> None:
    """Write a reply's (field, text) events: reasoning dimmed (if shown at all), then the content."""
    for field, text in events:
        if field == "reasoning_content":
            thought.append(text)
            if visible_thought:
                io.write(text, reasoning=True)
            continue
        if thought and not shown and visible_thought:
            io.end_thinking()
        io.write(text)
        shown.append(text)


def chat_loop(loaded: LoadedModel, io: SimpleIO, params: SamplingParams, system: str | None, no_history: bool,
              debug: bool, hide_reasoning: bool = False) -> int:
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    roles = ("USER", "ASSISTANT")
    while True:
        try:
            text = io.read(roles[0])
        except KeyboardInterrupt:  # Ctrl-C at the prompt leaves the chat, as FastChat's does
            print(flush=True)
            return 0
        if text is None or text.strip() == "!!exit":
            return 0
        stripped = text.strip()
        if not stripped:
            continue
        if stripped == "!!reset":
            messages = messages[:1] if messages and messages[0]["role"] == "system" else []
            io.notice("conversation reset")
            continue
        if stripped == "!!remove":
            if len(messages) >= 2 and messages[-1]["role"] == "assistant":
                del messages[-2:]
                io.notice("removed the last exchange")
            else:
                io.notice("nothing to remove")
            continue
        if stripped.startswith("!!save"):
            path = stripped[len("!!save"):].strip() or "chat.json"
            with open(path, "w", encoding="utf-8") as f:
                json.dump(to_sharegpt("chat", messages), f, ensure_ascii=False, indent=2)
            io.notice(f"saved {len(messages)} messages to {path}")
            continue
        if stripped.startswith("!!load"):
            path = stripped[len("!!load"):].strip() or "chat.json"
            try:
                with open(path, encoding="utf-8") as f:
                    raw = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                io.notice(f"cannot load {path}: {e}")
                continue
            rec, problem = normalize_row(Row(path, 0, raw[0] if isinstance(raw, list) and raw else raw),
                                         ValidationOptions(flags={}))  # the chat has no data flags to suggest
            if problem:
                io.notice(f"cannot load {path}: {problem.message}")
                continue
            messages = rec["messages"]
            io.notice(f"loaded {len(messages)} messages from {path}")
            continue
        if stripped == "!!regen":
            if not messages or messages[-1]["role"] != "assistant":
                io.notice("no reply to regenerate")
                continue
            messages.pop()
        else:
            if no_history:
                messages = messages[:1] if messages and messages[0]["role"] == "system" else []
            messages.append({"role": "user", "content": text})
        try:
            ids, dropped = trim_to_context(loaded, messages, params.max_new_tokens)
        except ValueError as e:
            io.notice(str(e))
            messages.pop()
            continue
        if dropped:
            io.notice(f"context full: dropped the {dropped} oldest messages")
        if debug:
            io.notice(f"prompt: {loaded.tokenizer.decode(ids)!r}")
        result = GenerationResult()
        io.start_reply(roles[1])
        t0 = time.perf_counter()
        shown: list[str] = []  # what reached the screen: the turn kept if Ctrl-C lands mid-reply
        thought: list[str] = []  # the reply's reasoning, shown dimmed (or not: --hide-reasoning), kept in the history
        parser = StreamParser(None, None, prompt_opens_think(loaded.template, loaded.tokenizer))

        visible_thought = not hide_reasoning and not isinstance(io, ProgrammaticIO)
        with ReplyInterrupt() as interrupt:
            for delta in stream_generate(loaded.model, loaded.tokenizer, ids, params, loaded.stop_token_ids, result):
                show_reply(io, parser.feed(delta), shown, thought, visible_thought)
                if interrupt.hit:
                    break
        show_reply(io, parser.finish()[0], shown, thought, visible_thought)
        io.end_reply("".join(shown))
        if interrupt.hit:
            if not shown and not thought:  # no reply to keep; an unanswered user turn would break the turn order
                messages.pop()
                io.notice("reply interrupted before any text; your message was removed")
                continue
            io.notice("reply interrupted")
        reply = {"role": "assistant", "content": "".join(shown)}
        if "".join(thought).strip():
            reply["reasoning"] = "".join(thought)
        messages.append(reply)
        if debug:
            dt = time.perf_counter() - t0
            io.notice(f"{result.completion_tokens} tokens in {dt:.2f} s ({result.completion_tokens / max(dt, 1e-9):.1f} tok/s), "
                      f"finish={result.finish_reason}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.cli", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--conv-system-msg", help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition_penalty", "--repetition-penalty", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-history", action="store_true", help="each message is a fresh conversation")
    p.add_argument("--style", choices=["simple", "rich", "programmatic"], default="simple")
    p.add_argument("--multiline", action="store_true", help="multi-line input (simple style)")
    p.add_argument("--debug", action="store_true", help="print the rendered prompt and tokens/s")
    p.add_argument("--hide-reasoning", action="store_true",
                   help="do not show the model's reasoning (a leading <think> block; shown dimmed by default)")
    args = p.parse_args(argv)
    params = SamplingParams(args.temperature, args.top_p, args.repetition_penalty, args.max_new_tokens, args.seed)
    try:
        params.validate()
    except ValueError as e:
        p.error(str(e).replace("temperature", "--temperature").replace("top_p", "--top-p"))
    try:
        loaded = load_from_args(args)
    except (ServeLoadError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    params.stop = loaded.stop_strings
    # Ctrl-C must stop a reply even when the shell started us with SIGINT ignored (a background job of a
    # non-interactive shell), where Python would otherwise never raise KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    io = {"simple": SimpleIO, "rich": RichIO, "programmatic": ProgrammaticIO}[args.style](args.multiline)
    if args.style != "programmatic":
        print(f"[{loaded.kind} model from {loaded.source}, template {loaded.template}; !!exit to quit]", flush=True)
    return chat_loop(loaded, io, params, args.conv_system_msg, args.no_history, args.debug, args.hide_reasoning)


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(main())
