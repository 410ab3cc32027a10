"""Reading conversation files: `.json` (array), `.jsonl`, `.parquet`, directories and globs.

Reading only parses; it never judges a record (data/validate.py does). Every row comes back with its
location so any later error can name `PATH:LINE` (jsonl, 1-based) or `PATH:INDEX` (json/parquet).
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from data.flags import given

SUFFIXES = (".json", ".jsonl", ".parquet")


@dataclass
class Row:
    path: str
    loc: int  # 1-based line for .jsonl, 0-based record index for .json/.parquet
    value: Any = None
    error: str | None = None  # set when the row could not even be parsed


def expand_paths(paths: str | os.PathLike | list) -> list[str]:
    """Files named by paths, directories (recursively, sorted) and globs; errors name the bad path."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    files: list[str] = []
    for p in map(str, paths):
        if any(ch in p for ch in "*?["):
            matches = sorted(m for m in glob.glob(p, recursive=True) if m.endswith(SUFFIXES))
            if not matches:
                raise FileNotFoundError(f"{p}: glob matches no {'/'.join(SUFFIXES)} file")
            files += matches
        elif os.path.isdir(p):
            found = sorted(
                os.path.join(root, f) for root, _, names in os.walk(p) for f in names if f.endswith(SUFFIXES)
            )
            if not found:
                raise FileNotFoundError(f"{p}: directory holds no {'/'.join(SUFFIXES)} file")
            files += found
        elif os.path.isfile(p):
            if not p.endswith(SUFFIXES):
                raise ValueError(f"{p}: unsupported file type (expected {', '.join(SUFFIXES)})")
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return files


class EmptyDataFile(ValueError):
    """A data file that holds no record at all (empty, whitespace only, `[]`)."""


def read_rows(paths) -> Iterator[Row]:
    """Every record of every file, in order. A file that cannot be opened, or holds no record, stops the read with
    one line naming it: an empty file in a data mix is a mistake, never silently "0 records"."""
    for path in expand_paths(paths):
        reader = _read_jsonl if path.endswith(".jsonl") else _read_json if path.endswith(".json") else _read_parquet
        try:
            n = 0
            for row in reader(path):
                n += 1
                yield row
        except PermissionError:
            raise PermissionError(f"{path}: cannot read the file (permission denied)") from None
        except IsADirectoryError:
            raise ValueError(f"{path}: is a directory, not a data file") from None
        except OSError as e:
            raise OSError(f"{path}: cannot read the file ({e.strerror or e})") from None
        if n == 0:
            raise EmptyDataFile(f"{path}: the file holds no records (empty, whitespace only or an empty array)")


def _read_jsonl(path: str) -> Iterator[Row]:
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield Row(path, lineno, json.loads(line))
                except json.JSONDecodeError as e:
                    yield Row(path, lineno, error=f"malformed JSON: {e.msg} at column {e.colno}")
        except UnicodeDecodeError as e:
            yield Row(path, lineno + 1, error=f"file is not valid UTF-8 ({e.reason})")


def _read_json(path: str) -> Iterator[Row]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        yield Row(path, e.lineno, error=f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}")
        return
    except UnicodeDecodeError as e:
        yield Row(path, 0, error=f"file is not valid UTF-8 ({e.reason})")
        return
    if isinstance(data, dict):  # a single record, or {"data": [...]}-style wrappers are not guessed at
        data = [data]
    if not isinstance(data, list):
        yield Row(path, 0, error=f"a .json file must hold an array of records, found {type(data).__name__}")
        return
    for i, value in enumerate(data):
        yield Row(path, i, value)


def _read_parquet(path: str) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError subclasses for corrupt files
        yield Row(path, 0, error=f"cannot read parquet: {e}")
        return
    for i, value in enumerate(table.to_pylist()):
        yield Row(path, i, _drop_nulls(value))


def _drop_nulls(value):
    """Parquet unifies schemas, so a key absent from a row comes back as null: treat it as absent."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


FORMATS = ("sharegpt", "openai", "alpaca")


# --- sources, training's --data_path entries: `PATH[:WEIGHT][:count=N][:template=NAME][:format=F]` ---------


@dataclass(frozen=True)
class Source:
    path: str  # a file, directory or glob
    weight: float | None = None  # use this multiple of the source's records (0.5: half of them, 2: each twice)
    count: int | None = None  # or exactly this many records (sampled without repeats up to the source's size)
    template: str | None = None  # this source's chat template (default: --template)
    format: str | None = None  # sharegpt | openai | alpaca: records of another format are invalid (default: any)

    def spec(self) -> dict:
        return asdict(self)


_OPTION = re.compile(r"^(?:(?P<weight>\d+(?:\.\d*)?|\.\d+)|(?P<key>weight|count|template|format)=(?P<value>[^:]+))$")


def parse_source(spec: str, flags: Mapping[str, str] | None = None) -> Source:
    """`data.jsonl`, `data.jsonl:0.5`, `a/*.json:count=1000:template=llama-2:format=sharegpt`. Options are peeled off the end, so
    a path holding ':' still works when no option follows it. Messages name the spec with the caller's data flag
    (`flags`, data/flags.py; default: training's --data_path)."""
    where = given("data", spec, flags)
    parts, options = spec.split(":"), {}
    while len(parts) > 1 and (m := _OPTION.match(parts[-1])):
        key, value = ("weight", m["weight"]) if m["weight"] is not None else (m["key"], m["value"])
        if key in options:
            raise ValueError(f"{where}: '{key}' given twice")
        options[key] = value
        parts.pop()
    path = ":".join(parts)
    try:
        weight = float(options["weight"]) if "weight" in options else None
        count = int(options["count"]) if "count" in options else None
    except ValueError:
        raise ValueError(f"{where}: weight must be a number and count an integer") from None
    if weight is not None and weight <= 0 or count is not None and count <= 0:
        raise ValueError(f"{where}: weight and count must be > 0")
    if weight is not None and count is not None:
        raise ValueError(f"{where}: give a weight or a count, not both")
    fmt = options.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"{where}: format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return Source(path, weight, count, options.get("template"), fmt)


def parse_sources(paths, flags: Mapping[str, str] | None = None) -> list[Source]:
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    return [p if isinstance(p, Source) else parse_source(str(p), flags) for p in paths]
