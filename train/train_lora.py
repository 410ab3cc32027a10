"""FastChat's `train_lora.py`: the chattune recipe with LoRA on (add --q_lora True for QLoRA).

Defaults differ from train.py only in `--lora True` and a LoRA-sized learning rate (2e-4); every flag
of train/train.py is accepted.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from train.fast_exit import exit_fast  # noqa: E402
from train.train import main  # noqa: E402

if __name__ == "__main__":
    exit_fast(main(defaults={"lora": True, "learning_rate": 2e-4}))
