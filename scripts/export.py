"""Export what training wrote for the runtimes people use, and prove it is the trained model.

    python scripts/export.py --model-path OUT --format gguf --outtype q8_0 [--output FILE] [--ollama] [--no-check]
    python scripts/export.py --model-path OUT --format hf [--output DIR] [--dtype bf16]

`--model-path`: a training output (full model, LoRA/QLoRA adapter, merged model), a checkpoint
(`OUT/checkpoint-N`) or any HF/`.gguf`/`asset:` model. Adapters are merged into their base on the way (a QLoRA base
first goes through the NF4 quantization training saw). Both formats stream tensor by tensor.

- `gguf` (llama.cpp, Ollama, LM Studio): one file with the tokenizer and the training template as
  `tokenizer.chat_template`; `--outtype f32|f16|bf16|q8_0|q4_0`. `--ollama` also writes a `Modelfile` next to it
  (`ollama create NAME -f Modelfile`).
- `hf`: a merged safetensors model directory with the tokenizer and chattune.json.

After writing, the parity gate (`python -m eval.parity`) compares the export with the trained model in every
runtime installed; the command fails when the gate fails. `--no-check` skips it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from data.assets import resolve_source
from data.templates import TEMPLATE_NAMES, recorded_template
from data.tokenizer import load_tokenizer
from train.export_gguf import OUTTYPES, write_gguf
from train.export_sources import ExportError, Source, open_weights


def origin_gguf(source: Source, record: dict, model_path: str) -> str | None:
    """The GGUF the run's tokenizer was converted from, if any (its pre-tokenizer name is carried over)."""
    flags = record.get("flags", {})
    for candidate in (flags.get("tokenizer_name_or_path"), record.get("base_model"),
                      record.get("merged_from", {}).get("base"), source.base, model_path):
        if candidate:
            path = resolve_source(str(candidate))
            if path.endswith(".gguf") and Path(path).is_file():
                return path
    return None


def write_hf(source: Source, tokenizer, template: str, out: Path, dtype: str) -> Path:
    """A merged HF model directory, streamed (train/export.py's writer), with the training template."""
    from data.tokenize import export_chat_template
    from train.export import save_safetensors_streamed

    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "f16": torch.float16}[dtype]
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in source.weights.names if not n.endswith(".rotary_emb.inv_freq")]
    spec = [(n, source.weights.shape(n), torch_dtype) for n in names]
    save_safetensors_streamed(out, spec, ((n, source.weights.load(n).to(torch_dtype)) for n in names))
    cfg = source.weights.config
    cfg.dtype = torch_dtype
    cfg.save_pretrained(out)
    recorded = tokenizer.chat_template  # the caller's tokenizer is left as it was (the gate reuses it)
    tokenizer.chat_template = export_chat_template(template, tokenizer)
    try:
        tokenizer.save_pretrained(out)
    finally:
        tokenizer.chat_template = recorded
    record = dict(source.record)
    record.update({"template": template, "mode": "merged" if source.kind != "full" else record.get("mode", "full"),
                   "exported_from": {"path": str(source.tokenizer_dir), "kind": source.kind, "base": source.base}})
    (out / "chattune.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def default_output(model_path: str, fmt: str, outtype: str) -> Path:
    path = Path(resolve_source(model_path))
    if not path.is_dir():
        raise ExportError(f"--model-path {model_path} is not a directory; pass --output")
    home = path.parent if (path / "trainer_state.json").is_file() else path  # a checkpoint: next to it, in OUT
    stem = path.name if home == path else f"{home.name}-{path.name}"
    return home / (f"{stem}-{outtype}.gguf" if fmt == "gguf" else f"{stem}-merged")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", required=True, help="training output, checkpoint-N, HF model, .gguf or asset:NAME")
    ap.add_argument("--format", choices=["gguf", "hf"], default="gguf")
    ap.add_argument("--outtype", choices=list(OUTTYPES), default="q8_0", help="GGUF tensor type (default q8_0)")
    ap.add_argument("--dtype", choices=["bf16", "fp32", "f16"], default="bf16", help="HF export dtype")
    ap.add_argument("--output", help="file (gguf) or directory (hf); default: inside --model-path")
    ap.add_argument("--base-model-path", help="base model of an adapter or checkpoint (default: as recorded)")
    ap.add_argument("--template", choices=TEMPLATE_NAMES, help="chat template (default: the one training recorded)")
    ap.add_argument("--pre-tokenizer", help="llama.cpp pre-tokenizer name, when it cannot be inferred")
    ap.add_argument("--ollama", action="store_true", help="also write an Ollama Modelfile next to the GGUF")
    ap.add_argument("--system", help="default system prompt for the Modelfile (SYSTEM)")
    ap.add_argument("--no-check", action="store_true", help="skip the parity gate after writing")
    ap.add_argument("--data", nargs="+", help="conversations for the parity gate (default: the training data)")
    args = ap.parse_args(argv)
    if args.ollama and args.format != "gguf":
        ap.error("--ollama needs --format gguf")
    try:
        source = open_weights(args.model_path, args.base_model_path)
        tokenizer = load_tokenizer(source.tokenizer_dir)
        template = recorded_template(args.template, source.record.get("template"), tokenizer, args.model_path,
                                     "--template")
        out = Path(args.output) if args.output else default_output(args.model_path, args.format, args.outtype)
        if args.format == "gguf":
            out.parent.mkdir(parents=True, exist_ok=True)
            write_gguf(source, tokenizer, template, out, args.outtype, name=Path(args.model_path).name,
                       pre=args.pre_tokenizer, origin_gguf=origin_gguf(source, source.record, args.model_path))
            print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {args.outtype})")
            if args.ollama:
                from data.ollama import write_modelfile

                modelfile = write_modelfile(out.parent, out, template, tokenizer, args.system)
                print(f"wrote {modelfile}: ollama create {out.stem} -f {modelfile}")
        else:
            if out.exists() and any(out.iterdir()):
                raise ExportError(f"--output {out} exists and is not empty")
            write_hf(source, tokenizer, template, out, args.dtype)
            print(f"wrote {out} (merged HF model, {args.dtype})")
    except (ExportError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.no_check:
        return 0
    return _gate(args, out, source, tokenizer, template)


def _gate(args, out: Path, source: Source, tokenizer, template: str) -> int:
    from eval import parity

    reference = args.model_path
    if source.kind == "checkpoint":
        print("parity: a checkpoint is compared through its HF export (the gate loads models as serve.cli does)")
        reference = str(out.with_name(out.stem + "-reference-hf"))
        shutil.rmtree(reference, ignore_errors=True)
        write_hf(source, tokenizer, template, Path(reference), "fp32")
    try:
        reports = parity.run(reference, str(out), args.data, base_model_path=args.base_model_path)
    except (parity.ParityError, ValueError, OSError) as e:
        print(f"error: parity gate: {e}", file=sys.stderr)
        return 1
    print(parity.format_reports(reports, str(out)))
    failed = [r.runtime for r in reports if r.status == "failed"]
    skipped = [r.runtime for r in reports if r.status.startswith("skipped")]
    if failed:
        print(f"\nparity gate FAILED in {', '.join(failed)}: {out} does not behave like the trained model", file=sys.stderr)
        return 1
    print(f"\nparity gate passed ({len(reports) - len(skipped)} runtime(s)"
          + (f"; skipped: {', '.join(skipped)}" if skipped else "") + ")")
    return 0


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(main())
