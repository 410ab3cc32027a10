"""Validate and normalize ShareGPT / OpenAI `messages` / Alpaca records to one message format.

    python -m data.validate PATH...   # exit 0 if clean, else 1 and `PATH:LINE: problem (record id)` lines

Normalized record (docs/design.md §2): {"id", "messages": [{"role": system|user|assistant|tool, "content", "train"?}],
"tools"?} with an optional leading system message followed by user/assistant turns that alternate, starting with
the user and containing at least one assistant reply; an assistant turn may carry `tool_calls` and `reasoning`,
answered by `tool` messages (data/toolcalls.py). Each rule broken is reported with the file,
line (jsonl) or index (json/parquet), record id and the rule; nothing is dropped silently.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from data.flags import check_flags, flag_name, suggest, training_flags
from data.formats import Row, parse_source, read_rows
from data.toolcalls import (
    Bad,
    check_tool_flow,
    parse_tool_calls,
    parse_tools,
    reject_unknown,
    sharegpt_calls,
    split_inline_think,
)

ROLE_ALIASES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
    "system": "system",
    "function_call": "function_call", "observation": "tool", "tool": "tool",  # LLaMA-Factory's tool turns
}
SHAREGPT_TURN_KEYS = {"from", "value", "train"}
OPENAI_MESSAGE_KEYS = {"role", "content", "train", "name", "tool_calls", "tool_call_id", "reasoning_content",
                       "reasoning", "function_call"}
REASONING_KEYS = ("reasoning_content", "reasoning")
ON_BAD_RECORD = ("error", "skip")


@dataclass(frozen=True)
class Problem:
    path: str
    loc: int
    record_id: str | None
    rule: str
    message: str

    def __str__(self) -> str:
        rid = f" ({self.record_id})" if self.record_id is not None else ""
        return f"{self.path}:{self.loc}: {self.message}{rid}"


class DataError(ValueError):
    def __init__(self, problems: list[Problem], limit: int = 50, header: str | None = None):
        self.problems = problems
        if header is not None:  # one line: the summary names the problem and its first instance
            super().__init__(header)
            return
        lines = [str(p) for p in problems[:limit]]
        if len(problems) > limit:
            lines.append(f"... and {len(problems) - limit} more")
        super().__init__(f"{len(problems)} bad record(s):\n" + "\n".join(lines))


@dataclass
class ValidationOptions:
    merge_consecutive: bool = False  # join two consecutive same-role turns with a blank line
    drop_leading_assistant: bool = False  # drop assistant turns before the first user turn (FastChat does)
    expect_format: str | None = None  # sharegpt | openai | alpaca: records of another format are invalid
    allow_undeclared_tools: bool = False  # accept calls to functions the record's `tools` does not declare
    # how the calling entry point spells each option in messages (data/flags.py); default: training's flags
    flags: dict[str, str] = field(default_factory=training_flags)

    def __post_init__(self):
        check_flags(self.flags)


@dataclass
class LoadReport:
    """What happened to every row read: kept, fixed (and how), or skipped (and why)."""

    rows: int = 0
    kept: int = 0
    skipped: list[Problem] = field(default_factory=list)
    fixes: Counter = field(default_factory=Counter)

    def first_by_rule(self) -> dict[str, Problem]:
        first: dict[str, Problem] = {}
        for p in self.skipped:
            first.setdefault(p.rule, p)
        return first

    def summary(self) -> dict:
        return {
            "rows": self.rows, "kept": self.kept, "skipped": len(self.skipped),
            "skipped_by_rule": dict(Counter(p.rule for p in self.skipped)),
            "first_skipped_by_rule": {rule: str(p) for rule, p in self.first_by_rule().items()},
            "fixes": dict(self.fixes),
            "skipped_records": [
                {"path": p.path, "loc": p.loc, "id": p.record_id, "rule": p.rule, "message": p.message} for p in self.skipped
            ],
        }


_Bad = Bad  # one exception type for every rule (data/toolcalls.py raises it too)


def _content(value, where: str) -> str:
    if not isinstance(value, str):
        raise _Bad("bad-content", f"{where}: content must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _Bad("bad-content", f"{where}: content is empty")
    return value


def _train_flag(turn: dict, where: str):
    flag = turn.get("train")
    if flag is not None and not isinstance(flag, bool):
        raise _Bad("bad-field", f"{where}: 'train' must be true or false, got {flag!r}")
    return flag


def _messages_from_sharegpt(rec: dict) -> list[dict]:
    turns = rec["conversations"]
    if not isinstance(turns, list):
        raise _Bad("bad-field", f"'conversations' must be a list, got {type(turns).__name__}")
    out = []
    system = rec.get("system")
    if system is not None and not (isinstance(system, str) and system == ""):
        out.append({"role": "system", "content": _content(system, "'system'")})
    pending: list[dict] = []  # function_call turns' calls not yet answered by an observation
    for i, turn in enumerate(turns):
        where = f"turn {i}"
        if not isinstance(turn, dict):
            raise _Bad("not-object", f"{where}: must be an object, got {type(turn).__name__}")
        missing = [k for k in ("from", "value") if k not in turn]
        if missing:
            raise _Bad("missing-field", f"{where}: missing {', '.join(repr(k) for k in missing)}")
        reject_unknown(turn, SHAREGPT_TURN_KEYS, where)
        role = ROLE_ALIASES.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            raise _Bad("unknown-role", f"{where}: unknown role {turn['from']!r} (expected one of {', '.join(ROLE_ALIASES)})")
        value = _content(turn["value"], where)
        flag = _train_flag(turn, where)
        if role == "function_call":  # the assistant's calls: appended to its reply just before, if any
            calls = sharegpt_calls(value, where, f"call_{i}")
            if out and out[-1]["role"] == "assistant" and "tool_calls" not in out[-1] and flag == out[-1].get("train"):
                out[-1]["tool_calls"] = calls
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": calls, **({"train": flag} if flag is not None else {})})
            pending = list(calls)
            continue
        if role == "tool":
            if flag is not None:
                raise _Bad("bad-field", f"{where}: a tool result is never trained on; remove 'train'")
            out += _observation(value, pending, where)
            pending = []
            continue
        msg = _assistant(value, where) if role == "assistant" else {"role": role, "content": value}
        if flag is not None:
            msg["train"] = flag
        out.append(msg)
    if rec.get("tools") is not None:
        rec["_tools"] = parse_tools(rec["tools"])
    return out


def _observation(value: str, pending: list[dict], where: str) -> list[dict]:
    """An observation answers the function_call turn before it; for parallel calls, a JSON list of as many
    results gives one tool message each."""
    if len(pending) > 1:
        try:
            parts = json.loads(value)
        except json.JSONDecodeError:
            parts = None
        if isinstance(parts, list) and len(parts) == len(pending):
            return [{"role": "tool", "content": p if isinstance(p, str) else json.dumps(p, ensure_ascii=False),
                     "tool_call_id": c["id"]} for p, c in zip(parts, pending)]
    msg = {"role": "tool", "content": value}
    if pending:
        msg["tool_call_id"] = pending[0]["id"]
    return [msg]


def _assistant(content: str, where: str, reasoning=None) -> dict:
    """An assistant message; reasoning from a field, or inline as a leading `<think>…</think>`."""
    inline, rest = split_inline_think(content)
    if inline is not None or rest != content:
        if reasoning is not None:
            raise _Bad("bad-reasoning", f"{where}: reasoning given both in a field and inline as <think>")
        reasoning, content = inline, rest
    msg = {"role": "assistant", "content": content}
    if reasoning is not None:
        if not isinstance(reasoning, str):
            raise _Bad("bad-reasoning", f"{where}: reasoning must be a string, got {type(reasoning).__name__}")
        if reasoning.strip("\n").strip():
            msg["reasoning"] = reasoning.strip("\n")
    return msg


def _messages_from_openai(rec: dict) -> list[dict]:
    msgs = rec["messages"]
    if not isinstance(msgs, list):
        raise _Bad("bad-field", f"'messages' must be a list, got {type(msgs).__name__}")
    out = []
    for i, m in enumerate(msgs):
        where = f"message {i}"
        if not isinstance(m, dict):
            raise _Bad("not-object", f"{where}: must be an object, got {type(m).__name__}")
        if "role" not in m:
            raise _Bad("missing-field", f"{where}: missing 'role'")
        reject_unknown(m, OPENAI_MESSAGE_KEYS, where)
        role = m["role"] if m["role"] in ("system", "user", "assistant", "tool") else None
        if role is None:
            raise _Bad("unknown-role", f"{where}: unknown role {m['role']!r} (expected system, user, assistant or tool)")
        reasoning_keys = [k for k in REASONING_KEYS if m.get(k) is not None]
        if reasoning_keys and role != "assistant":
            raise _Bad("bad-reasoning", f"{where}: {reasoning_keys[0]!r} on a {role} message (only the assistant reasons)")
        if role != "assistant" and (m.get("tool_calls") or m.get("function_call")):
            raise _Bad("bad-tool-call", f"{where}: tool calls on a {role} message (only the assistant calls tools)")
        if role != "tool" and m.get("tool_call_id") is not None:
            raise _Bad("bad-field", f"{where}: 'tool_call_id' belongs on a tool message")
        flag = _train_flag(m, where)
        if role == "assistant":
            calls = m.get("tool_calls") or ([{"function": m["function_call"]}] if m.get("function_call") else None)
            content = m.get("content")
            if calls and (content is None or isinstance(content, str) and not content.strip()):
                msg = {"role": "assistant", "content": ""}
                if reasoning_keys:
                    msg.update(_assistant("", where, m[reasoning_keys[0]]))
            else:
                if "content" not in m:
                    raise _Bad("missing-field", f"{where}: missing 'content'")
                msg = _assistant(_content(content, where), where, m[reasoning_keys[0]] if reasoning_keys else None)
            if calls:
                msg["tool_calls"] = parse_tool_calls(calls, where, f"call_{i}")
        else:
            if "content" not in m:
                raise _Bad("missing-field", f"{where}: missing 'content'")
            msg = {"role": role, "content": _content(m["content"], where)}
            if role == "tool":
                if flag is not None:
                    raise _Bad("bad-field", f"{where}: a tool result is never trained on; remove 'train'")
                for key in ("tool_call_id", "name"):
                    if m.get(key) is not None:
                        if not isinstance(m[key], str):
                            raise _Bad("bad-field", f"{where}: {key!r} must be a string")
                        msg[key] = m[key]
        if flag is not None:
            msg["train"] = flag
        out.append(msg)
    if rec.get("tools") is not None:
        rec["_tools"] = parse_tools(rec["tools"])
    return out


def _messages_from_alpaca(rec: dict) -> list[dict]:
    if "output" not in rec:
        raise _Bad("missing-field", "Alpaca record is missing 'output'")
    instruction = _content(rec["instruction"], "'instruction'")
    extra = rec.get("input", "")
    if not isinstance(extra, str):
        raise _Bad("bad-content", f"'input': content must be a string, got {type(extra).__name__}")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    out = []
    if rec.get("system"):
        out.append({"role": "system", "content": _content(rec["system"], "'system'")})
    return out + [{"role": "user", "content": user}, {"role": "assistant", "content": _content(rec["output"], "'output'")}]


def _check_order(msgs: list[dict], opts: ValidationOptions, fixes: Counter) -> list[dict]:
    for i, m in enumerate(msgs):
        if m["role"] == "system" and i != 0:
            raise _Bad("system-not-first", f"message {i}: a system message may only come first")
    start = 1 if msgs and msgs[0]["role"] == "system" else 0
    body = msgs[start:]
    if body and body[0]["role"] == "assistant":
        if not opts.drop_leading_assistant:
            raise _Bad("leading-assistant", f"message {start}: the first turn is from the assistant "
                       f"({suggest('drop_leading_assistant', 'drop such turns, as FastChat does', opts.flags)})")
        while body and body[0]["role"] == "assistant":
            body = body[1:]
            fixes["dropped leading assistant turn"] += 1
    merged: list[dict] = []
    for j, m in enumerate(body):
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
            raise _Bad("bad-content", f"message {start + j}: the reply is empty after its <think> block")
        after_tool = m["role"] == "tool" or (merged and merged[-1]["role"] == "tool")
        if m["role"] == "tool" and not (merged and (merged[-1]["role"] == "tool" or merged[-1].get("tool_calls"))):
            raise _Bad("orphan-tool-result", f"message {start + j}: a tool result with no tool call before it")
        if merged and merged[-1]["role"] == m["role"] and not after_tool:
            if "tool_calls" in m or "tool_calls" in merged[-1] or "reasoning" in m:
                raise _Bad("consecutive-roles", f"message {start + j}: two consecutive assistant turns with tool "
                           "calls or reasoning cannot be merged")
            if not opts.merge_consecutive:
                raise _Bad("consecutive-roles", f"message {start + j}: two consecutive {m['role']} turns "
                           f"({suggest('merge_consecutive', 'join them', opts.flags)})")
            if merged[-1].get("train") != m.get("train"):
                raise _Bad("consecutive-roles", f"message {start + j}: cannot merge consecutive {m['role']} turns "
                           "with different 'train' flags")
            merged[-1] = {**merged[-1], "content": merged[-1]["content"] + "\n\n" + m["content"]}
            fixes["merged consecutive turns"] += 1
        else:
            merged.append(dict(m))
    if not any(m["role"] == "assistant" for m in merged):
        raise _Bad("no-assistant", "no assistant reply to learn from")
    for j, m in enumerate(merged[:-1]):  # a call must be answered before the conversation moves on
        if m.get("tool_calls") and merged[j + 1]["role"] != "tool":
            raise _Bad("unanswered-tool-call", f"message {start + j}: tool call(s) with no tool result after them")
    return msgs[:start] + merged


def normalize_row(row: Row, opts: ValidationOptions | None = None, fixes: Counter | None = None) -> tuple[dict | None, Problem | None]:
    """One row → (normalized record, None) or (None, Problem). Pure apart from counting fixes."""
    opts = opts or ValidationOptions()
    fixes = fixes if fixes is not None else Counter()
    if row.error:
        return None, Problem(row.path, row.loc, None, "malformed-json", row.error)
    rec = row.value
    if not isinstance(rec, dict):
        return None, Problem(row.path, row.loc, None, "not-object", f"record must be a JSON object, got {type(rec).__name__}")
    rid = rec.get("id")
    rid = str(rid) if rid is not None else None
    try:
        kinds = [k for k in ("conversations", "messages", "instruction") if k in rec]
        if len(kinds) != 1:
            found = f"it has {', '.join(map(repr, kinds))}" if kinds else f"keys: {', '.join(map(repr, sorted(rec))) or 'none'}"
            raise _Bad("missing-field" if not kinds else "unknown-field",
                       "record must have exactly one of 'conversations' (ShareGPT), 'messages' (OpenAI) or "
                       f"'instruction' (Alpaca); {found}")
        found_format = {"conversations": "sharegpt", "messages": "openai", "instruction": "alpaca"}[kinds[0]]
        if opts.expect_format and found_format != opts.expect_format:
            raise _Bad("wrong-format", f"a {found_format} record in a source declared format={opts.expect_format}")
        convert = {"conversations": _messages_from_sharegpt, "messages": _messages_from_openai,
                   "instruction": _messages_from_alpaca}[kinds[0]]
        if rec.get("tools") is not None and kinds[0] == "instruction":
            raise _Bad("unknown-field", "an Alpaca record cannot declare 'tools'")
        local = Counter()
        rec = dict(rec)
        msgs = _check_order(convert(rec), opts, local)
        tools = rec.get("_tools")
        if any(m.get("tool_calls") or m["role"] == "tool" for m in msgs):
            names = {t["function"]["name"] for t in tools} if tools else None
            check_tool_flow(msgs, names, opts.allow_undeclared_tools, opts.flags)
    except _Bad as bad:
        return None, Problem(row.path, row.loc, rid, bad.rule, bad.message)
    fixes.update(local)
    out = {"id": rid if rid is not None else f"{os.path.basename(row.path)}:{row.loc}", "messages": msgs}
    if tools:
        out["tools"] = tools
    return out, None


def iter_conversations(paths, on_bad_record: str = "error", opts: ValidationOptions | None = None,
                       report: LoadReport | None = None) -> Iterator[dict]:
    """Read + validate + normalize, one record at a time (memory independent of the data's size); fills `report`.
    `error`: after reading everything, raise DataError listing every problem; `skip`: report them."""
    if on_bad_record not in ON_BAD_RECORD:
        flags = opts.flags if opts is not None else None
        raise ValueError(f"{flag_name('on_bad_record', flags)} must be one of {', '.join(ON_BAD_RECORD)}, "
                         f"got {on_bad_record!r}")
    report = report if report is not None else LoadReport()
    for row in read_rows(paths):
        report.rows += 1
        rec, problem = normalize_row(row, opts, report.fixes)
        if problem:
            report.skipped.append(problem)
        else:
            report.kept += 1
            if not (report.skipped and on_bad_record == "error"):  # nothing will be trained on: stop yielding
                yield rec
    if report.skipped and on_bad_record == "error":
        raise DataError(report.skipped)
    if report.rows and not report.kept:  # --on_bad_record skip must not turn a wholly bad file into "0 samples"
        first = report.skipped[0]
        raise DataError(report.skipped, header=f"all {report.rows} record(s) are invalid, nothing to train on; "
                                              f"the first: {first}")


def load_conversations(paths, on_bad_record: str = "error", opts: ValidationOptions | None = None) -> tuple[list[dict], LoadReport]:
    """Read + validate + normalize into a list. `error`: raise DataError listing every problem; `skip`: report them."""
    report = LoadReport()
    records = list(iter_conversations(paths, on_bad_record, opts, report))
    return records, report


def format_report(report: LoadReport) -> str:
    lines = [f"read {report.rows} record(s): kept {report.kept}, skipped {len(report.skipped)}"]
    first = report.first_by_rule()
    for rule, n in Counter(p.rule for p in report.skipped).most_common():
        lines.append(f"  skipped {n} × {rule}, first: {first[rule]}")
    for what, n in report.fixes.most_common():
        lines.append(f"  fixed {n} × {what}")
    return "\n".join(lines)


def write_report(report: LoadReport, path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report.summary(), f, indent=2)


# this command's own flags (data/flags.py): PATH is positional, records are always skipped and listed
VALIDATE_CLI_FLAGS = {"merge_consecutive": "--merge_consecutive", "drop_leading_assistant": "--drop_leading_assistant",
                      "allow_undeclared_tools": "--allow_undeclared_tools"}


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.validate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help=".json/.jsonl/.parquet files, directories or globs")
    parser.add_argument("--merge_consecutive", action="store_true", help="accept consecutive same-role turns (merged)")
    parser.add_argument("--drop_leading_assistant", action="store_true", help="accept leading assistant turns (dropped)")
    parser.add_argument("--allow_undeclared_tools", action="store_true",
                        help="accept calls to functions the record's 'tools' does not declare")
    args = parser.parse_args(argv)
    opts = ValidationOptions(args.merge_consecutive, args.drop_leading_assistant,
                             allow_undeclared_tools=args.allow_undeclared_tools, flags=VALIDATE_CLI_FLAGS)
    try:
        # training's `PATH:WEIGHT` source specs validate as their paths
        _, report = load_conversations([parse_source(p, VALIDATE_CLI_FLAGS).path for p in args.paths], "skip", opts)
    except DataError as e:  # every record invalid: list them as for any bad record, then the summary line
        for problem in e.problems:
            print(problem)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:  # missing/unreadable/empty file, glob or directory without data
        print(f"error: {e}", file=sys.stderr)
        return 2
    for problem in report.skipped:
        print(problem)
    print(format_report(report), file=sys.stderr)
    return 1 if report.skipped else 0


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(main())
