"""Loading tokenizers (HF dir, hub id, `.gguf`, `asset:NAME`) and encoding text *runs* exactly as the
tokenizer would inside the full prompt.

`RunEncoder` is the one place that knows how a tokenizer behaves at a boundary. Prompts are tokenized
as runs of text between template special tokens; a run that does not start the prompt must be
encoded as a continuation (e.g. SentencePiece's Metaspace `prepend_scheme="first"` adds `▁` only at
the very start of the input, not after `</s>`). The encoder builds a continuation variant of the
backend when the tokenizer needs one and *proves* at construction, on a probe string, that
run-by-run encoding equals encoding the whole string; a tokenizer for which that fails is refused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path

from data.assets import cached_conversion, resolve_source


class TokenizerError(ValueError):
    pass


def load_tokenizer(source: str | os.PathLike, trust_remote_code: bool = False):
    """Load a tokenizer from an HF dir, hub id, `.gguf` file or `asset:NAME`.

    GGUF vocabularies are converted once (slow: ~20 s for a 128k vocab) and cached as an HF tokenizer
    dir keyed by the file's size and mtime, so later loads take a fraction of a second.
    """
    from transformers import AutoTokenizer

    source = resolve_source(source)
    if source.endswith(".gguf"):
        path = Path(source)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {path} does not exist")
        cached = cached_conversion(
            path, "tokenizers", "tokenizer_config.json",
            lambda tmp: AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp))
        return AutoTokenizer.from_pretrained(cached)
    if source.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(source)):
        raise TokenizerError(f"tokenizer source {source} does not exist")
    if os.path.exists(source) and not os.path.isdir(source):
        raise TokenizerError(f"tokenizer source {source} is a file but not a .gguf; pass a directory or hub id")
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise TokenizerError(f"cannot load a tokenizer from {source!r}: {e}") from e


def tokenizer_fingerprint(tokenizer) -> str:
    """Stable hash of everything that changes token ids: vocab/merges/normalizers, specials, template."""
    h = hashlib.sha256()
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps([tokenizer.bos_token, tokenizer.eos_token, str(tokenizer.chat_template)]).encode())
    return h.hexdigest()[:16]


def _drop_start_prefix(obj) -> bool:
    """Turn Metaspace's prepend_scheme "first" into "never" in a pre-tokenizer/normalizer JSON tree."""
    changed = False
    if isinstance(obj, dict):
        if obj.get("type") == "Metaspace" and obj.get("prepend_scheme") == "first":
            obj["prepend_scheme"] = "never"
            changed = True
        for v in obj.values():
            changed |= _drop_start_prefix(v)
    elif isinstance(obj, list):
        for v in obj:
            changed |= _drop_start_prefix(v)
    return changed


class RunEncoder:
    """Encodes text runs with the tokenizer's backend, all added tokens treated as plain text."""

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer

        if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
            raise TokenizerError(f"{type(tokenizer).__name__} has no fast (Rust) backend; chattune needs one for exact offsets")
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        spec["truncation"] = None
        spec["padding"] = None
        self.added: dict[str, int] = {a["content"]: a["id"] for a in spec["added_tokens"]}
        for a in spec["added_tokens"]:
            if a.get("lstrip") or a.get("rstrip"):
                raise TokenizerError(f"added token {a['content']!r} strips whitespace; not supported yet")
            a["special"] = True  # with encode_special_tokens below: content never becomes a control token
        self.first = Tokenizer.from_str(json.dumps(spec))
        self.first.encode_special_tokens = True
        cont_spec = copy.deepcopy(spec)
        if _drop_start_prefix(cont_spec.get("pre_tokenizer")) | _drop_start_prefix(cont_spec.get("normalizer")):
            self.cont = Tokenizer.from_str(json.dumps(cont_spec))
            self.cont.encode_special_tokens = True
        else:
            self.cont = self.first
        pattern = "|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True))
        self._special_re = re.compile(pattern) if pattern else None
        self._split_cache: dict[str, list[tuple[str, int | None]]] = {}
        with_special = tokenizer("x", add_special_tokens=True).input_ids
        plain = tokenizer("x", add_special_tokens=False).input_ids
        start = _find_sublist(with_special, plain)
        if start < 0:
            raise TokenizerError("cannot tell which special tokens the tokenizer adds around text")
        self.prefix_ids: list[int] = with_special[:start]
        self.suffix_ids: list[int] = with_special[start + len(plain):]
        # A prompt whose text already starts with these tokens (Llama-3's `<|begin_of_text|>`, a Jinja
        # template's `{{ bos_token }}`) must not get them twice.
        self.prefix_text = "".join(tokenizer.convert_ids_to_tokens(self.prefix_ids))
        self._prove(tokenizer)

    def split_specials(self, text: str) -> list[tuple[str, int | None]]:
        """Split template text at added-token strings: [(text, None) | (token, id)] in order."""
        cached = self._split_cache.get(text)
        if cached is None:
            cached = self._split_cache[text] = self._split_specials(text)
            if len(self._split_cache) > 65536:  # template texts repeat; content never comes here
                self._split_cache.clear()
        return cached

    def _split_specials(self, text: str) -> list[tuple[str, int | None]]:
        if self._special_re is None:
            return [(text, None)]
        out: list[tuple[str, int | None]] = []
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                out.append((text[pos:m.start()], None))
            out.append((m.group(), self.added[m.group()]))
            pos = m.end()
        if pos < len(text):
            out.append((text[pos:], None))
        return out

    def encode_runs_raw(self, runs: list[tuple[str, bool]]) -> list:
        """Encode (text, starts_prompt) runs in two batched calls; the backend's Encodings, in order."""
        results: list = [None] * len(runs)
        for starts, backend in ((True, self.first), (False, self.cont)):
            idx = [i for i, (_, s) in enumerate(runs) if s == starts]
            if idx:
                for i, enc in zip(idx, backend.encode_batch([runs[i][0] for i in idx], add_special_tokens=False)):
                    results[i] = enc
        return results

    def encode_runs(self, runs: list[tuple[str, bool]]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """(ids, char offsets) per (text, starts_prompt) run."""
        return [(e.ids, e.offsets) for e in self.encode_runs_raw(runs)]

    def encode_text(self, text: str, at_start: bool = True) -> list[int]:
        """Encode a whole template-style string (added tokens are control tokens), no auto specials; `at_start`
        False: as a continuation of a prompt (no word-boundary prefix)."""
        ids: list[int] = []
        for part, special_id in self.split_specials(text):
            if special_id is not None:
                ids.append(special_id)
            else:
                ids.extend(self.encode_runs([(part, at_start)])[0][0])
            at_start = False
        return ids

    def _prove(self, tokenizer) -> None:
        specials = [t for t in (tokenizer.eos_token, tokenizer.bos_token) if t and t in self.added] or list(self.added)[:1]
        probes = ["Hello world", "  leading and trailing  ", "line\n\nbreak: x", "ünïcødé 日本語 🙂"]
        for special in specials:
            for a in probes:
                for b in probes:
                    text = a + special + b + special + "\n" + b
                    want = tokenizer(text, add_special_tokens=False).input_ids
                    got = self.encode_text(text)
                    if got != want:
                        raise TokenizerError(
                            f"{type(tokenizer).__name__}: encoding runs between special tokens does not reproduce "
                            f"whole-string tokenization for {text!r}; this tokenizer is not supported"
                        )


def _find_sublist(haystack: list[int], needle: list[int]) -> int:
    for i in range(len(haystack) - len(needle) + 1):
        if haystack[i:i + len(needle)] == needle:
            return i
    return -1


def run_encoder(tokenizer) -> RunEncoder:
    """The tokenizer's RunEncoder, built once per tokenizer object."""
    enc = getattr(tokenizer, "_chattune_run_encoder", None)
    if enc is None:
        enc = RunEncoder(tokenizer)
        tokenizer._chattune_run_encoder = enc
    return enc
