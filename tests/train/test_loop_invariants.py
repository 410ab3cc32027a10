"""Loss normalization invariants: one step's loss and gradients do not depend on how it is split."""

from __future__ import annotations

import random

import torch
from transformers import AutoModelForCausalLM

from train.backends import Backend
from train.collate import collate_padded
from train.distributed import DistInfo
from train.loop import accumulate_gradients

INFO = DistInfo(0, 1, 0, torch.device("cpu"))


def samples(n=8, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(4, 30)
        ids = [rng.randint(10, 40000) for _ in range(k)]
        labels = [t if i >= rng.randint(1, k - 1) else -100 for i, t in enumerate(ids)]
        out.append({"input_ids": ids, "labels": labels})
    return out


def step_grads(model_dir, batches):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    loss, n_sup = accumulate_gradients(model, batches, Backend(INFO), INFO, None)
    return loss, n_sup, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_batch8_ga1_equals_batch1_ga8(tiny_llama):
    data = samples()
    loss_a, n_a, grads_a = step_grads(tiny_llama, [collate_padded(data, pad_id=0)])
    loss_b, n_b, grads_b = step_grads(tiny_llama, [collate_padded([s], pad_id=0) for s in data])
    assert n_a == n_b
    assert abs(loss_a - loss_b) < 1e-5
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-4)


def test_mean_of_means_would_differ(tiny_llama):
    """The invariant is not vacuous: averaging per-micro-batch means gives a different loss here."""
    data = samples()
    loss, _, _ = step_grads(tiny_llama, [collate_padded(data, pad_id=0)])
    per_batch = [step_grads(tiny_llama, [collate_padded([s], pad_id=0)])[0] for s in data]
    assert abs(sum(per_batch) / len(per_batch) - loss) > 1e-3
