"""Install llama-cpp-python (llama.cpp's Python binding) for the parity gate's llama.cpp runtime, built once.

    python scripts/install_llama_cpp.py        (`make llama-cpp`)

PyPI has only its source distribution for this platform, so pip compiles llama.cpp with the machine's C++
compiler: about 5 minutes on 2 cores. The wheel is kept in the chattune cache (`~/.cache/chattune/wheels`, or
`$CHATTUNE_CACHE`), keyed by the CPU's instruction-set flags (the build uses them all), so later installs — a fresh
virtualenv, a clean clone — take seconds. Only the library is built (no multimodal helper, no examples).
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

VERSION = "0.3.36"  # the same release whose vocabulary files are the test tokenizers (docs/design.md §5)
CMAKE_ARGS = "-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON -DLLAMA_CURL=OFF"


def cpu_key() -> str:
    """Native builds use every instruction the CPU has; a wheel is reused only on a CPU with the same flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                break
    except OSError:
        pass
    return hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:12]


def wheel_dir() -> Path:
    root = Path(os.environ.get("CHATTUNE_CACHE", Path.home() / ".cache" / "chattune"))
    return root / "wheels" / f"llama-cpp-python-{VERSION}-{cpu_key()}"


def installed() -> bool:
    try:
        import llama_cpp
    except ImportError:
        return False
    return llama_cpp.__version__ == VERSION


def main() -> int:
    if installed():
        print(f"llama-cpp-python {VERSION} is installed")
        return 0
    cache = wheel_dir()
    wheels = sorted(cache.glob("llama_cpp_python-*.whl"))
    pip = [sys.executable, "-m", "pip"]
    if not wheels:
        print(f"building llama-cpp-python {VERSION} from source (once; about 5 minutes on 2 cores) into {cache}",
              flush=True)
        cache.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        build = subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-binary", "llama-cpp-python", "-w", str(cache),
                                f"llama-cpp-python=={VERSION}"], env=env)
        if build.returncode != 0:
            print("error: building llama-cpp-python failed (it needs a C++ compiler and cmake: apt-get install "
                  "build-essential cmake)", file=sys.stderr)
            return 1
        wheels = sorted(cache.glob("llama_cpp_python-*.whl"))
    subprocess.run([*pip, "install", "-q", str(wheels[-1])], check=True)
    print(f"installed llama-cpp-python {VERSION} from {wheels[-1]}")
    return 0


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(main())
