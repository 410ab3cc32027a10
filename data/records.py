"""What the data tools in scripts/ share: read records keeping their location, write them, convert
between formats, show progress, and account for every record (kept, fixed, dropped with a reason).

Records stay as the user wrote them (a tool never rewrites fields it does not own); `valid_conversations`
gives the normalized view (data.validate) when a tool needs roles and text.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from data.formats import Row, read_rows
from data.progress import progress_disabled
from data.validate import ValidationOptions, normalize_row


class ToolError(ValueError):
    """Bad input for a tool; the message names the file, record and problem."""


def read_records(paths) -> list[Row]:
    """Every row of the input files; a row that cannot be parsed stops the tool, naming file and line."""
    try:
        rows = list(progress(read_rows(paths), "reading"))
    except (OSError, ValueError) as e:
        raise ToolError(str(e)) from None
    for row in rows:
        if row.error:
            raise ToolError(f"{row.path}:{row.loc}: {row.error}")
        if not isinstance(row.value, dict):
            raise ToolError(f"{row.path}:{row.loc}: expected a JSON object, got {type(row.value).__name__}")
    return rows


def write_records(records: Iterable[dict], path: str) -> int:
    """`.jsonl`: one record per line; `.json`: an indented array (FastChat's files). Atomic."""
    records = list(records)
    if not path.endswith((".json", ".jsonl")):
        raise ToolError(f"{path}: output must end in .json or .jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        else:
            json.dump(records, f, ensure_ascii=False, indent=2)
    os.replace(tmp, path)
    return len(records)


def record_id(row: Row) -> str:
    rid = row.value.get("id")
    return str(rid) if rid is not None else f"{os.path.basename(row.path)}:{row.loc}"


def valid_records(rows: list[Row], tally: Tally, opts: ValidationOptions | None = None) -> list[tuple[Row, dict]]:
    """(row, normalized record {"id", "messages", "tools"?}) for the rows that pass training's validation (any
    supported format); the others are dropped as `invalid (RULE)`, the first of each rule reported with its message.
    Without `opts`, the tool has no validation flags: messages name the option, never another command's flag."""
    opts = opts if opts is not None else ValidationOptions(flags={})
    out = []
    for row in progress(rows, "validating"):
        rec, problem = normalize_row(row, opts)
        if problem:
            tally.drop(f"invalid ({problem.rule})", f"{where(row)}: {problem.message}")
        else:
            out.append((row, rec))
    return out


def valid_conversations(rows: list[Row], tally: Tally, opts: ValidationOptions | None = None) -> list[tuple[Row, list[dict]]]:
    """(row, normalized messages): `valid_records` for tools that need only roles and text."""
    return [(row, rec["messages"]) for row, rec in valid_records(rows, tally, opts)]


def load_tool_tokenizer(source: str):
    """The tokenizer named by --tokenizer; a bad name is a ToolError naming the flag."""
    from data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(source)
    except (OSError, ValueError) as e:
        raise ToolError(f"--tokenizer {source}: {e}") from None


TEMPLATE_HELP = "chat template (default: the tokenizer's own chat_template, as FastChat's tools assume)"


def resolve_tool_template(template: str | None, tokenizer, tokenizer_source: str) -> str:
    """--template, or the tokenizer's own chat template when it has one; says which one is used."""
    from data.templates import TEMPLATE_NAMES

    if template is None:
        if not getattr(tokenizer, "chat_template", None):
            raise ToolError(f"--template: the tokenizer {tokenizer_source} has no chat_template of its own; pass "
                            f"--template (one of {', '.join(TEMPLATE_NAMES)})")
        template = "tokenizer"
    where = "the tokenizer's own chat_template" if template == "tokenizer" else f"the built-in {template!r}"
    print(f"[template] {template} ({where})", file=sys.stderr, flush=True)
    return template


def batches(items: list, size: int, desc: str) -> Iterator[list]:
    """Consecutive chunks of `size` items, with a progress bar counting chunks."""
    return progress((items[i:i + size] for i in range(0, len(items), size)), desc, total=(len(items) + size - 1) // size)


def reply_text(m: dict) -> str:
    """An assistant reply with its reasoning written inline, the form ShareGPT files carry it in."""
    return (f"<think>\n{m['reasoning']}\n</think>\n\n" if m.get("reasoning") else "") + m["content"]


def to_sharegpt(rid: str, messages: list[dict], tools: list[dict] | None = None) -> dict:
    """ShareGPT, with LLaMA-Factory's tool turns: an assistant's calls as a `function_call` turn (one call object,
    or a list for parallel calls), their results as one `observation` turn (a JSON list for several), the
    functions as a `tools` JSON string; reasoning inline as a leading think block."""
    rec: dict = {"id": rid, "conversations": []}
    turns = rec["conversations"]
    for k, m in enumerate(messages):
        flag = {"train": m["train"]} if "train" in m else {}
        if m["role"] == "system":
            rec["system"] = m["content"]
        elif m["role"] == "user":
            turns.append({"from": "human", "value": m["content"], **flag})
        elif m["role"] == "assistant":
            if reply_text(m) or not m.get("tool_calls"):
                turns.append({"from": "gpt", "value": reply_text(m), **flag})
            if m.get("tool_calls"):
                calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in m["tool_calls"]]
                turns.append({"from": "function_call", "value": json.dumps(calls[0] if len(calls) == 1 else calls,
                                                                           ensure_ascii=False), **flag})
        elif k == 0 or messages[k - 1]["role"] != "tool":  # consecutive results share one observation, in the
            n = next((j for j, x in enumerate(messages[k:]) if x["role"] != "tool"), len(messages) - k)  # calls' order
            calls = [c["id"] for c in (messages[k - 1].get("tool_calls") or [])] if k else []
            run = sorted(messages[k:k + n], key=lambda x: calls.index(x["tool_call_id"])
                         if x.get("tool_call_id") in calls else len(calls))
            run = [x["content"] for x in run]
            turns.append({"from": "observation", "value": run[0] if n == 1 else json.dumps(run, ensure_ascii=False)})
    if tools:
        rec["tools"] = json.dumps(tools, ensure_ascii=False)
    return rec


def to_openai(rid: str, messages: list[dict], tools: list[dict] | None = None) -> dict:
    """OpenAI chat format: `tool_calls` with JSON-string arguments, `tool` messages, `reasoning_content`."""
    out = []
    for m in messages:
        d = {k: v for k, v in m.items() if k not in ("reasoning", "tool_calls")}
        if m.get("reasoning"):
            d["reasoning_content"] = m["reasoning"]
        if m.get("tool_calls"):
            d["tool_calls"] = [{"id": c["id"], "type": "function", "function": {
                "name": c["function"]["name"], "arguments": json.dumps(c["function"]["arguments"], ensure_ascii=False)}}
                for c in m["tool_calls"]]
        out.append(d)
    return {"id": rid, "messages": out, **({"tools": tools} if tools else {})}


def conversation_text(messages: list[dict], roles: tuple[str, ...] = ("user", "assistant")) -> str:
    return "\n".join(m["content"] for m in messages if m["role"] in roles)


def progress(items, desc: str, total: int | None = None) -> Iterator:
    from tqdm import tqdm

    return iter(tqdm(items, desc=desc, total=total, file=sys.stderr, disable=progress_disabled()))


@dataclass
class Tally:
    """Per tool run: records read, kept, dropped (by reason, with examples) and fixed (by kind)."""

    tool: str
    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    fixed: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def drop(self, reason: str, where: str) -> None:
        self.dropped[reason] += 1
        self.examples.setdefault(reason, where)

    def summary(self) -> dict:
        return {"tool": self.tool, "read": self.read, "kept": self.kept, "dropped": dict(self.dropped),
                "fixed": dict(self.fixed), "first_dropped": self.examples}

    def report(self, out_path: str | None = None, report_file: str | None = None) -> None:
        lines = [f"[{self.tool}] read {self.read}, kept {self.kept}, dropped {sum(self.dropped.values())}"
                 + (f" → {out_path}" if out_path else "")]
        for reason, n in self.dropped.most_common():
            lines.append(f"  dropped {n} × {reason} (first: {self.examples[reason]})")
        for what, n in self.fixed.most_common():
            lines.append(f"  fixed {n} × {what}")
        print("\n".join(lines), flush=True)
        if report_file:
            with open(report_file, "w", encoding="utf-8") as f:
                json.dump(self.summary(), f, indent=2)


def where(row: Row) -> str:
    return f"{row.path}:{row.loc} ({record_id(row)})"


def add_io_args(p, out: bool = True) -> None:
    p.add_argument("--in-file", "--in", dest="in_file", nargs="+", required=True,
                   help="input .json/.jsonl/.parquet files, directories or globs")
    if out:
        p.add_argument("--out-file", "--out", dest="out_file", required=True, help="output .json or .jsonl")
    p.add_argument("--report", help="also write the kept/dropped summary as JSON here")


def run_tool(main_fn) -> int:
    """Entry-point wrapper: a ToolError is a one-line message and exit status 1, never a traceback."""
    try:
        return main_fn() or 0
    except ToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
