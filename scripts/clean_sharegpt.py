"""Clean raw ShareGPT dumps (FastChat's `clean_sharegpt`, our own rules and code).

    python scripts/clean_sharegpt.py --in-file sharegpt_html.json --out-file sharegpt_clean.json

Per conversation: replies rendered as HTML by the web UI (starting with a block element) → markdown
(markdownify; `--no-html` skips this); code blocks repaired (the web UI's
"<lang>Copy code" header becomes a fenced ```lang block, unbalanced fences are closed); roles normalized
(human/user → human, gpt/chatgpt/bard/bing/assistant → gpt); leading assistant turns and a trailing
unanswered human turn are removed; roles must then strictly alternate. Dropped, with the reason
counted: not a ShareGPT record, roles that do not alternate, an empty turn, replies shorter than
--min-reply-chars, fewer than --min-turns turns, a repeated id, repeated content.
"""

from __future__ import annotations

import argparse
import hashlib
import re

from data.records import Tally, add_io_args, progress, read_records, record_id, run_tool, where, write_records

HUMAN = {"human", "user"}
GPT = {"gpt", "chatgpt", "bard", "bing", "assistant", "model"}
# A reply rendered by the chat web UI starts with a block element; only those are converted, so text that
# merely talks about HTML ("what does <div> do?") is left alone.
RENDERED_HTML = re.compile(r"\s*<(div|p|pre|ol|ul|table|h[1-6]|blockquote)\b[^>]*>", re.I)
# After conversion, the ChatGPT web UI's code header shows up as "```\npythonCopy code\n..." or
# "```\nCopy code\n...": turn it into a language-tagged fence.
COPY_CODE = re.compile(r"```[ \t]*\n?[ \t]*([\w+#.-]*?)[ \t]*(?:Copy code)+[ \t]*\n*")


def html_to_markdown(text: str) -> str:
    from markdownify import markdownify

    md = markdownify(text, heading_style="ATX", code_language="", bullets="-")
    return re.sub(r"\n{3,}", "\n\n", md).strip()


def repair_code_blocks(text: str) -> tuple[str, int]:
    """(text, number of repairs): "Copy code" headers → ```lang, and an odd number of fences closed."""
    fixed, n = COPY_CODE.subn(lambda m: f"```{m.group(1)}\n", text)
    if text.count("```") % 2 == 1 or fixed.count("```") % 2 == 1:
        fixed = fixed.rstrip() + "\n```"
        n += 1
    return fixed, n


def clean_record(rec: dict, min_reply_chars: int, min_turns: int, tally: Tally,
                 html: bool = True) -> tuple[dict | None, str | None]:
    turns = rec.get("conversations")
    if not isinstance(turns, list):
        return None, "not a ShareGPT record (no 'conversations' list)"
    out = []
    for t in turns:
        if not isinstance(t, dict) or not isinstance(t.get("value"), str) or not isinstance(t.get("from"), str):
            return None, "malformed turn (needs string 'from' and 'value')"
        role = t["from"].lower()
        if role in HUMAN:
            role = "human"
        elif role in GPT:
            role = "gpt"
        elif role == "system" and not out and "system" not in rec:
            rec = {**rec, "system": t["value"]}
            tally.fixed["system turn moved to 'system'"] += 1
            continue
        else:
            return None, f"unknown role {t['from']!r}"
        value = t["value"]
        if html and role == "gpt" and RENDERED_HTML.match(value):
            value = html_to_markdown(value)
            tally.fixed["HTML converted to markdown"] += 1
        value, repairs = repair_code_blocks(value)
        if repairs:
            tally.fixed["code block repaired"] += 1
        value = value.strip()
        out.append({**{k: v for k, v in t.items() if k not in ("from", "value")}, "from": role, "value": value})
    while out and out[0]["from"] == "gpt":
        out.pop(0)
        tally.fixed["leading assistant turn removed"] += 1
    if out and out[-1]["from"] == "human":
        out.pop()
        tally.fixed["trailing unanswered human turn removed"] += 1
    for i, t in enumerate(out):
        if t["from"] != ("human" if i % 2 == 0 else "gpt"):
            return None, "roles do not alternate human/gpt"
        if not t["value"]:
            return None, "empty turn"
        if t["from"] == "gpt" and len(t["value"]) < min_reply_chars:
            return None, f"reply shorter than {min_reply_chars} characters"
    if len(out) < min_turns:
        return None, f"fewer than {min_turns} turns after cleaning"
    return {**rec, "conversations": out}, None


def content_key(rec: dict) -> str:
    text = "\x1e".join(f"{t['from']}\x1f{' '.join(t['value'].split())}" for t in rec["conversations"])
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_io_args(p)
    p.add_argument("--min-reply-chars", type=int, default=2, help="drop conversations with a shorter reply")
    p.add_argument("--min-turns", type=int, default=2, help="drop conversations with fewer turns (after cleaning)")
    p.add_argument("--no-html", action="store_true", help="leave HTML as it is (the data is not a web-UI dump)")
    args = p.parse_args()
    rows = read_records(args.in_file)
    tally = Tally("clean_sharegpt", read=len(rows))
    kept, ids, contents = [], set(), set()
    for row in progress(rows, "cleaning"):
        rec, reason = clean_record(row.value, args.min_reply_chars, args.min_turns, tally, not args.no_html)
        if reason:
            tally.drop(reason, where(row))
            continue
        rid = record_id(row)
        if rid in ids:
            tally.drop("duplicate id", where(row))
            continue
        key = content_key(rec)
        if key in contents:
            tally.drop("duplicate content", where(row))
            continue
        ids.add(rid)
        contents.add(key)
        kept.append(rec)
    tally.kept = write_records(kept, args.out_file)
    tally.report(args.out_file, args.report)
    return 0


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(run_tool(main))
