"""Turning samples into model inputs. The one place where labels are shifted and batches are padded.

Samples come from data/ as `input_ids` and *unshifted* `labels` (-100 = no loss). Here each sample's
labels are shifted left by one (position t predicts token t+1; a sample's last position predicts
nothing), so the loss is a plain per-position cross-entropy and a packed row never predicts across
samples.

* padded: dynamic padding to the longest sample in the batch (or a fixed length, FastChat-style,
  for benchmarks), `attention_mask` 1/0, `position_ids` 0..n-1.
* packed, `varlen=True` (training): a micro-batch's samples become one row (1, ΣL), `position_ids`
  restarting per sample and `cu_seq_lens_q/k` (cumulative lengths) marking them, so attention runs per
  sample (train/attention.py: flash-attn varlen, FlexAttention or SDPA per sample) and nothing on the host
  is quadratic in the row length. `multiple` pads the row to a multiple of the sequence-parallel degree;
  the padding is a sample of its own with no labels.
* packed, dense mask (benchmarks, plain sdpa/eager): restarting positions alone do not isolate samples
  there (docs/design.md §4), so a 4D additive block-diagonal causal mask (0 = attend, dtype min = not)
  goes with each row — (rows, 1, L, L) entries.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from data.tokenize import IGNORE_INDEX


def shift_labels(labels: Sequence[int]) -> list[int]:
    return list(labels[1:]) + [IGNORE_INDEX]


def collate_padded(samples: Sequence[dict], pad_id: int, pad_to: int | None = None,
                   multiple: int = 1) -> dict[str, torch.Tensor]:
    """`multiple`: round the padded length up to it (the sequence-parallel degree)."""
    length = pad_to or max(len(s["input_ids"]) for s in samples)
    length = -(-length // multiple) * multiple
    n = len(samples)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    for i, s in enumerate(samples):
        k = len(s["input_ids"])
        if k > length:
            raise ValueError(f"sample of {k} tokens does not fit pad length {length}")
        input_ids[i, :k] = torch.tensor(s["input_ids"], dtype=torch.long)
        labels[i, :k] = torch.tensor(shift_labels(s["labels"]), dtype=torch.long)
        attention_mask[i, :k] = 1
    position_ids = torch.arange(length, dtype=torch.long).expand(n, length).clone()
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "position_ids": position_ids,
            "num_tokens": attention_mask.sum()}


def collate_packed(rows: Sequence[Sequence[dict]], pad_id: int, mask_dtype: torch.dtype = torch.float32,
                   varlen: bool = False, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Rows of samples → one packed batch. `varlen=True`: one row (1, ΣL) holding every sample of the
    micro-batch with `cu_seq_lens_*`, no 4D mask; its length is rounded up to `multiple`."""
    if varlen and len(rows) > 1:
        rows = [[s for row in rows for s in row]]
    lengths = [sum(len(s["input_ids"]) for s in row) for row in rows]
    length = max(lengths)
    if varlen:
        length = -(-length // multiple) * multiple
    n = len(rows)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((n, length), dtype=torch.long)
    segment = torch.full((n, length), -1, dtype=torch.long)  # which sample each position belongs to
    for i, row in enumerate(rows):
        pos = 0
        for j, s in enumerate(row):
            k = len(s["input_ids"])
            input_ids[i, pos:pos + k] = torch.tensor(s["input_ids"], dtype=torch.long)
            labels[i, pos:pos + k] = torch.tensor(shift_labels(s["labels"]), dtype=torch.long)
            position_ids[i, pos:pos + k] = torch.arange(k)
            segment[i, pos:pos + k] = j
            pos += k
        if pos < length:  # padding continues the positions so varlen kernels see one padded tail
            position_ids[i, pos:] = torch.arange(length - pos)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
             "num_tokens": torch.tensor(sum(lengths))}
    if varlen:
        bounds = [0]
        for s in rows[0]:
            bounds.append(bounds[-1] + len(s["input_ids"]))
        if bounds[-1] < length:
            bounds.append(length)  # the padding tail attends only to itself
        cu = torch.tensor(bounds, dtype=torch.int32)
        longest = int((cu[1:] - cu[:-1]).max())
        batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    else:
        same = segment[:, :, None] == segment[:, None, :]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        allowed = same & causal & (segment[:, :, None] >= 0)
        allowed |= torch.eye(length, dtype=torch.bool)  # padding rows attend to themselves (no NaN rows)
        mask = torch.zeros((n, 1, length, length), dtype=mask_dtype)
        mask.masked_fill_(~allowed[:, None], torch.finfo(mask_dtype).min)
        batch["attention_mask"] = mask
    return batch


def num_supervised(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())


METADATA_KEYS = ("labels", "num_tokens")  # batch entries that are not model inputs


def model_inputs(batch: dict, device: torch.device | str) -> dict:
    """The batch's model keyword arguments on `device` (tensors moved; `max_length_*` ints as they are)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k not in METADATA_KEYS}
