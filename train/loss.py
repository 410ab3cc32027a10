"""The token loss computed from the final hidden states in chunks: never `tokens × vocab` fp32 logits.

A plain loss materializes the logits of every position (bf16), their fp32 copy, the log-softmax and
their gradients: with a 128k vocabulary that is ~2 GB per 2,048 tokens. Here the LM head's forward is
replaced (on the instance, so parameter names, checkpoints and FSDP/ZeRO-3 hooks are unchanged) by one
that, while `targets(labels)` is active, keeps only the supervised positions, and computes
`cross_entropy(hidden @ W.T)` a chunk at a time under activation checkpointing — each chunk's logits
exist only while that chunk is computed, in forward and again in backward. It returns the loss sum as
a 0-d tensor in place of the logits. Outside `targets(...)` (generation, eval by other tools) the head
is the plain linear layer.

Models whose forward post-processes the logits (Gemma-2 soft-capping, Cohere's logit scale) or whose
head is not a plain `nn.Linear` (a LoRA-adapted head) keep the plain loss (`install` returns False).
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from data.tokenize import IGNORE_INDEX

# model types whose CausalLM forward is exactly `logits = self.lm_head(hidden_states)` (transformers 5.x)
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
                                    "phi3", "olmo2", "smollm3"})
CHUNK_BYTES = 256 * 2**20  # fp32 logits of one chunk (forward or backward)

_targets: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("chattune_loss_targets", default=None)


def causal_lm(model):
    """The transformers CausalLM inside a peft model (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def install(model) -> bool:
    """Make `model`'s LM head compute the chunked loss while `targets(...)` is active. Call before wrapping
    (FSDP/DeepSpeed/DDP). Returns False (plain loss kept) where the model's head is not a plain linear layer."""
    if not chunkable(model):
        return False
    head = causal_lm(model).lm_head
    plain_forward = head.forward

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        labels = _targets.get()
        if labels is None:
            return plain_forward(hidden)
        return chunked_cross_entropy_sum(hidden, head.weight, head.bias, labels)

    head.forward = forward
    return True


def chunkable(model) -> bool:
    """Whether `model`'s loss can be computed in chunks from its hidden states (its head is a plain linear layer)."""
    lm = causal_lm(model)
    config = getattr(lm, "config", None)
    head = getattr(lm, "lm_head", None)
    return not (config is None or getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES
                or getattr(config, "final_logit_softcapping", None) or not isinstance(head, torch.nn.Linear)
                or hasattr(head, "base_layer"))


@contextmanager
def targets(labels: torch.Tensor):
    """While active, an installed head returns the summed cross-entropy against `labels` (already shifted,
    -100 = no loss) instead of logits."""
    token = _targets.set(labels)
    try:
        yield
    finally:
        _targets.reset(token)


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              labels: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Σ cross-entropy(hidden @ weight.T + bias, labels) over positions with labels != -100."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    # positions are chosen on the host copy of the labels, so the device never syncs to size the selection
    keep = (labels.cpu() != IGNORE_INDEX).nonzero().squeeze(1)
    if keep.numel() == 0:  # still a graph through the head, so every rank's backward reaches its weight
        return F.linear(flat[:1], weight, bias).sum() * 0.0
    keep_dev = keep.to(flat.device, non_blocking=True)
    selected = flat.index_select(0, keep_dev)
    target = labels.to(flat.device).index_select(0, keep_dev)
    chunk = chunk or max(16, CHUNK_BYTES // (4 * weight.shape[0]))
    total = None
    for start in range(0, selected.shape[0], chunk):
        part = checkpoint(_chunk_loss, selected[start:start + chunk], weight, bias, target[start:start + chunk],
                          use_reentrant=False)
        total = part if total is None else total + part
    return total


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                target: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias)  # in the autocast dtype, like the plain head
    return F.cross_entropy(logits.float(), target, reduction="sum")
