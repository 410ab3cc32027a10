"""Batched decoding (serve/batching.py): requests that run together share forwards, join and leave at any step,
and each gets exactly what it gets decoded alone."""

from __future__ import annotations

import contextlib
import random
import threading
import time

import pytest
import torch

from serve.batching import BatchEngine
from serve.generation import SamplingParams, stream_generate


@pytest.fixture(scope="module")
def model_and_tok(tiny_llama):
    from transformers import AutoModelForCausalLM

    from data.tokenizer import load_tokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval(), load_tokenizer(tiny_llama)


def prompts(tok, count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    words = "hello world the cat python rain tea maps owls jazz".split()
    return [tok.encode(" ".join(rng.choice(words) for _ in range(rng.randint(2, 60)))) for _ in range(count)]


class Collector:
    def __init__(self, n: int):
        self.text = [""] * n
        self.results = [None] * n
        self.left = n
        self.done = threading.Event()
        self.lock = threading.Lock()

    def emit(self, i: int):
        def emit(kind, payload):
            with self.lock:
                if kind == "delta":
                    self.text[i] += payload
                else:
                    self.results[i] = (kind, payload)
                    self.left -= 1
                    if self.left == 0:
                        self.done.set()
        return emit


def alone(model, tok, ids, params) -> str:
    return "".join(stream_generate(model, tok, ids, params, set()))


@contextlib.contextmanager
def running(model, tok, max_batch: int):
    engine = BatchEngine(model, tok, max_batch=max_batch)
    try:
        yield engine
    finally:
        engine.stop()


def submit_all(engine, jobs, stagger: float = 0.0):
    """Submit (ids, params) jobs, the i-th after i * stagger seconds; returns their collector and tickets."""
    got = Collector(len(jobs))
    tickets = []
    for i, (ids, p) in enumerate(jobs):
        tickets.append(engine.submit(ids, p, set(), got.emit(i)))
        time.sleep(stagger * i)
    return got, tickets


def test_concurrent_requests_share_forwards_and_match_alone(model_and_tok):
    model, tok = model_and_tok
    ps = prompts(tok, 8)
    params = [SamplingParams(temperature=0, max_new_tokens=30 + 7 * i) for i in range(6)] + \
        [SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_new_tokens=25),  # seeded sampling: reproducible
         SamplingParams(temperature=0, repetition_penalty=1.3, max_new_tokens=25)]
    expected = [alone(model, tok, ids, p) for ids, p in zip(ps, params)]
    with running(model, tok, 8) as engine:
        got, _ = submit_all(engine, list(zip(ps, params)), stagger=0.002)  # newcomers join a running batch
        assert got.done.wait(120)
        assert got.text == expected
        assert all(kind == "done" and r.finish_reason == "length" for kind, r in got.results)
        assert [r.completion_tokens for _, r in got.results] == [p.max_new_tokens for p in params]
        # one forward per step for all running rows, far fewer than one per token per request
        assert engine.steps < 0.5 * sum(p.max_new_tokens for p in params)
        deadline = time.time() + 5
        while engine.running or engine.waiting:  # finished rows leave right after their last event
            assert time.time() < deadline
            time.sleep(0.01)


def test_more_requests_than_slots_wait_then_run(model_and_tok):
    model, tok = model_and_tok
    ps = prompts(tok, 5, seed=3)
    p = SamplingParams(temperature=0, max_new_tokens=12)
    with running(model, tok, 2) as engine:
        got, _ = submit_all(engine, [(ids, p) for ids in ps])
        assert got.done.wait(120)
        assert got.text == [alone(model, tok, ids, p) for ids in ps]


def test_a_cancelled_request_leaves_within_a_step_and_the_others_are_unaffected(model_and_tok):
    model, tok = model_and_tok
    ps = prompts(tok, 3, seed=7)
    p = SamplingParams(temperature=0, max_new_tokens=60)
    with running(model, tok, 4) as engine:
        got, tickets = submit_all(engine, [(ids, p) for ids in ps])
        while len(got.text[1]) < 3:
            time.sleep(0.001)
        tickets[1].cancel()
        steps_at_cancel = engine.steps  # read after cancel(): the engine may have stepped in between
        assert got.done.wait(120)
        kind, result = got.results[1]
        assert kind == "done" and result.finish_reason == "cancelled" and result.completion_tokens < 60
        # one token from the prefill, one per decode step it took part in: none after the step that saw the cancel
        assert result.completion_tokens <= steps_at_cancel + 2
        assert [got.text[0], got.text[2]] == [alone(model, tok, ps[0], p), alone(model, tok, ps[2], p)]


def test_stop_tokens_and_strings_end_each_row_on_its_own(model_and_tok):
    model, tok = model_and_tok
    ids = prompts(tok, 1, seed=11)[0]
    free = alone(model, tok, ids, SamplingParams(temperature=0, max_new_tokens=40))
    stop = free[10:14]
    assert stop and stop in free
    with running(model, tok, 4) as engine:
        got, _ = submit_all(engine, [(ids, SamplingParams(temperature=0, max_new_tokens=40, stop=[stop])),
                                     (ids, SamplingParams(temperature=0, max_new_tokens=40))])
        assert got.done.wait(120)
        assert got.text[0] == free[:free.index(stop)] and got.results[0][1].finish_reason == "stop"
        assert got.text[1] == free and got.results[1][1].finish_reason == "length"


def test_stopping_the_engine_cancels_what_is_queued_and_running(model_and_tok):
    model, tok = model_and_tok
    engine = BatchEngine(model, tok, max_batch=1)
    got, _ = submit_all(engine, [(ids, SamplingParams(temperature=0, max_new_tokens=100000))
                                 for ids in prompts(tok, 3, seed=2)])
    time.sleep(0.2)
    engine.stop()
    assert got.done.wait(30)
    assert {r.finish_reason for _, r in got.results} == {"cancelled"}
    with pytest.raises(RuntimeError, match="shutting down"):
        engine.submit([1, 2], SamplingParams(), set(), lambda *a: None)
