"""Prove that an export is the model that was trained, in every runtime that can load it.

    python -m eval.parity --model-path OUT --export OUT/model-q8_0.gguf [--data FILE] [--n 8] [--json report.json]

On a fixed set of conversations (the first `--n` of the training data recorded in OUT/chattune.json, or `--data`)
each runtime is compared with the trained model (loaded as serve.cli loads it) on:

(a) prompt ids: the runtime's own tokenizer and chat template applied to the messages, against training's
    `encode_prompt`; every prompt must be identical.
(b) next-token logits at every position of training's prompt ids: the largest absolute difference and top-1
    agreement. A position counts as agreeing when the runtime's top token is the model's, or scores within the
    outtype's tie tolerance of it in the model (a near tie is not a disagreement the export caused).
(c) the first 32 greedy tokens of each reply: identical, or the first difference falls on a near tie.

Runtimes: `transformers` (the GGUF loaded with `gguf_file=`, or an HF export directory), `llama.cpp`
(llama-cpp-python: its chat formatter, tokenizer and kernels) and `jinja2-sandboxed` (the exported
`chat_template` rendered by jinja2's sandbox, as vLLM and TGI render templates; prompt ids only). A runtime that is
not installed is reported as skipped, never as passed. Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# Per outtype: largest |logit difference| allowed (None: reported only), top-1 agreement required, the logit gap
# under which two tokens count as tied, and whether greedy replies must match (4-bit weights change some replies of
# a small model outright: reported, not gated). Set from the demo model's measurements (docs/export.md).
THRESHOLDS = {
    "f32": {"max_abs": 0.1, "top1": 0.99, "tie": 0.05, "greedy": True},
    "f16": {"max_abs": 0.25, "top1": 0.99, "tie": 0.1, "greedy": True},
    "bf16": {"max_abs": 1.0, "top1": 0.99, "tie": 0.5, "greedy": True},
    "q8_0": {"max_abs": None, "top1": 0.98, "tie": 0.5, "greedy": True},
    "q4_0": {"max_abs": None, "top1": 0.90, "tie": 1.5, "greedy": False},
}
FILE_TYPES = {0: "f32", 1: "f16", 32: "bf16", 7: "q8_0", 2: "q4_0"}


class ParityError(ValueError):
    pass


# --- runtimes -----------------------------------------------------------------------------------------

class TorchRuntime:
    """A transformers model: the trained model itself, or an export loaded by transformers."""

    def __init__(self, name: str, model, tokenizer=None):
        self.name, self.model, self.tokenizer = name, model, tokenizer

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
        return list(out)

    @torch.no_grad()
    def logits(self, ids: list[int]) -> np.ndarray:
        return self.model(torch.tensor([ids])).logits[0].float().numpy()

    @torch.no_grad()
    def greedy(self, ids: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
        from serve.generation import cache_kwarg, returned_cache

        arg = cache_kwarg(self.model)
        out = self.model(torch.tensor([ids]), use_cache=True)
        tokens, steps = [], []
        for _ in range(n):
            logits = out.logits[0, -1].float()
            steps.append(logits.numpy())
            tok = int(logits.argmax())
            tokens.append(tok)
            out = self.model(torch.tensor([[tok]]), use_cache=True, **{arg: returned_cache(out)})
        return tokens, steps

    def close(self) -> None:
        pass


class LlamaCppRuntime:
    """llama.cpp through llama-cpp-python: its Jinja chat formatter (what `create_chat_completion` uses for a
    GGUF's `tokenizer.chat_template`), its tokenizer and its CPU kernels."""

    def __init__(self, path: str, n_ctx: int, exact: bool = False):
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.name = "llama.cpp"
        # llama.cpp keeps its KV cache in f16 by default (what users run, kept for the other types); an f32 export
        # is compared with an f32 cache, so that f32 means the model's own numbers
        cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if exact else {}
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, logits_all=True, verbose=False, seed=0,
                                   n_threads=max(1, torch.get_num_threads()), **cache)
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ParityError(f"{path}: the GGUF has no tokenizer.chat_template")
        vocab = self.llm._model  # token text as llama-cpp-python itself resolves it for the formatter
        bos = vocab.token_get_text(self.llm.token_bos()) if self.llm.token_bos() >= 0 else ""
        eos = vocab.token_get_text(self.llm.token_eos()) if self.llm.token_eos() >= 0 else ""
        self.formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos,
                                             add_generation_prompt=True)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        result = self.formatter(messages=messages)
        return list(self.llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True))

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
        self.llm.reset()
        self.llm.eval(ids)
        tokens, steps = [], []
        for _ in range(n):
            logits = np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32)
            steps.append(logits)
            tok = int(logits.argmax())
            tokens.append(tok)
            self.llm.eval([tok])
        return tokens, steps

    def close(self) -> None:
        self.llm.close()


class SandboxedJinjaRuntime:
    """The exported chat_template rendered by jinja2's ImmutableSandboxedEnvironment (vLLM's and TGI's way), then
    tokenized without added special tokens, as those servers do for chat prompts."""

    name = "jinja2-sandboxed"

    def __init__(self, template: str, tokenizer):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self.template = env.from_string(template)
        self.tokenizer = tokenizer

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        def raise_exception(message):
            raise ValueError(message)

        text = self.template.render(messages=messages, add_generation_prompt=True, raise_exception=raise_exception,
                                    bos_token=self.tokenizer.bos_token or "", eos_token=self.tokenizer.eos_token or "")
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def close(self) -> None:
        pass


# --- comparison ---------------------------------------------------------------------------------------

@dataclass
class Check:
    name: str
    value: str
    limit: str
    ok: bool | None  # None: reported, not gated


@dataclass
class RuntimeReport:
    runtime: str
    status: str  # "passed" | "failed" | "skipped: why"
    checks: list[Check] = field(default_factory=list)


def _agree(ref: np.ndarray, got: np.ndarray, tie: float) -> np.ndarray:
    """Per position: the runtime's top token is the model's top token, or within `tie` of it in the model."""
    picked = got.argmax(-1)
    return ref[np.arange(len(ref)), picked] >= ref.max(-1) - tie


def compare(runtime, reference: TorchRuntime, prompts: list[tuple[list[dict], list[int]]], limits: dict,
            n_greedy: int, ref_cache: dict) -> RuntimeReport:
    report = RuntimeReport(runtime.name, "passed")
    try:
        runtime_ids = [runtime.prompt_ids(msgs) for msgs, _ in prompts]
    except Exception as e:  # noqa: BLE001 - a runtime that cannot build the prompt fails, with its reason
        report.checks.append(Check("builds the chat prompt", str(e).splitlines()[0][:160], "", False))
        report.status = "failed"
        return report
    same_ids = [got == ids for got, (_, ids) in zip(runtime_ids, prompts)]
    first_bad = next((i for i, ok in enumerate(same_ids) if not ok), None)
    report.checks.append(Check("prompt ids identical", f"{sum(same_ids)}/{len(prompts)}", "all",
                               all(same_ids)))
    if first_bad is not None:
        ids, got = prompts[first_bad][1], runtime_ids[first_bad]
        k = next((j for j, (a, b) in enumerate(zip(ids, got)) if a != b), min(len(ids), len(got)))
        report.checks.append(Check(f"first difference (prompt {first_bad}, token {k})",
                                   f"runtime {got[k:k + 4]}", f"training {ids[k:k + 4]}", False))
    if hasattr(runtime, "logits"):
        max_abs, agree, total, greedy_ok, greedy_same = 0.0, 0, 0, 0, 0
        for i, (_, ids) in enumerate(prompts):
            if i not in ref_cache:
                ref_cache[i] = (reference.logits(ids), *reference.greedy(ids, n_greedy))
            ref_logits, ref_tokens, ref_steps = ref_cache[i]
            got = runtime.logits(ids)
            max_abs = max(max_abs, float(np.abs(got - ref_logits).max()))
            a = _agree(ref_logits, got, limits["tie"])
            agree, total = agree + int(a.sum()), total + len(a)
            tokens, _ = runtime.greedy(ids, n_greedy)
            k = next((j for j, (x, y) in enumerate(zip(ref_tokens, tokens)) if x != y), None)
            if k is None:
                greedy_same += 1
                greedy_ok += 1
            elif ref_steps[k][ref_tokens[k]] - ref_steps[k][tokens[k]] <= limits["tie"]:
                greedy_ok += 1
        lim = limits["max_abs"]
        report.checks.append(Check("max |logit difference|", f"{max_abs:.4f}", "-" if lim is None else f"<= {lim}",
                                   None if lim is None else max_abs <= lim))
        report.checks.append(Check("top-1 agreement", f"{agree / total:.4f} ({agree}/{total})",
                                   f">= {limits['top1']}", agree / total >= limits["top1"]))
        report.checks.append(Check(f"first {n_greedy} greedy tokens", f"{greedy_same}/{len(prompts)} identical, "
                                   f"{greedy_ok - greedy_same} differ at a near tie",
                                   "all identical or near tie" if limits["greedy"] else "-",
                                   greedy_ok == len(prompts) if limits["greedy"] else None))
    if any(c.ok is False for c in report.checks):
        report.status = "failed"
    return report


# --- inputs -------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _metadata(path: str, mtime_ns: int) -> dict:
    import gguf

    fields = gguf.GGUFReader(path).fields  # parses every field, the vocabulary too: slow, so read once
    return {k: f.contents() for k, f in fields.items() if not k.startswith("tokenizer.ggml.")}


def gguf_metadata(path: str) -> dict:
    """A GGUF file's metadata (all but the vocabulary arrays), read once per file version."""
    return _metadata(str(path), Path(path).stat().st_mtime_ns)


def export_outtype(export: str) -> str:
    """The outtype a GGUF file was written with (its general.file_type), or the dtype of an HF export."""
    if Path(export).is_dir():
        cfg = json.loads((Path(export) / "config.json").read_text())
        dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
        return {"bfloat16": "bf16", "float16": "f16"}.get(dtype, "f32")
    code = int(gguf_metadata(export).get("general.file_type", 0))
    if code not in FILE_TYPES:
        raise ParityError(f"{export}: file type {code} has no parity thresholds (f32, f16, bf16, q8_0, q4_0 do)")
    return FILE_TYPES[code]


def conversations(data: list[str], n: int) -> list[list[dict]]:
    """The first `n` plain conversations (no tools) of the data, each cut before its last assistant reply."""
    from data.validate import load_conversations

    records, _ = load_conversations(data, on_bad_record="skip")
    out = []
    for rec in records:
        if rec.get("tools"):
            continue
        msgs = [{"role": m["role"], "content": m["content"]} for m in rec["messages"]
                if m["role"] in ("system", "user", "assistant") and isinstance(m.get("content"), str)]
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last:
            out.append(msgs[:last])
        if len(out) == n:
            break
    if not out:
        raise ParityError(f"no usable conversation (system/user/assistant text) in {', '.join(data)}")
    return out


def _transformers_limit(export: str) -> str | None:
    """Why transformers' GGUF loader cannot load this file correctly, for a limit of the loader (not the file)."""
    meta = gguf_metadata(export)
    arch = meta["general.architecture"]
    key_length = meta.get(f"{arch}.attention.key_length")
    if arch == "qwen3" and key_length is not None and key_length != 128:
        return ("transformers' GGUF loader reads no head_dim for qwen3 (attention.key_length) and assumes Qwen3's "
                f"128; this model's is {key_length}")
    return None


def _runtimes(export: str, tokenizer, n_ctx: int, only: set[str] | None):
    """(name, factory | None, why skipped) for every runtime that could load the export; the caller builds each
    runtime, so one that fails to load is reported as that runtime's failure."""
    export_path = Path(export)

    def wanted(name: str) -> bool:
        return only is None or name in only

    if export_path.is_dir():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if wanted("transformers"):
            yield "transformers", lambda: TorchRuntime("transformers", AutoModelForCausalLM.from_pretrained(
                export, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(export)), ""
        template = AutoTokenizer.from_pretrained(export).chat_template
    else:
        template = gguf_metadata(export).get("tokenizer.chat_template")
        if wanted("transformers"):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            def load_transformers():
                # the file alone in a directory: next to a training output's tokenizer files, transformers would
                # read those instead of the GGUF's own tokenizer and template
                alone = Path(tempfile.mkdtemp(prefix="parity-"))
                (alone / export_path.name).symlink_to(export_path.resolve())
                try:
                    model = AutoModelForCausalLM.from_pretrained(alone, gguf_file=export_path.name,
                                                                 dtype=torch.float32).eval()
                    tok = AutoTokenizer.from_pretrained(alone, gguf_file=export_path.name)
                finally:
                    shutil.rmtree(alone, ignore_errors=True)
                return TorchRuntime("transformers", model, tok)

            limit = _transformers_limit(export)
            yield "transformers", (None if limit else load_transformers), limit or ""
        if wanted("llama.cpp"):
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                yield "llama.cpp", None, "llama-cpp-python is not installed (make llama-cpp builds and installs it)"
            else:
                yield "llama.cpp", lambda: LlamaCppRuntime(export, n_ctx, export_outtype(export) == "f32"), ""
    if wanted("jinja2-sandboxed"):
        if not template:
            raise ParityError(f"{export}: the export carries no chat_template")
        yield "jinja2-sandboxed", lambda: SandboxedJinjaRuntime(template, tokenizer), ""


def run(model_path: str, export: str, data: list[str] | None = None, n: int = 8, n_greedy: int = 32,
        base_model_path: str | None = None, runtimes: set[str] | None = None) -> list[RuntimeReport]:
    from data.tokenize import encode_prompt
    from eval.loss import read_record
    from serve.loading import load_for_chat

    if not Path(export).exists():
        raise ParityError(f"--export {export}: no such file or directory")
    _, record = read_record(model_path)
    data = data or record.get("flags", {}).get("data_path")
    if not data:
        raise ParityError(f"{model_path}: no training data recorded in chattune.json; pass --data FILE")
    limits = THRESHOLDS[export_outtype(export)]
    loaded = load_for_chat(model_path, base_model_path, load_4bit=record.get("mode") == "qlora")
    reference = TorchRuntime("trained model", loaded.model, loaded.tokenizer)
    prompts = [(msgs, encode_prompt(msgs, loaded.tokenizer, loaded.template)) for msgs in conversations(data, n)]
    n_ctx = max(len(ids) for _, ids in prompts) + n_greedy + 8
    reports, cache = [], {}
    for name, factory, why in _runtimes(export, loaded.tokenizer, n_ctx, runtimes):
        if factory is None:
            reports.append(RuntimeReport(name, f"skipped: {why}"))
            continue
        try:
            runtime = factory()
        except Exception as e:  # noqa: BLE001 - any load error is this runtime's failure, reported, not raised
            line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            reports.append(RuntimeReport(name, "failed", [Check("loads the export", line[:160], "", False)]))
            continue
        try:
            reports.append(compare(runtime, reference, prompts, limits, n_greedy, cache))
        finally:
            runtime.close()
    return reports


def format_reports(reports: list[RuntimeReport], export: str) -> str:
    lines = [f"parity of {export} with the trained model"]
    for rep in reports:
        lines.append(f"\n[{rep.runtime}] {rep.status.upper() if rep.status in ('passed', 'failed') else rep.status}")
        for c in rep.checks:
            mark = {True: "ok  ", False: "FAIL", None: "    "}[c.ok]
            lines.append(f"  {mark} {c.name:<44} {c.value:<34} {c.limit}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", required=True, help="what training wrote (full model, adapter or merged)")
    ap.add_argument("--export", required=True, help="the exported .gguf file or HF directory")
    ap.add_argument("--base-model-path", help="base model for a LoRA adapter (default: from adapter_config.json)")
    ap.add_argument("--data", nargs="+", help="conversations to compare on (default: the training data)")
    ap.add_argument("--n", type=int, default=8, help="how many conversations (default 8)")
    ap.add_argument("--greedy-tokens", type=int, default=32)
    ap.add_argument("--runtimes", help="comma-separated subset of transformers,llama.cpp,jinja2-sandboxed")
    ap.add_argument("--json", help="also write the report as JSON here")
    args = ap.parse_args(argv)
    try:
        reports = run(args.model_path, args.export, args.data, args.n, args.greedy_tokens, args.base_model_path,
                      set(args.runtimes.split(",")) if args.runtimes else None)
    except (ParityError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_reports(reports, args.export))
    if args.json:
        Path(args.json).write_text(json.dumps([{"runtime": r.runtime, "status": r.status,
                                                 "checks": [c.__dict__ for c in r.checks]} for r in reports],
                                               indent=2) + "\n")
    failed = [r.runtime for r in reports if r.status == "failed"]
    print(f"\nparity: {'FAILED in ' + ', '.join(failed) if failed else 'passed'} "
          f"({sum(r.status == 'passed' for r in reports)} passed, {len(failed)} failed, "
          f"{sum(r.status.startswith('skipped') for r in reports)} skipped)")
    return 1 if failed else 0


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(main())
