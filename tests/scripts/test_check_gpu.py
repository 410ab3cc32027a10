"""scripts/check_gpu.py runs its checks end to end (on CPU here, fp32 + sdpa) and refuses CUDA without a GPU."""

from __future__ import annotations

import subprocess
import sys

from helpers import ENV, ROOT

SCRIPT = str(ROOT / "scripts" / "check_gpu.py")


def test_checks_pass_on_cpu_and_print_figures():
    proc = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--attn", "chattune", "--steps", "3", "--hidden",
                           "128", "--layers", "2", "--seq", "128", "--batch", "2", "--sp", "2"], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "PASS packing (chattune, fp32)" in proc.stdout and "PASS training (chattune, fp32)" in proc.stdout
    assert "PASS sequence parallel (SP=2, fp32)" in proc.stdout and "SP=2" in proc.stdout.split("throughput")[-1]
    assert "PASS memory plan (fp32, 128 tokens" in proc.stdout  # planned vs VmHWM within 15%
    assert "tokens/s fwd+bwd" in proc.stdout and proc.stdout.rstrip().endswith("all checks passed")


def test_cuda_without_a_gpu_is_one_line():
    import torch

    if torch.cuda.is_available():
        return  # a GPU machine runs the real checks instead
    proc = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: no CUDA device here")
    assert len(proc.stderr.strip().splitlines()) == 1
