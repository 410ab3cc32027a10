"""Issue 21 (7): one reader of CHATTUNE_NO_PROGRESS, with one meaning everywhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import ROOT

from data.progress import ENV_VAR, progress_disabled


@pytest.mark.parametrize("value,disabled", [
    (None, False), ("", False), ("0", False), ("false", False), ("False", False), ("no", False), ("off", False),
    (" 0 ", False), ("1", True), ("true", True), ("TRUE", True), ("yes", True), ("on", True), (" 1\n", True),
    ("2", True),  # set to something else: whoever set it meant to silence the bars
])
def test_progress_disabled(value, disabled, monkeypatch):
    if value is None:
        monkeypatch.delenv(ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ENV_VAR, value)
    assert progress_disabled() is disabled


def test_only_data_progress_reads_the_variable():
    """Training, the data tools and eval all ask data.progress (a `bool(os.environ.get(...))` would read "0" as
    set); setting the variable (for a child process, or for this run's bars) is not reading it."""
    reads = re.compile(r"(?:environ\.get\(|getenv\()\s*[\"']CHATTUNE_NO_PROGRESS"  # a read, not an assignment
                       r"|environ\[\s*[\"']CHATTUNE_NO_PROGRESS[\"']\s*\](?!\s*=[^=])")
    offenders = [f"{path.relative_to(ROOT)}: {line.strip()}"
                 for folder in ("data", "eval", "train", "serve", "scripts")
                 for path in sorted(Path(ROOT / folder).rglob("*.py"))
                 for line in path.read_text().splitlines() if reads.search(line)]
    assert not offenders, offenders
    users = {p.relative_to(ROOT).as_posix() for folder in ("data", "eval", "train")
             for p in Path(ROOT / folder).rglob("*.py") if "progress_disabled()" in p.read_text()}
    assert {"data/records.py", "eval/gen_answers.py", "eval/judge.py", "train/tracking.py"} <= users
