"""How the calling entry point spells the options that data-layer messages name.

Validation, tokenization and the dataset build are driven by several entry points that spell one option
differently: training's `--model_max_length` is eval.loss's `--max-length` and data.inspect's `--max_length`; most
tools in scripts/ have no `--merge_consecutive` at all. So the data layer never writes a flag itself: it asks the
caller's mapping option -> flag (carried in `ValidationOptions.flags`, read by `DataConfig.flags`, and passed to
`tokenize_batch(flags=...)`). Training's spellings are the default. An option the mapping lacks is named as the
option (`max_length`), and a suggestion says that the command has no flag for it instead of naming another
command's flag.

Options (keys): template, data, max_length, mask, truncation, on_bad_record, merge_consecutive,
drop_leading_assistant, allow_undeclared_tools, reasoning, reasoning_history, data_hash.
"""

from __future__ import annotations

from collections.abc import Mapping

TRAINING_FLAGS: dict[str, str] = {
    "template": "--template",
    "data": "--data_path",
    "max_length": "--model_max_length",
    "mask": "--mask",
    "truncation": "--truncation",
    "on_bad_record": "--on_bad_record",
    "merge_consecutive": "--merge_consecutive",
    "drop_leading_assistant": "--drop_leading_assistant",
    "allow_undeclared_tools": "--allow_undeclared_tools",
    "reasoning": "--reasoning",
    "reasoning_history": "--reasoning_history",
    "data_hash": "--data_hash",
}
OPTIONS = frozenset(TRAINING_FLAGS)


def training_flags() -> dict[str, str]:
    """A fresh copy of training's spellings (the default of every mapping)."""
    return dict(TRAINING_FLAGS)


def check_flags(flags: Mapping[str, str]) -> Mapping[str, str]:
    """A mapping's keys must be known options: a misspelt key would silently fall back to 'no flag'."""
    unknown = sorted(set(flags) - OPTIONS)
    if unknown:
        raise ValueError(f"unknown option(s) in a flag mapping: {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(OPTIONS))}")
    return flags


def flag_name(option: str, flags: Mapping[str, str] | None = None) -> str:
    """The caller's flag for `option` (`--max-length`), or the option's own name when the caller has no flag for it."""
    flags = TRAINING_FLAGS if flags is None else flags
    return flags.get(option) or option


def suggest(option: str, effect: str, flags: Mapping[str, str] | None = None) -> str:
    """'use --merge-consecutive to join them', or, for a caller without that flag, 'the merge_consecutive option
    would join them; this command has no flag for it'."""
    flags = TRAINING_FLAGS if flags is None else flags
    flag = flags.get(option)
    if flag:
        return f"use {flag} to {effect}"
    return f"the {option} option would {effect}; this command has no flag for it"


def given(option: str, value, flags: Mapping[str, str] | None = None) -> str:
    """A value as the caller gave it: `--data_path x.jsonl`, or just `x.jsonl` when it came with no flag."""
    flags = TRAINING_FLAGS if flags is None else flags
    flag = flags.get(option)
    return f"{flag} {value}" if flag else str(value)
