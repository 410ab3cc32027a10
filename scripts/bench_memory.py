"""Per-rank peak host memory of sharded training: load + one optimizer step, FSDP2 and ZeRO-3, full and LoRA.

    python scripts/bench_memory.py [--params 0.5e9] [--backends fsdp zero3] [--modes full lora] [--nproc 2]

For each backend × mode, runs the real `train/train.py` under `torchrun --nproc_per_node=N` (gloo, CPU,
fp32) twice — on a random Llama of about `--params` parameters and on a tiny one with the same vocab —
and prints each rank's peak RSS after the first optimizer step (load + step), the peak of the final export
phase, and the growth from the tiny run to the big one as a multiple of the big model's fp32 size S. That growth is what the model costs each rank; the tiny run carries the fixed cost of Python,
torch, DeepSpeed and the data. Targets (docs/design.md §3, issue 11), for LoRA: a rank that does not load
grows ≤ 0.7 S, the loading rank (0) ≤ 1.6 S. A full fine-tune also holds its shard of the fp32
gradients and of AdamW's two moments (≈ 3 S / N per rank more), which no sharding scheme avoids.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from train.host_memory import hwm_mb, reset_hwm

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo" / "chattune_demo.jsonl"
BACKENDS = {"single": [], "fsdp": ["--fsdp", "full_shard auto_wrap"], "zero3": ["--deepspeed", str(ROOT / "ds_configs" / "zero3.json")],
            "zero2": ["--deepspeed", str(ROOT / "ds_configs" / "zero2.json")]}
MODES = {"full": [], "lora": ["--lora", "True", "--lora_dropout", "0"], "qlora": ["--q_lora", "True", "--lora_dropout", "0"]}


def worker(argv: list[str]) -> int:
    """Runs inside torchrun: train.main with the peak RSS recorded per phase — the load (until the training loop),
    each step's forward, backward and optimizer step — and the peak of the final export alone. A phase's peak is
    the kernel's high-water mark (VmHWM) at its end, which is then reset to the current RSS (this resets
    getrusage's peak too), so the next phase starts from what is really held."""
    import train.loop as loop_module
    import train.train as recipe

    record: dict = {"phases": []}

    def mark(name: str) -> None:
        record["phases"].append([name, hwm_mb()])
        reset_hwm()

    loop, export, make_backend = recipe.train_loop, recipe.export_model, recipe.make_backend
    forward, accumulate = loop_module.token_loss_sum, loop_module.accumulate_gradients

    def measured_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        mark("forward")
        return out

    def measured_accumulate(*args, **kwargs):
        out = accumulate(*args, **kwargs)
        mark("backward")
        return out

    def measured_backend(*args, **kwargs):
        backend = make_backend(*args, **kwargs)
        step = backend.optimizer_step

        def measured_step(*a, **k):
            out = step(*a, **k)
            mark("optimizer")
            return out

        backend.optimizer_step = measured_step
        return backend

    def measured_loop(**kwargs):
        mark("load")
        record["before_loop_mb"] = record["phases"][-1][1]  # load + shard: the peak so far
        state = loop(**kwargs)
        mark("after loop")
        record["step_mb"] = max(mb for _, mb in record["phases"])  # the whole run's peak up to here
        return state

    def measured_export(*args, **kwargs):
        mark("before export")
        record["before_export_mb"] = record["phases"][-1][1]
        return export(*args, **kwargs)

    recipe.train_loop, recipe.export_model, recipe.make_backend = measured_loop, measured_export, measured_backend
    loop_module.token_loss_sum, loop_module.accumulate_gradients = measured_forward, measured_accumulate
    rc = recipe.main(argv)
    record["export_peak_mb"] = hwm_mb()
    record["final_mb"] = max(record.get("before_export_mb", 0.0), record["export_peak_mb"])  # the whole run's peak
    Path(os.environ["BENCH_MEMORY_OUT"], f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(record))
    return rc


def make_model(out: Path, params: float, tokenizer, hidden: int = 1024, inter: int = 2816, heads: int = 16,
               kv_heads: int = 16) -> tuple[str, int]:
    """A random Llama (by default hidden 1024, MHA, SwiGLU 2816; tied embeddings) with as many layers as reach
    `params`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = len(tokenizer)
    kv = hidden // heads * kv_heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params - vocab * hidden) / per_layer))
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                      tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if not (out / "config.json").is_file():
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        del model
    return str(out), vocab * hidden + layers * per_layer + hidden  # tied embeddings counted once


def run_case(model: str, backend: str, mode: str, nproc: int, port: int, work: Path,
             extra: list[str] = ()) -> dict[int, dict]:
    out_dir = work / "out"
    measures = work / "rss"
    measures.mkdir(parents=True, exist_ok=True)
    for f in measures.glob("*.json"):
        f.unlink()
    args = ["--model_name_or_path", model, "--data_path", str(DEMO), "--output_dir", str(out_dir), "--template", "chatml",
            "--model_max_length", "64", "--per_device_train_batch_size", "1", "--max_steps", "1",
            "--save_strategy", "no", "--learning_rate", "1e-5", *BACKENDS[backend], *MODES[mode], *extra]
    env = {**os.environ, "BENCH_MEMORY_OUT": str(measures), "CHATTUNE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           str(Path(__file__).resolve()), "--worker", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{backend}/{mode} on {model} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return {int(f.stem[4:]): json.loads(f.read_text()) for f in measures.glob("rank*.json")}


def main() -> int:
    if "--worker" in sys.argv:
        argv = sys.argv[1:]
        argv.remove("--worker")
        return worker(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=0.5e9, help="size of the big random model (parameters)")
    ap.add_argument("--backends", nargs="+", default=["fsdp", "zero3"], choices=sorted(BACKENDS))
    ap.add_argument("--modes", nargs="+", default=["full", "lora"], choices=sorted(MODES))
    ap.add_argument("--nproc", type=int, default=2, help="ranks (processes)")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "chattune-bench-memory"),
                    help="where the random models are kept between runs")
    ap.add_argument("--gradient_checkpointing", action="store_true",
                    help="train with --gradient_checkpointing True (activations: one layer input per layer)")
    ap.add_argument("--json", help="also write the table as JSON here")
    args = ap.parse_args()

    from data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("asset:smollm2")
    cache = Path(args.cache)
    big, n_big = make_model(cache / f"llama-{args.params:.2g}", args.params, tokenizer)
    from scripts.tiny_model import make_tiny_llama

    tiny = cache / "tiny"
    if not (tiny / "config.json").is_file():
        make_tiny_llama(tiny, tokenizer)
    size_mb = n_big * 4 / 2**20
    extra = ["--gradient_checkpointing", "True"] if args.gradient_checkpointing else []
    print(f"big model: {n_big / 1e6:.0f}M parameters, fp32 size S = {size_mb:,.0f} MB; {args.nproc} ranks, gloo, fp32, "
          f"gradient checkpointing {'on' if extra else 'off'}")
    rows = []
    port = 29800
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends:
            for mode in args.modes:
                port += 1
                small = run_case(str(tiny), backend, mode, args.nproc, port, Path(tmp) / "tiny", extra)
                port += 1
                large = run_case(big, backend, mode, args.nproc, port, Path(tmp) / "big", extra)
                for rank in sorted(large):
                    growth = large[rank]["step_mb"] - small[rank]["step_mb"]
                    export_growth = large[rank]["export_peak_mb"] - small[rank]["export_peak_mb"]
                    target = (1.6 if rank == 0 else 0.7) if mode == "lora" else None
                    rows.append({"backend": backend, "mode": mode, "rank": rank, "tiny_mb": small[rank]["step_mb"],
                                 "big_mb": large[rank]["step_mb"], "growth_mb": growth, "growth_S": growth / size_mb,
                                 "export_peak_S": export_growth / size_mb,
                                 "target_S": target})
                    r = rows[-1]
                    r["load_growth_S"] = (large[rank]["before_loop_mb"] - small[rank]["before_loop_mb"]) / size_mb
                    verdict = "" if target is None else ("ok" if r["growth_S"] <= target else "OVER")
                    print(f"{backend:6} {mode:5} rank {rank}: peak {r['tiny_mb']:7,.0f} MB (tiny) → {r['big_mb']:7,.0f} MB "
                          f"(big); growth {growth:7,.0f} MB = {r['growth_S']:.2f} S (the final export peaks at "
                          f"{r['export_peak_S']:.2f} S; after load {r['load_growth_S']:.2f} S)"
                          f"{f'; target ≤ {target} S: {verdict}' if target else ''}",
                          flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"params": n_big, "S_mb": size_mb, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(main())
