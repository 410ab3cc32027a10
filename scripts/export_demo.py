"""`make export-demo`: the demo's fine-tuned model exported to GGUF (f16 and q8_0) and proven in every runtime.

1. trains the demo model first if `outputs/demo` has none (`make demo`'s run),
2. exports it as f16 and q8_0 GGUF files with an Ollama Modelfile (scripts/export.py),
3. runs the parity gate on each (eval.parity) and requires every runtime, llama.cpp included, to pass — a
   skipped runtime fails this check (install llama.cpp with `make llama-cpp`),
4. asks the 7 held-out questions through serve.cli's loader and through llama.cpp on each file, and requires
   llama.cpp to answer as many correctly,
5. runs the gate in every runtime on tiny random models of each tokenizer family we export (SentencePiece
   Llama-2 with the llama-2 and vicuna templates, Llama-3, Qwen2, SmolLM2) and of each architecture (llama,
   mistral, qwen2, qwen3, gemma2, gemma3), since llama.cpp has its own tokenizer and model code for each: the suite
   checks these in transformers only.

    python scripts/export_demo.py [--output_dir outputs/demo] [--outtypes f16 q8_0]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output_dir", default=str(ROOT / "outputs" / "demo"))
    ap.add_argument("--outtypes", nargs="+", default=["f16", "q8_0"])
    args = ap.parse_args()
    from eval import parity
    from eval.identity import load_spec, print_report, run_identity_eval, run_identity_eval_llama_cpp
    from scripts import export
    from serve.loading import load_for_chat

    torch.set_num_threads(os.cpu_count() or 1)
    out = Path(args.output_dir)
    if not (out / "chattune.json").is_file():
        print(f"== no trained demo model in {out}: training it (scripts/demo.py)", flush=True)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--output_dir", str(out)], check=True)
    items = load_spec(ROOT / "data" / "demo" / "heldout_identity.json")
    served = run_identity_eval(load_for_chat(str(out)), items)
    print_report(served, f"{out} through serve.cli's loader (transformers)")
    ok, rows = True, [("serve.cli (transformers)", "-", served["correct"], served["well_formed"])]
    for outtype in args.outtypes:
        path = out / f"{out.name}-{outtype}.gguf"
        print(f"\n== exporting {path}", flush=True)
        if export.main(["--model-path", str(out), "--outtype", outtype, "--output", str(path), "--ollama",
                        "--no-check"]) != 0:
            return 1
        reports = parity.run(str(out), str(path), n=16)
        print(parity.format_reports(reports, str(path)), flush=True)
        gate = all(r.status == "passed" for r in reports)
        ok &= gate
        answered = run_identity_eval_llama_cpp(str(path), items)
        print_report(answered, f"{path.name} through llama.cpp")
        ok &= answered["correct"] >= served["correct"]
        rows.append((f"llama.cpp {outtype} ({path.stat().st_size / 1e6:.0f} MB)", "passed" if gate else "FAILED",
                     answered["correct"], answered["well_formed"]))
    matrix = tokenizer_matrix(out.parent / f"{out.name}-tokenizers")
    ok &= all(status == "passed" for _, status in matrix)
    print(f"\n{'runtime':<34} {'parity gate':<12} {'facts':<6} well formed")
    for name, gate, correct, formed in rows:
        print(f"{name:<34} {gate:<12} {correct}/{served['total']:<4} {formed}/{served['total']}")
    print(f"\n{'tokenizer + template (tiny model, f16)':<46} parity gate: transformers, llama.cpp, jinja2-sandboxed")
    for name, status in matrix:
        print(f"{name:<46} {status}")
    print("\nexport-demo: " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


FAMILIES = [("llama-spm", "llama-2", "llama"), ("llama-spm", "vicuna_v1.1", "mistral"), ("llama-bpe", "llama-3", "llama"),
            ("qwen2", "chatml", "qwen2"), ("smollm2", "chatml", "llama"), ("smollm2", "chatml", "qwen3"),
            ("smollm2", "zephyr", "gemma2"), ("smollm2", "chatml", "gemma3")]


def tokenizer_matrix(work: Path) -> list[tuple[str, str]]:
    """(family, gate result over all runtimes) for a tiny random model of each tokenizer family."""
    import shutil

    from data.assets import resolve_source
    from data.tokenizer import load_tokenizer
    from eval import parity
    from scripts.tiny_model import make_tiny_model
    from train.export_gguf import write_gguf
    from train.export_sources import open_weights

    data = [str(ROOT / "data" / "demo" / "chattune_demo.jsonl")]
    rows = []
    for tok_name, template, arch in FAMILIES:
        tok = load_tokenizer(f"asset:{tok_name}")
        model = Path(make_tiny_model(work / f"{tok_name}-{template}", arch, tok, scale=8.0, template=template,
                                     data=data))
        path = write_gguf(open_weights(str(model)), tok, template, model.with_suffix(".gguf"), "f16",
                          origin_gguf=resolve_source(f"asset:{tok_name}"))
        reports = parity.run(str(model), str(path), n=8, n_greedy=16)
        print(parity.format_reports(reports, str(path)), flush=True)
        statuses = {r.runtime: r.status for r in reports}
        passed = len(statuses) == 3 and all(v == "passed" for v in statuses.values())
        rows.append((f"{tok_name} + {template} ({arch})", "passed" if passed else f"FAILED {statuses}"))
    shutil.rmtree(work, ignore_errors=True)
    return rows


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(main())
