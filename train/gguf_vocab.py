"""The tokenizer a GGUF file carries, built from the HF tokenizer training used.

llama.cpp tokenizes with what the file holds: a vocabulary model (`gpt2` byte-level BPE or `llama`
SentencePiece-style BPE), the token strings in id order, their types (normal, control, user-defined, byte,
unknown), the merges (BPE) or scores (SentencePiece), a named pre-tokenizer (`tokenizer.ggml.pre`: which regex
splits text before BPE), the special-token ids and whether BOS is added automatically. Everything here is read from
the tokenizer's own `tokenizer.json`, so the file tokenizes as training did; `eval.parity` then proves it per
runtime.

The pre-tokenizer name cannot be read from an HF tokenizer: llama.cpp knows a fixed set of names, each tied to a
regex in its source. When the tokenizer was converted from a GGUF (our assets, or any `.gguf` base), that file's
name is carried over; otherwise the regex is matched against the ones below.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import gguf

from data.tokenizer import run_encoder


class VocabExportError(ValueError):
    pass


# llama.cpp's pre-tokenizer names (llama-vocab.cpp) for the HF pre-tokenizer regexes of the families we train.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_BY_REGEX = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class GgufVocab:
    model: str  # "gpt2" | "llama"
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, eot, unk, pad
    add_bos: bool = False
    add_space_prefix: bool | None = None

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        for kind, tid in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(tid)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(False)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)


def _walk(node):
    """Every dict in a tokenizer.json subtree (pre-tokenizers nest in Sequences)."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def detect_pre(spec: dict) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json, or None when unknown."""
    nodes = list(_walk(spec.get("pre_tokenizer")))
    regexes = [n["pattern"]["Regex"] for n in nodes if n.get("type") == "Split" and "Regex" in n.get("pattern", {})]
    if len(regexes) == 1:
        return PRE_BY_REGEX.get(regexes[0])
    if regexes:
        return None
    byte_level = [n for n in nodes if n.get("type") == "ByteLevel"]
    if byte_level and byte_level[0].get("use_regex", True):
        digits = [n for n in nodes if n.get("type") == "Digits"]
        if not digits:
            return "gpt-2"  # ByteLevel's own regex is GPT-2's
        if digits[0].get("individual_digits"):
            return "smollm"  # digits one by one, then GPT-2's regex (StarCoder, SmolLM)
    return None


def _origin_pre(origin_gguf: str | None, tokens: list[str]) -> str | None:
    """The pre-tokenizer name of the GGUF the tokenizer was converted from, if its tokens are the same."""
    if not origin_gguf:
        return None
    reader = gguf.GGUFReader(origin_gguf)
    pre = reader.fields.get("tokenizer.ggml.pre")
    toks = reader.fields.get("tokenizer.ggml.tokens")
    if pre is None or toks is None or len(toks.data) > len(tokens):
        return None
    if any(str(bytes(toks.parts[idx]), "utf-8") != tokens[i] for i, idx in enumerate(toks.data)):
        return None
    return str(bytes(pre.parts[pre.data[0]]), "utf-8")


def _token_table(spec: dict, n_vocab: int | None) -> tuple[list[str], dict[int, dict]]:
    """Token strings by id, as many as the model's embedding has rows (llama.cpp requires the two to agree)."""
    vocab: dict[str, int] = spec["model"]["vocab"]
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    size = max([*vocab.values(), *added.keys()]) + 1
    if n_vocab is not None and size > n_vocab:
        raise VocabExportError(f"the tokenizer has ids up to {size - 1} but the model's embedding has {n_vocab} rows; "
                               f"resize the embedding (training does with added tokens) before exporting")
    tokens = [""] * (n_vocab or size)
    for text, i in vocab.items():
        tokens[i] = text
    for i, a in added.items():
        tokens[i] = a["content"]
    holes = [i for i, t in enumerate(tokens) if t == "" and i not in added]
    for i in holes:  # ids no token uses: llama.cpp needs a unique string per id
        tokens[i] = f"[PAD{i}]"
    return tokens, added


def _merges(spec: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges") or []]


def build_vocab(tokenizer, n_vocab: int | None = None, origin_gguf: str | None = None, pre: str | None = None,
                eot_ids: set[int] | None = None) -> GgufVocab:
    """The GGUF vocabulary for an HF fast tokenizer and a model whose embedding has `n_vocab` rows.
    `origin_gguf`: the GGUF the tokenizer was converted from (its pre-tokenizer name is carried over); `pre`
    overrides the name; `eot_ids`: the template's end-of-turn control tokens."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise VocabExportError(f"tokenizer model {model.get('type')!r} cannot be exported to GGUF yet (BPE only)")
    tokens, added = _token_table(spec, n_vocab)
    merges = _merges(spec)
    special_ids = {name: getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "unk", "pad")}
    special_ids = {k: v for k, v in special_ids.items() if v is not None}
    enc = run_encoder(tokenizer)
    add_bos = bool(enc.prefix_ids) and enc.prefix_ids == [tokenizer.bos_token_id]
    if enc.prefix_ids and not add_bos:
        raise VocabExportError(f"the tokenizer adds {enc.prefix_text!r} before text; GGUF can only add BOS")
    if enc.suffix_ids:
        raise VocabExportError("the tokenizer adds tokens after text (EOS); GGUF exports expect none")
    eot = sorted(i for i in (eot_ids or set()) if i != tokenizer.eos_token_id)
    if eot:
        special_ids["eot"] = eot[0]

    if model.get("byte_fallback"):  # SentencePiece-style (Llama-2, Mistral): llama.cpp's "llama" model
        rank = {}
        for r, m in enumerate(merges):
            rank.setdefault(m.replace(" ", ""), r)
        # llama.cpp merges the adjacent pair whose result scores highest: minus the merge rank does what BPE does.
        scores = [-float(rank[t]) if t in rank else 0.0 for t in tokens]
        types = []
        for i, t in enumerate(tokens):
            if i == tokenizer.unk_token_id:
                types.append(gguf.TokenType.UNKNOWN)
            elif i in added:
                types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
            elif _BYTE_TOKEN.fullmatch(t):
                types.append(gguf.TokenType.BYTE)
            elif t.startswith("[PAD"):
                types.append(gguf.TokenType.UNUSED)
            else:
                types.append(gguf.TokenType.NORMAL)
        # No automatic word-boundary space: HF's SentencePiece tokenizers put "▁" only before the very start of the
        # input, llama.cpp's before the first text after BOS too, so "<s> [INST]" would get two. The exported chat
        # template writes that space itself (data/tokenize.py export_chat_template), which both then tokenize alike.
        return GgufVocab("llama", "default", tokens, [int(t) for t in types], scores, [], special_ids, add_bos, False)

    name = pre or _origin_pre(origin_gguf, tokens) or detect_pre(spec)
    if name is None:
        regex = [n["pattern"] for n in _walk(spec.get("pre_tokenizer")) if n.get("type") == "Split"]
        raise VocabExportError(f"no llama.cpp pre-tokenizer is known for this tokenizer's split rule {regex}; pass "
                               f"--pre-tokenizer NAME (a name llama.cpp knows, e.g. llama-bpe, qwen2, gpt-2)")
    types = []
    for i in range(len(tokens)):
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif tokens[i].startswith("[PAD") and tokens[i] not in model["vocab"]:
            types.append(gguf.TokenType.UNUSED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return GgufVocab("gpt2", name, tokens, [int(t) for t in types], None, merges, special_ids, add_bos, None)
