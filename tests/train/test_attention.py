"""train/attention.py: attention per packed sample (no dense mask), equal to the block-diagonal dense mask and
to each sample run alone; the FlexAttention BlockMask path (CUDA) checked forward on CPU; 128k-token rows
without anything quadratic on the host."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from train.attention import attend, document_block_mask, flex_document_attention, register, repeat_kv
from train.collate import collate_packed, collate_padded, model_inputs
from train.loop import token_loss_sum

LENGTHS = [5, 17, 40, 1, 9, 24]


def _bounds(lengths):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def _dense_reference(q, k, v, lengths, window=None, softcap=None):
    """Attention over the whole row with the dense block-diagonal causal mask (what packing paid before)."""
    n = sum(lengths)
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    i = torch.arange(n)
    allowed = (seg[:, None] == seg[None, :]) & (i[:, None] >= i[None, :])
    if window is not None:
        allowed &= (i[:, None] - i[None, :]) < window
    k, v = repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // v.shape[1])
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v


@pytest.mark.parametrize("window,softcap", [(None, None), (8, None), (None, 20.0), (6, 30.0)],
                         ids=["causal", "sliding-window", "softcap", "window+softcap"])
def test_per_sample_attention_equals_the_dense_block_mask(window, softcap):
    torch.manual_seed(0)
    n = sum(LENGTHS)
    q = torch.randn(1, 8, n, 16, requires_grad=True)
    k = torch.randn(1, 2, n, 16, requires_grad=True)  # GQA: 4 query heads per KV head
    v = torch.randn(1, 2, n, 16, requires_grad=True)
    ours = attend(q, k, v, _bounds(LENGTHS), None, window=window, softcap=softcap)
    ref = _dense_reference(q, k, v, LENGTHS, window, softcap)
    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=1e-5)
    weight = torch.randn_like(ours)
    ours_g = torch.autograd.grad((ours * weight).sum(), (q, k, v))
    ref_g = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for a, b in zip(ours_g, ref_g):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_rows_without_boundaries_are_plain_causal_and_bad_boundaries_are_refused():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 12, 8), torch.randn(2, 4, 12, 8), torch.randn(2, 4, 12, 8)
    torch.testing.assert_close(attend(q, k, v, None, None), F.scaled_dot_product_attention(q, k, v, is_causal=True))
    with pytest.raises(ValueError, match="does not describe one row of 12 tokens"):
        attend(q[:1], k[:1], v[:1], [0, 5, 11], None)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("window,softcap", [(None, None), (40, None), (None, 25.0)])
def test_flex_block_mask_path_matches_and_skips_masked_blocks(window, softcap):
    """The CUDA path without flash-attn (FlexAttention + document BlockMask) run forward on CPU with the reference
    kernel: the same output; and its BlockMask keeps only blocks that some sample spans."""
    torch.manual_seed(0)
    lengths = [128, 128, 200, 56]  # 512 tokens = 4×4 blocks of 128
    n = sum(lengths)
    q, k, v = torch.randn(1, 4, n, 16), torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 16)
    flex = flex_document_attention(q, k, v, _bounds(lengths), None, window, softcap, compiled=False)
    torch.testing.assert_close(flex, attend(q, k, v, _bounds(lengths), None, window=window, softcap=softcap),
                               atol=2e-6, rtol=1e-5)
    blocks = document_block_mask(_bounds(lengths)).to_dense()[0, 0]
    causal_blocks = 4 * 5 // 2
    assert int(blocks.sum()) < causal_blocks  # 7 of 10: blocks (1,0), (2,0), (2,1)... that only cross samples go
    assert not bool(blocks[1, 0]) and not bool(blocks[3, 0])


@pytest.fixture(scope="module")
def packed_model(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=register()).eval()


def _samples(seed: int, lengths):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 1000, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    return out


@torch.no_grad()
def _assert_each_sample_alone(packed, alone, batch, samples, atol: float) -> None:
    """`packed`'s logits over the flattened row equal `alone`'s on each sample by itself."""
    logits = packed(**model_inputs(batch, "cpu")).logits[0]
    start = 0
    for s in samples:
        n = len(s["input_ids"])
        torch.testing.assert_close(logits[start:start + n], alone(input_ids=torch.tensor([s["input_ids"]])).logits[0],
                                   atol=atol, rtol=1e-4)
        start += n


def test_packed_row_through_the_model_equals_each_sample_alone(packed_model):
    """The training path: several packed rows → one row with cu_seq_lens (padded to a multiple of 4 for sequence
    parallelism); every sample's logits equal the sample run alone, and so does the loss."""
    samples = _samples(0, LENGTHS)
    batch = collate_packed([samples[:3], samples[3:]], pad_id=0, varlen=True, multiple=4)
    assert batch["input_ids"].shape == (1, 96) and "attention_mask" not in batch  # 96 = Σ 96, already divisible
    batch7 = collate_packed([samples[:3], samples[3:5]], pad_id=0, varlen=True, multiple=4)
    assert batch7["input_ids"].shape[1] == 72 and batch7["cu_seq_lens_q"].tolist() == [0, 5, 22, 62, 63, 72]
    _assert_each_sample_alone(packed_model, packed_model, batch, samples, atol=1e-5)
    with torch.no_grad():
        packed_loss = token_loss_sum(packed_model, batch, torch.device("cpu"), None)
        alone_loss = sum(token_loss_sum(packed_model, collate_padded([s], 0), torch.device("cpu"), None) for s in samples)
    torch.testing.assert_close(packed_loss, alone_loss, atol=1e-4, rtol=1e-5)


def test_gemma2_softcap_and_window_within_packed_samples(tokenizers, tmp_path):
    """A model with logit soft-capping and sliding windows (Gemma-2): packed samples longer than the window equal
    the sample alone under transformers' eager attention."""
    from scripts.tiny_model import make_tiny_model

    path = make_tiny_model(tmp_path, "gemma2", tokenizers["smollm2"])
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    cfg.sliding_window = 8
    eager = AutoModelForCausalLM.from_pretrained(path, config=cfg, attn_implementation="eager").eval()
    ours = AutoModelForCausalLM.from_pretrained(path, config=cfg, attn_implementation=register()).eval()
    samples = _samples(1, [12, 20, 7])
    batch = collate_packed([samples], pad_id=0, varlen=True)
    _assert_each_sample_alone(ours, eager, batch, samples, atol=1e-4)


def test_a_128k_packed_row_holds_nothing_quadratic():
    """--model_max_length 131072 with packing: the collated row is O(L) (a dense 4D mask would be 16 G entries)."""
    length = 131072
    sample = {"input_ids": list(range(3, 1027)), "labels": [-100] * 24 + list(range(27, 1027))}
    batch = collate_packed([[sample] * (length // 1024)], pad_id=0, varlen=True, multiple=8)
    assert batch["input_ids"].shape == (1, length)
    assert max(v.numel() for v in batch.values() if torch.is_tensor(v)) <= length
    assert batch["cu_seq_lens_q"].tolist() == list(range(0, length + 1, 1024)) and batch["max_length_q"] == 1024
