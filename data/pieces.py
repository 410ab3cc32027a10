"""The unit every template renders to: a `Piece` of text with its owning message and its kind.

Kinds say who writes the text and so whether it can carry loss (data/tokenize.py decides, from the mask):
- "template": the chat format's own text (role headers, separators, a default system prompt, a generation
  prompt, an empty think block a template inserts): never supervised (except with mask="all");
- "content": a message's text; supervised for chosen assistant turns, never for tool results;
- "eot": the end-of-turn text after an assistant reply, learned with it so the model stops;
- "reasoning" / "reasoning_tag": an assistant's reasoning and the think tags around it (--reasoning decides);
- "call" / "call_tag": the tool-call text an assistant emits — the data (function name, arguments JSON) and the
  format around it — supervised with the turn.
Data kinds ("content", "reasoning", "call") are never parsed for special tokens: a data row cannot forge a turn.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

PieceKind = Literal["template", "content", "eot", "reasoning", "reasoning_tag", "call", "call_tag"]
HEADER = -1  # message index of template text that belongs to no message (BOS, default system prompt)
PLAIN_KINDS = frozenset({"content", "reasoning", "call"})  # data text: never parsed for special tokens
OUTPUT_KINDS = frozenset({"content", "eot", "reasoning", "reasoning_tag", "call", "call_tag"})  # what a model emits


class Piece(NamedTuple):  # a NamedTuple: created ~10 times per conversation, so cheap construction matters
    text: str
    msg: int  # index into the messages list, or HEADER
    kind: PieceKind


class TemplateError(ValueError):
    """A conversation cannot be rendered with the chosen template."""
