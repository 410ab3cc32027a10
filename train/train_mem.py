"""FastChat's `train_mem.py`: the chattune recipe with flash-attn 2 requested.

flash-attn is used when it is importable (the `gpu` extra on a CUDA machine); otherwise training uses
PyTorch SDPA attention and says so once. All flags are those of train/train.py.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from train.fast_exit import exit_fast  # noqa: E402
from train.train import main  # noqa: E402

if __name__ == "__main__":
    exit_fast(main(defaults={"flash_attn": True}))
