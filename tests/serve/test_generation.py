"""Streaming generation: stop tokens, stop strings never printed in part, sampling parameters."""

from __future__ import annotations

import pytest
import torch

from serve.generation import GenerationResult, SamplingParams, _held_back, stream_generate


class ScriptedModel(torch.nn.Module):
    """Emits a fixed token script (greedy), whatever the input: hermetic and exact."""

    def __init__(self, script: list[int], vocab: int):
        super().__init__()
        self.script, self.vocab = script, vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, past_key_values=None, use_cache=True):
        step = 0 if past_key_values is None else past_key_values + 1
        logits = torch.zeros(1, input_ids.shape[1], self.vocab)
        logits[0, -1, self.script[min(step, len(self.script) - 1)]] = 10.0
        return type("Out", (), {"logits": logits, "past_key_values": step})()


def run(tok, text_tokens: list[int], stop: list[str], stop_ids=frozenset(), max_new=50):
    result = GenerationResult()
    model = ScriptedModel(text_tokens, len(tok))
    deltas = list(stream_generate(model, tok, [1, 2, 3], SamplingParams(temperature=0, max_new_tokens=max_new, stop=stop),
                                  set(stop_ids), result))
    return deltas, result


def test_held_back_suffix():
    assert _held_back("hello <", ["</s>"]) == 1 and _held_back("hello </", ["</s>"]) == 2
    assert _held_back("hello", ["</s>"]) == 0 and _held_back("a##", ["###", "##x"]) == 2


def test_stop_string_is_never_printed_even_in_part(tokenizers):
    tok = tokenizers["gpt-2"] if "gpt-2" in tokenizers else tokenizers["qwen2"]
    script = tok.encode("Hello world\n### Instruction: more", add_special_tokens=False)
    deltas, result = run(tok, script, stop=["\n### Instruction"])
    assert "".join(deltas) == "Hello world" == result.text
    assert all("#" not in d for d in deltas) and result.finish_reason == "stop"


def test_text_that_only_looked_like_a_stop_prefix_is_released(tokenizers):
    tok = tokenizers["qwen2"]
    script = tok.encode("a <b> c", add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    deltas, result = run(tok, script, stop=["<|im_end|>", "</s>"], stop_ids={tok.convert_tokens_to_ids("<|im_end|>")})
    assert "".join(deltas) == "a <b> c" and result.finish_reason == "stop"
    assert result.completion_tokens == len(script) - 1


def test_length_limit_and_counts(tokenizers):
    tok = tokenizers["qwen2"]
    script = tok.encode("one two three four five six", add_special_tokens=False)
    deltas, result = run(tok, script, stop=[], max_new=3)
    assert result.finish_reason == "length" and result.completion_tokens == 3 and result.prompt_tokens == 3
    assert "".join(deltas) == tok.decode(script[:3])


def test_sampling_is_seeded_and_validated(tiny_llama, tokenizers):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tok = tokenizers["smollm2"]

    def sample(seed):
        p = SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=1.2, max_new_tokens=8, seed=seed)
        return "".join(stream_generate(model, tok, [1, 2, 3], p, set()))

    assert sample(5) == sample(5) and sample(5) != sample(6)
    for bad in (SamplingParams(temperature=-1), SamplingParams(top_p=0), SamplingParams(max_new_tokens=0)):
        with pytest.raises(ValueError):
            bad.validate()


TEXTS = ["Hello world, this is a reply.", "unicode: ünïcødé, 日本語のテキスト, emoji 🙂🚀 and more 🦜",
         "code:\n```python\ndef f(x):\n    return x * 2\n```\n", "  spaced  out   words ", "tabs\tand\r\nnewlines"]


@pytest.mark.parametrize("asset", ["llama-spm", "llama-bpe", "qwen2", "smollm2"])
def test_incremental_decoding_equals_a_full_decode_at_bounded_cost(asset, tokenizers):
    """The deltas add up to decoding the whole reply (byte-fallback pieces of one character included), and each
    token re-decodes only a short window, however long the reply grows."""
    from serve.generation import IncrementalDecoder

    tok = tokenizers[asset]
    for text in TEXTS + [" ".join(TEXTS) * 20]:
        ids = tok.encode(text, add_special_tokens=False)
        dec = IncrementalDecoder(tok)
        windows = []
        out = []
        for t in ids:
            out.append(dec.push(t))
            windows.append(len(dec.tokens) - dec.prefix)
            assert "\ufffd" not in out[-1]
        out.append(dec.flush())
        assert "".join(out) == tok.decode(ids, skip_special_tokens=True)
        assert max(windows) <= 8  # a character never spans more than a few tokens


def test_stop_matching_looks_only_at_the_new_tail():
    from serve.generation import StopMatcher

    m = StopMatcher(["</end>", "STOP"])
    text = "word " * 5000
    out = [m.feed(text[i:i + 3]) for i in range(0, len(text), 3)]
    assert "".join(out) + m.flush() == text and not m.stopped
    assert len(m.pending) < len("</end>")
    m = StopMatcher(["</end>"])
    assert m.feed("abc </e") == "abc " and m.pending == "</e"  # could still become the stop string: held
    assert m.feed("nd> more") == "" and m.stopped              # it did: nothing of it is emitted
    m = StopMatcher(["</end>"])
    assert m.feed("x </e") == "x " and m.feed("arly") == "</early"  # it did not: released


def test_repetition_penalty_counts_the_prompt_like_generate():
    """HF's RepetitionPenaltyLogitsProcessor penalizes every token of input_ids, prompt included."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from serve.generation import TokenSampler

    torch.manual_seed(0)
    logits = torch.randn(50)
    prompt = [3, 7, 7, 20]
    sampler = TokenSampler(SamplingParams(temperature=0, repetition_penalty=1.7), prompt, 50)
    ref = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt]), logits[None].clone())[0]
    assert sampler(logits.clone()) == int(ref.argmax())
    top = int(logits.argmax())
    sampler = TokenSampler(SamplingParams(temperature=0, repetition_penalty=100.0), [top], 50)
    assert sampler(logits.clone()) != top  # the prompt's token is penalized from the first step
