"""The `chattune` console command (scripts/cli.py, installed by pyproject's [project.scripts]): each subcommand runs
the existing entry point with the rest of the command line, so output and exit status are that entry point's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DEMO, ENV, ROOT, free_port

from scripts.cli import COMMANDS, EVAL_FORMS

CHATTUNE = str(Path(sys.executable).parent / "chattune")  # the console script beside the venv's python


def chattune(*args, cwd=None, timeout: int = 120) -> subprocess.CompletedProcess:
    assert Path(CHATTUNE).is_file(), "no `chattune` command: re-install (`pip install -e .`) after editing pyproject"
    return subprocess.run([CHATTUNE, *map(str, args)], capture_output=True, text=True, env=ENV, cwd=cwd or ROOT,
                          timeout=timeout)


def test_help_lists_every_subcommand_and_an_unknown_one_is_one_line(tmp_path):
    proc = chattune("--help", cwd=tmp_path)  # from anywhere: nothing depends on the working directory
    assert proc.returncode == 0 and proc.stderr == ""
    lines = proc.stdout.splitlines()
    listed = lines[lines.index("commands:") + 1:lines.index("eval forms:") - 1]  # one line each, then a blank one
    assert [line.split()[0] for line in listed] == list(COMMANDS) == [
        "train", "chat", "serve", "eval", "export", "plan", "inspect", "validate"]
    assert all(len(line.split()) > 2 for line in listed)
    for form in EVAL_FORMS:
        assert any(line.split()[:2] == ["eval", form] for line in lines), form
    assert "torchrun --nproc_per_node=N --no-python chattune train" in proc.stdout
    bad = chattune("frobnicate", "--x")
    assert bad.returncode == 2 and bad.stdout == "" and len(bad.stderr.strip().splitlines()) == 1
    assert "unknown command 'frobnicate'" in bad.stderr
    assert chattune().returncode == 2  # no subcommand: the usage, on stderr


def test_validate_gives_the_validators_output(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "conversations": [{"from": "gpt", "value": "hi"}]}\n')
    mine = chattune("validate", bad, cwd=tmp_path)
    theirs = subprocess.run([sys.executable, "-m", "data.validate", str(bad)], capture_output=True, text=True,
                            env=ENV, cwd=tmp_path, timeout=120)
    assert mine.returncode == theirs.returncode == 1
    assert (mine.stdout, mine.stderr) == (theirs.stdout, theirs.stderr)
    assert f"{bad}:1: " in mine.stdout + mine.stderr


def test_train_with_an_unknown_flag_is_the_one_line_config_error():
    proc = chattune("train", "--bogus_flag", "1")
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "--bogus_flag" in proc.stderr


def test_plan_without_a_planner_says_so():
    if (ROOT / "train" / "plan.py").is_file():
        proc = chattune("plan", "--help")
        assert proc.returncode == 0 and proc.stdout
    else:
        proc = chattune("plan")
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "no planner" in proc.stderr


def test_subcommands_reach_their_entry_points_with_the_rest_of_argv(capsys, monkeypatch):
    """In-process: `eval FORM` picks the eval tool, `export` runs scripts/export.py's main (argparse names it
    `chattune export`), and argv after the subcommand is passed on untouched."""
    from scripts import cli

    monkeypatch.setattr(sys, "argv", ["chattune"])  # run_main sets sys.argv for the entry point; restored after
    for argv, expect in ((["eval", "show", "--help"], "--judgment-file"), (["export", "--help"], "chattune export"),
                         (["inspect", "--help"], "--tokenizer"), (["validate", "--help"], "PATH")):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0 and expect in capsys.readouterr().out, argv
    assert cli.main(["validate", DEMO]) == 0


@pytest.mark.slow
def test_train_entry_works_under_torchrun_both_ways():
    """torchrun starts the command in each rank: as the console script (--no-python) or as a module (-m); a
    subcommand that needs no process group (validate) shows that every rank dispatches."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    for how in (["--no-python", CHATTUNE], ["-m", "scripts.cli"]):
        proc = subprocess.run([*torchrun, f"--master_port={free_port()}", *how, "validate", DEMO], capture_output=True,
                              text=True, env=ENV, cwd=ROOT, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert (proc.stdout + proc.stderr).count("read 257 record(s)") == 2, proc.stdout + proc.stderr
