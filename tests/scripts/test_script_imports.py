"""Scripts import the repository's packages through the (editable) install, never by patching sys.path or
importing tests/, so each runs as `python scripts/NAME.py` from the repository root or from any other directory."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from helpers import ENV, ROOT

SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))
PATCH = re.compile(r"sys\.path\.(insert|append)\(|sys\.path\[0\]\s*=")


def test_no_script_or_package_patches_sys_path_or_imports_tests():
    """train/ is left out: its FastChat-style launchers (torchrun train/train_mem.py) still set sys.path[0]."""
    files = SCRIPTS + [p for pkg in ("data", "serve", "eval") for p in (ROOT / pkg).rglob("*.py")]
    assert len(SCRIPTS) > 20
    for path in files:
        text = path.read_text()
        assert not PATCH.search(text), f"{path.relative_to(ROOT)} patches sys.path"
        assert "from helpers import" not in text and "import helpers" not in text, path
    import helpers

    from scripts.tiny_model import make_tiny_llama

    assert helpers.make_tiny_llama is make_tiny_llama  # moved out of tests/, still there for the tests


def test_every_script_imports_when_run_from_another_directory(tmp_path):
    """One process loads every script the way `python scripts/NAME.py` does (sys.path[0] = scripts/, the working
    directory elsewhere) without running its main: every module-level import must resolve."""
    code = ("import runpy, sys\n"
            "for path in sys.argv[1:]:\n"
            "    sys.path[0] = str(__import__('pathlib').Path(path).parent)\n"
            "    runpy.run_path(path, run_name='__import_check__')\n")
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code, *map(str, SCRIPTS)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("script,where", [("merge_lora.py", "elsewhere"), ("stats.py", "elsewhere"),
                                          ("bench_serve.py", "root"), ("cli.py", "elsewhere")])
def test_help_runs_from_the_root_and_elsewhere(script, where, tmp_path):
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--help"], capture_output=True, text=True,
                          env=env, cwd=ROOT if where == "root" else tmp_path, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stderr[-2000:]
