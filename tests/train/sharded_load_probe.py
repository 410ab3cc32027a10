"""Run under torchrun by test_sharded_scale.py: build a model the way train.py does on a sharded
backend, then record what each rank loaded and the logits of a fixed input.

    torchrun --nproc_per_node=2 tests/train/sharded_load_probe.py OUT_JSON <train.py flags>
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

import train.model_setup as model_setup  # noqa: E402
from train.backend_select import make_backend  # noqa: E402
from train.config import parse_args  # noqa: E402
from train.distributed import cleanup, init_distributed  # noqa: E402
from train.optim import make_optimizer  # noqa: E402
from train.precision import resolve_precision  # noqa: E402

INPUT = [[1, 200, 3000, 45, 9, 77, 12000, 5, 31, 400]]


def main(out: str, argv: list[str]) -> None:
    cfg = parse_args(argv)
    info = init_distributed(need_process_group=True)
    loads = []
    real_load = model_setup.load_causal_lm
    model_setup.load_causal_lm = lambda *a, **k: loads.append(1) or real_load(*a, **k)
    try:
        precision = resolve_precision(cfg.bf16, cfg.fp16, info.device)
        backend = make_backend(info, cfg, precision, model_setup.model_config(cfg).hidden_size)
        model = backend.build_model(lambda placement: model_setup.build_model(cfg, info, placement, precision))
        # a ZeRO-3 parameter with numel() == 0 is partitioned: this rank holds only its slice
        partitioned = [n for n, p in model.named_parameters() if getattr(p, "ds_numel", 0) > p.numel() == 0]
        wrapped, _ = backend.setup(model, lambda m: make_optimizer(cfg, m))
        wrapped.eval()
        with torch.no_grad():
            logits = wrapped(input_ids=torch.tensor(INPUT)).logits
        module = backend.unwrap(wrapped)
        inv_freq = [b for n, b in module.named_buffers() if n.endswith("inv_freq")][0]
        embed, head = module.get_input_embeddings().weight, module.get_output_embeddings().weight
        record = {"rank": info.rank, "from_pretrained_calls": len(loads), "partitioned": len(partitioned),
                  "tied": embed is head, "embedding_type": type(embed).__name__, "embedding_numel": embed.numel(),
                  "logits": logits.float().tolist(), "inv_freq": inv_freq.float().tolist()}
        with open(f"{out}.rank{info.rank}", "w") as f:
            json.dump(record, f)
    finally:
        cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
