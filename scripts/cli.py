"""The `chattune` command: one name for chattune's tools. Each subcommand runs an existing entry point with the
rest of the command line, so its flags, help and exit status are that entry point's own.

    chattune train --model_name_or_path M --data_path D --output_dir OUT ...    # = python train/train.py ...
    chattune chat --model-path OUT                                               # = python -m serve.cli ...
    chattune eval --model-path OUT --data heldout.jsonl                          # = python -m eval.loss ...
    chattune eval gen|judge|show|identity ...                                    # = python -m eval.gen_answers ...

Several training processes: torchrun starts the command in each of them, by path or as a module:

    torchrun --nproc_per_node=N --no-python chattune train ...     # (the venv's bin/ on PATH, or its full path)
    torchrun --nproc_per_node=N -m scripts.cli train ...

The FastChat-style forms keep working: `torchrun train/train_mem.py ...`, `python -m serve.cli ...`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys

# name → (module whose main() it runs, one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train.train", "fine-tune a chat model on conversations (train/train.py; torchrun: see below)"),
    "chat": ("serve.cli", "chat with a model in the terminal (python -m serve.cli)"),
    "serve": ("serve.openai_api_server", "OpenAI-compatible HTTP API for a model (python -m serve.openai_api_server)"),
    "eval": ("eval.loss", "held-out loss and perplexity (python -m eval.loss); `eval gen|judge|show|identity`: below"),
    "export": ("scripts.export", "export to GGUF (llama.cpp, Ollama) or a merged HF model, checked by eval.parity"),
    "plan": ("train.plan", "plan a training run before starting it (python -m train.plan, not there yet)"),
    "inspect": ("data.inspect", "show what the model learns from: tokens by supervised/masked, stats"),
    "validate": ("data.validate", "check and normalize data files; `PATH:LINE: problem` per bad record"),
}
# `chattune eval FORM ...`
EVAL_FORMS: dict[str, tuple[str, str]] = {
    "gen": ("eval.gen_answers", "answer an MT-bench-style question file"),
    "judge": ("eval.judge", "judge answers with an OpenAI-compatible endpoint"),
    "show": ("eval.show_results", "tables from judgment files"),
    "identity": ("eval.identity", "score held-out identity facts"),
    "parity": ("eval.parity", "prove an export behaves like the trained model in every runtime"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: chattune COMMAND [ARGS ...]    (`chattune COMMAND --help`: that command's flags)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "eval forms:"]
    lines += [f"  eval {name:<{width}}  {text} (python -m {module})" for name, (module, text) in EVAL_FORMS.items()]
    lines += ["", "several training processes:",
              "  torchrun --nproc_per_node=N --no-python chattune train ...",
              "  torchrun --nproc_per_node=N -m scripts.cli train ..."]
    return "\n".join(lines)


def run_main(module: str, argv: list[str], prog: str) -> int:
    """`module.main` on argv, as `python -m module ARGV` would run it (sys.argv too: argparse reads its prog there)."""
    main = importlib.import_module(module).main
    sys.argv = [prog, *argv]
    result = main(argv) if inspect.signature(main).parameters else main()
    return result if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    if name in ("-h", "--help", "help"):
        print(usage())
        return 0
    if name not in COMMANDS:
        print(f"chattune: unknown command {name!r} (commands: {', '.join(COMMANDS)}; see chattune --help)",
              file=sys.stderr)
        return 2
    module = COMMANDS[name][0]
    if name == "eval" and rest and rest[0] in EVAL_FORMS:
        module, name, rest = EVAL_FORMS[rest[0]][0], f"eval {rest[0]}", rest[1:]
    elif name == "plan" and importlib.util.find_spec(module) is None:
        print("chattune plan: there is no planner yet (python -m train.plan comes in a later release)", file=sys.stderr)
        return 2
    return run_main(module, rest, f"chattune {name}")


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(main())
