"""Training throughput on CPU: chattune (packing, dynamic padding), TRL's SFTTrainer, FastChat-style padding.

    python scripts/bench_train.py [--models smollm2 tiny] [--steps 4] [--max_length 512]
    python scripts/bench_train.py --attention_scaling [--max_length 2048]
    pip install -e '.[bench]'   # TRL, for the `trl` rows (skipped with a note when it is missing)

Modes: `packing` is what `--packing True` trains (one row with cu_seq_lens, attention per sample:
train/attention.py); `packing_dense` is the same rows with a dense 4D block-diagonal mask over the whole row
(chattune before issue 23); `dynamic` pads each batch to its longest sample; `pad_to_max` pads every sample
to `--max_length` (FastChat). `trl` is TRL's `SFTTrainer` on the same conversations: assistant-only loss
(`assistant_only_loss=True`; TRL swaps in a ChatML training template with generation markers), packing with
its best-fit-decreasing padding-free rows of `--max_length`, one row per step (on SDPA its packed samples
attend to each other: faster than right, not right); `trl_padded` is TRL without packing, `--batch` samples
per step padded to the longest. Both sides: same optimizer (fused AdamW), precision, clipping at 1.0, no
gradient checkpointing. TRL's time per step is measured from step begin to step end (forward, backward,
optimizer) with a TrainerCallback.

`--attention_scaling` times forward + backward of one row of `--max_length` tokens filled with samples of
length s (s = max_length/16 … max_length), per-sample attention against the dense mask: the per-sample cost
grows with Σ s² = max_length · s, the dense mask's stays at max_length² whatever the samples.

For each model and batching mode, in a fresh process (so peak RSS is per mode), runs warm-up + N
optimizer steps of the real loop pieces (collator, chunked token-normalized loss, AdamW; bf16 autocast where this
CPU computes bf16 natively, else fp32 — train/precision.py, as `--bf16 True` does) on the
embedded demo dataset and prints: tokens/s (non-pad), supervised tokens/s, useful-token fraction
(non-pad / processed), peak RSS, and MFU = model FLOPs on non-pad tokens / the matmul peak of the dtype
actually used, measured here (2048² products).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("packing", "packing_dense", "trl", "trl_padded", "dynamic", "pad_to_max")
WARMUP = 2  # first steps allocate optimizer state and fault in memory


def load_model(model_name: str, vocab: int, attention: str = "sdpa"):
    import torch

    torch.manual_seed(0)
    if model_name == "smollm2":
        from train.modeling import load_causal_lm

        return load_causal_lm("asset:smollm2", attn_implementation=attention)
    from transformers import AutoModelForCausalLM, LlamaConfig

    return AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=768,
                                                        num_hidden_layers=4, num_attention_heads=8,
                                                        num_key_value_heads=4), attn_implementation=attention)


def run_trl(model_name: str, steps: int, max_length: int, packing: bool = True, batch: int = 8) -> dict:
    """TRL SFTTrainer (assistant-only loss; packed rows, or `batch` padded samples) on the demo conversations,
    timed per optimizer step."""
    import tempfile
    import time

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from data.records import Tally, read_records, valid_conversations
    from data.tokenizer import load_tokenizer
    from train.precision import resolve_precision

    tok = load_tokenizer("asset:smollm2")
    tok.chat_template = TRL_CHATML
    rows = read_records(str(ROOT / "data" / "demo" / "chattune_demo.jsonl"))  # the same conversations chattune reads
    conversations = [{"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}
                     for _, msgs in valid_conversations(rows, Tally("bench"))]
    model = load_model(model_name, len(tok))
    precision = resolve_precision("true", False, torch.device("cpu"))
    seen = new_tally()
    n_params = matmul_params(model)

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step > WARMUP:
                seen["elapsed"] += time.perf_counter() - self.t
                seen["steps"] += 1

    class Counting(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.state.global_step >= WARMUP:
                mask = inputs.get("attention_mask")
                real = int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())  # padding-free: all
                seen["real"] += real
                seen["processed"] += int(inputs["input_ids"].numel())
                seen["sup"] += int((inputs["labels"] != -100).sum())
                if mask is not None:
                    lengths = mask.sum(dim=1).tolist()
                elif inputs.get("position_ids") is not None:  # padding-free rows: samples restart positions at 0
                    starts = (inputs["position_ids"][0] == 0).nonzero().flatten().tolist() + [real]
                    lengths = [b - a for a, b in zip(starts[:-1], starts[1:])]
                else:
                    lengths = [real]
                seen["flops"] += real * flops_per_token(model.config, n_params, useful_context(lengths))
            return super().training_step(model, inputs, num_items_in_batch)

    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, max_length=max_length, packing=packing, assistant_only_loss=True,
                         per_device_train_batch_size=1 if packing else batch, gradient_accumulation_steps=1,
                         max_steps=steps + WARMUP,
                         learning_rate=1e-5, optim="adamw_torch_fused", lr_scheduler_type="constant",
                         # alike on both sides: no activation recomputation, clipping at chattune's default norm
                         gradient_checkpointing=False, max_grad_norm=1.0,
                         bf16=precision.name == "bf16", use_cpu=True, report_to="none", save_strategy="no",
                         logging_strategy="no", dataloader_num_workers=0, dataset_num_proc=1, seed=0)
        trainer = Counting(model=model, args=args, train_dataset=Dataset.from_list(conversations),
                           processing_class=tok, callbacks=[Timer()])
        trainer.train()
    return summarize(model_name, "trl" if packing else "trl_padded", n_params, precision.name, seen)


def new_tally() -> dict:
    """What a run adds up over its measured (post-warm-up) steps."""
    return {"real": 0, "processed": 0, "sup": 0, "flops": 0.0, "elapsed": 0.0, "steps": 0}


def summarize(model_name: str, mode: str, n_params: int, precision: str, seen: dict) -> dict:
    elapsed = max(seen["elapsed"], 1e-9)
    return {"model": model_name, "mode": mode, "params": n_params, "precision": precision, "steps": seen["steps"],
            "tokens_per_s": seen["real"] / elapsed, "supervised_tokens_per_s": seen["sup"] / elapsed,
            "useful_fraction": seen["real"] / max(seen["processed"], 1), "achieved_flops": seen["flops"] / elapsed,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "processed_tokens_per_step": seen["processed"] / max(seen["steps"], 1)}


def matmul_peak(dtype, n: int = 2048, reps: int = 10) -> float:
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


# ChatML as chattune's `chatml` template renders it, with TRL's generation markers around what chattune
# supervises (each reply and its <|im_end|>); TRL cannot patch SmolLM2's own template for assistant-only loss
TRL_CHATML = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}{%- else %}{{ message['content'] + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}")


def matmul_params(model) -> int:
    """Parameters that take part in matmuls: all but an untied input embedding (a lookup costs no FLOPs)."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    n = sum(p.numel() for p in model.parameters())
    return n if head is not None and head.weight is embed.weight else n - embed.weight.numel()


def flops_per_token(config, n_params: int, seq: float) -> float:
    # 6N for the dense part (forward + backward) plus attention scores/values: 12 · layers · hidden · seq, where seq
    # is the context a token attends to usefully: its sample's length, not a packed row's (useful_context)
    return 6 * n_params + 12 * config.num_hidden_layers * config.hidden_size * seq


def useful_context(sample_lengths) -> float:
    """The mean attention context per token over a batch's samples: Σ len² / Σ len (attention within samples is
    the useful work; a packed row's cross-sample scores are not, whether or not a kernel computes them)."""
    lengths = [int(n) for n in sample_lengths if int(n) > 0]
    return sum(n * n for n in lengths) / max(sum(lengths), 1)


def run_one(model_name: str, mode: str, steps: int, max_length: int, batch: int) -> dict:
    if mode in ("trl", "trl_padded"):
        return run_trl(model_name, steps, max_length, packing=mode == "trl", batch=batch)
    import torch

    from data.dataset import DataConfig, build_dataset
    from data.tokenizer import load_tokenizer
    from train.attention import register
    from train.backends import Backend
    from train.collate import collate_packed, collate_padded
    from train.distributed import DistInfo
    from train.loop import accumulate_gradients
    from train.loss import install as install_chunked_loss
    from train.precision import resolve_precision
    from train.sampler import PlanConfig, plan_epoch

    torch.manual_seed(0)
    tok = load_tokenizer("asset:smollm2")
    ds, _, _ = build_dataset(ROOT / "data" / "demo" / "chattune_demo.jsonl", tok,
                             DataConfig(template="chatml", max_length=max_length), verbose=False)
    samples = ds.select_columns(["input_ids", "labels"]).to_list()
    packed = mode.startswith("packing")
    model = load_model(model_name, len(tok), register() if mode == "packing" else "sdpa")  # as model_setup does
    install_chunked_loss(model)  # as train/model_setup.py does
    model.train()
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    precision = resolve_precision("true", False, info.device)
    plan = plan_epoch([len(s["input_ids"]) for s in samples], 0,
                      PlanConfig(batch_size=1 if packed else batch, packing=packed, max_length=max_length, seed=0))
    if packed:
        batches = [collate_packed([[samples[i] for i in u] for u in mb], tok.pad_token_id, precision.compute_dtype,
                                  varlen=mode == "packing") for mb in plan]
    else:
        pad_to = max_length if mode == "pad_to_max" else None
        batches = [collate_padded([samples[u[0]] for u in mb], tok.pad_token_id, pad_to) for mb in plan]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)  # what train/optim.py uses
    backend = Backend(info)
    n_params = matmul_params(model)
    seen = new_tally()
    for k, b in enumerate(batches[: steps + WARMUP]):
        t = time.perf_counter()
        _, n_sup = accumulate_gradients(model, [b], backend, info, precision.autocast_dtype)
        backend.optimizer_step(model, opt, 1.0, True)  # clips at --max_grad_norm's default, as TRL's side does
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        if k < WARMUP:
            continue
        n_real = int(b["num_tokens"])
        seen["elapsed"] += dt
        seen["steps"] += 1
        seen["real"] += n_real
        seen["processed"] += b["input_ids"].numel()
        seen["sup"] += n_sup
        lengths = [len(samples[i]["input_ids"]) for u in plan[k] for i in u]
        seen["flops"] += n_real * flops_per_token(model.config, n_params, useful_context(lengths))
    return summarize(model_name, mode, n_params, precision.name, seen)


def attention_scaling(model_name: str, max_length: int, reps: int = 1) -> None:
    """Forward + backward time of one packed row of `max_length` tokens as its samples get longer."""
    import torch

    from train.attention import register
    from train.collate import collate_packed
    from train.loop import token_loss_sum
    from train.loss import install as install_chunked_loss

    cpu = torch.device("cpu")
    models = {"per-sample": load_model(model_name, 49152, register()), "dense mask": load_model(model_name, 49152)}
    for m in models.values():
        install_chunked_loss(m)
        m.train()
    print(f"{model_name}: one row of {max_length} tokens, forward + backward, fp32, {torch.get_num_threads()} threads")
    print(f"{'sample len':>10}{'samples':>9}{'Σ len²':>14}{'per-sample s':>14}{'dense mask s':>14}")
    g = torch.Generator().manual_seed(0)
    s = max_length // 16
    while s <= max_length:
        rows = [[{"input_ids": ids, "labels": ids} for ids in
                 (torch.randint(3, 49152, (s,), generator=g).tolist() for _ in range(max_length // s))]]
        times = {}
        for name, model in models.items():
            batch = collate_packed(rows, 0, varlen=name == "per-sample")
            token_loss_sum(model, batch, cpu, None).backward()  # warm-up
            t = time.perf_counter()
            for _ in range(reps):
                model.zero_grad(set_to_none=True)
                token_loss_sum(model, batch, cpu, None).backward()
            times[name] = (time.perf_counter() - t) / reps
        print(f"{s:>10}{max_length // s:>9}{max_length * s:>14,}{times['per-sample']:>14.2f}{times['dense mask']:>14.2f}",
              flush=True)
        s *= 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2", "tiny"], choices=["smollm2", "tiny"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8, help="samples per step for the padded modes (packing: 1 row)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="batching modes to run")
    ap.add_argument("--attention_scaling", action="store_true",
                    help="time one packed row as its samples get longer (per-sample attention vs the dense mask)")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.attention_scaling:
        for model in args.models:
            attention_scaling(model, args.max_length)
        return
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.steps, args.max_length, args.batch)))
        return
    import torch

    from train.precision import resolve_precision

    used = resolve_precision("true", False, torch.device("cpu"))
    # only the dtype actually used: an emulated bf16 peak alone takes minutes on a CPU without native bf16
    peak = matmul_peak(used.compute_dtype)
    print(f"computing in {used.name} (--bf16 True on this CPU){'; ' + used.note if used.note else ''}")
    print(f"measured {used.name} matmul peak ({torch.get_num_threads()} threads): {peak / 1e9:.0f} GFLOP/s")
    print(f"{'model':<9}{'mode':<12}{'tok/s':>9}{'sup tok/s':>11}{'useful':>8}{'tok/step':>10}{'peak RSS':>10}"
          f"{'MFU(' + used.name + ')':>11}")
    import importlib.util

    have_trl = importlib.util.find_spec("trl") is not None
    for model in args.models:
        sup: dict[str, float] = {}
        for mode in args.modes:
            if mode.startswith("trl") and not have_trl:
                print(f"{model:<9}{mode:<12} skipped: TRL is not installed (pip install -e '.[bench]')")
                continue
            out = subprocess.run([sys.executable, __file__, "--one", model, mode, "--steps", str(args.steps),
                                  "--max_length", str(args.max_length), "--batch", str(args.batch)],
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                print(f"{model:<9}{mode:<12} failed: {out.stderr[-500:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{model:<9}{mode:<12}{r['tokens_per_s']:>9.0f}{r['supervised_tokens_per_s']:>11.0f}"
                  f"{r['useful_fraction']:>8.1%}{r['processed_tokens_per_step']:>10.0f}{r['peak_rss_mb']:>8.0f}MB"
                  f"{r['achieved_flops'] / peak:>11.1%}", flush=True)
            sup[mode] = r["supervised_tokens_per_s"]
        if "packing" in sup:  # goals: >= 1.5x TRL's best mode (issue 23), >= 3x FastChat-style padding (issue 12)
            trl_best = max((m for m in ("trl", "trl_padded") if m in sup), key=sup.get, default=None)
            for other, goal in ((trl_best, 1.5), ("packing_dense", None), ("pad_to_max", 3.0)):
                if other in sup:
                    print(f"{model:<9}chattune packing vs {other}: {sup['packing'] / sup[other]:.2f}x supervised tokens/s"
                          f"{f' (goal >= {goal}x)' if goal else ''}", flush=True)


if __name__ == "__main__":
    main()
