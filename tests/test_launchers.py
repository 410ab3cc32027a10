"""The shipped launcher scripts are valid bash and every training flag in them parses."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from train.config import parse_args

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "scripts").glob("*.s[hb]*"))
SCRIPTS = [s for s in SCRIPTS if s.suffix in (".sh", ".sbatch") and "train/train" in s.read_text()]  # launchers only


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_launcher_flags_parse(script, tmp_path):
    assert len(SCRIPTS) >= 5
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    body = text[text.index("train/train"):].split("\n", 1)
    flags = re.sub(r"\\\n", " ", body[1] if body[0].rstrip().endswith("\\") else "")
    flags = re.sub(r'"\$\{[A-Z_]+:[?-]([^}]*)\}"', lambda m: shlex.quote(m.group(1) or "x"), flags)
    flags = flags.replace("set MODEL", "m").replace("set DATA", "d.jsonl")
    args = shlex.split(flags.split("\n")[0])
    assert len(args) > 20  # the whole continued command line was read
    cfg = parse_args(args)
    assert cfg.model_name_or_path and cfg.data_path and cfg.output_dir
