"""OpenAI-compatible HTTP server for a chattune model, in one process (FastAPI + uvicorn).

    python -m serve.openai_api_server --model-path OUT [--host 127.0.0.1 --port 8000] [--api-keys k1,k2]

Endpoints: GET /v1/models, GET /health, POST /v1/chat/completions (streaming SSE or not), POST /v1/completions.
Honours temperature, top_p, max_tokens, stop, n, seed, repetition_penalty; reports token usage.
Tools as OpenAI has them: `tools` and `tool_choice` (auto, none, required, a named function) are rendered with the
training template; the reply comes back as `tool_calls` (finish_reason "tool_calls"; streamed as OpenAI streams
them) and `reasoning_content` beside `content` (serve/tool_parsing.py). Malformed model output stays content.

Built to face real clients:
- every input is bounded (body size → 413; messages, prompt tokens, stop strings, n → 400 naming the limit;
  max_tokens is clamped to what fits in the context);
- concurrent requests are decoded together (serve/batching.py): at most `--limit-concurrency` generations run,
  at most `--max-queue` wait, beyond that 429 with Retry-After;
- parsing, tokenization and generation never run on the event loop, so /health and /v1/models answer at once;
- a client that goes away (streaming or not) has its generation cancelled within one decode step;
- SIGTERM stops accepting, gives in-flight generations `--graceful-shutdown` seconds, cancels the rest, exits 0.

Layout: `create_app` registers one module-level function per route; they read an `AppState` (the `Service`: model,
tokenizer, batch engine, limits; the API keys; the tool-call format) from `app.state`. Both generation routes run
`generate` (admission, tokenization off the loop, streaming or waiting, disconnects, usage); they differ only in
their request class: `ChatRequest` / `TextRequest` build the prompt and shape each choice and stream delta.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import secrets
import signal
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request  # module level: FastAPI resolves the (string) annotations here
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from data.pieces import TemplateError
from data.tokenize import encode_prompt
from data.tokenizer import run_encoder
from serve.batching import BatchEngine, Ticket
from serve.generation import GenerationResult, SamplingParams
from serve.loading import LoadedModel, ServeLoadError, add_model_args, load_from_args
from serve.tool_parsing import (
    StreamParser,
    ToolRequestError,
    call_format,
    forced_call_prefix,
    parse_reply,
    prompt_opens_think,
    request_messages,
    request_tools,
)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Defaults are what a public deployment would pick."""

    max_body_bytes: int = 2 * 1024 * 1024  # --max-body-bytes: larger bodies get 413 before they are read
    max_messages: int = 256  # --max-messages
    max_prompt_tokens: int | None = None  # --max-prompt-tokens (default: the model's context minus one)
    max_stop: int = 4  # OpenAI's limit
    max_stop_chars: int = 64  # --max-stop-chars, per stop string
    max_n: int = 8  # --max-n
    limit_concurrency: int = 8  # --limit-concurrency: generations decoded together
    max_queue: int = 16  # --max-queue: generations waiting for a slot; more get 429
    retry_after_s: int = 1


class RequestError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.headers = message, param, status, kind, headers


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False, lo_open: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not float(value).is_integer()):
        raise RequestError(f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if value < lo or value > hi or (lo_open and value == lo):
        raise RequestError(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", name)
    return int(value) if integer else float(value)


def parse_sampling(body: dict, limits: Limits) -> tuple[SamplingParams, int]:
    """Sampling parameters and n, validated before any tokenization (max_tokens is clamped later, once the
    prompt's length is known)."""
    name = "max_tokens" if "max_tokens" in body else "max_completion_tokens"
    max_tokens = _number(body, name, None, 1, 2**31 - 1, integer=True)
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise RequestError(f"'stop' must be a string or a list of up to {limits.max_stop} strings", "stop")
    if len(stops) > limits.max_stop:
        raise RequestError(f"'stop' has {len(stops)} strings; at most {limits.max_stop} are allowed", "stop")
    if any(len(s) > limits.max_stop_chars for s in stops):
        raise RequestError(f"each 'stop' string may have at most {limits.max_stop_chars} characters", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"'seed' must be an integer, got {seed!r}", "seed")
    params = SamplingParams(
        temperature=_number(body, "temperature", 1.0, 0, 2),
        top_p=_number(body, "top_p", 1.0, 0, 1, lo_open=True),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0, 10, lo_open=True),
        max_new_tokens=max_tokens or 0, seed=seed, stop=stops)
    return params, _number(body, "n", 1, 1, limits.max_n, integer=True)


def fit_to_context(params: SamplingParams, prompt_tokens: int, loaded: LoadedModel, limits: Limits, param: str,
                   chat: bool) -> SamplingParams:
    """The prompt must leave room for one token; max_tokens (default 512) is clamped to the room left."""
    limit = min(limits.max_prompt_tokens or loaded.context_length - 1, loaded.context_length - 1)
    if prompt_tokens > limit:
        raise RequestError(f"the prompt has {prompt_tokens} tokens; at most {limit} are allowed (the model's context "
                           f"is {loaded.context_length})", param)
    room = loaded.context_length - prompt_tokens
    return dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens or 512, room),
                               stop=params.stop + (loaded.stop_strings if chat else []))


def chat_messages(body: dict, limits: Limits) -> list[dict]:
    try:
        return request_messages(body.get("messages"), limits.max_messages)
    except ToolRequestError as e:
        raise RequestError(str(e), e.param) from None


class Service:
    """The model, its batch engine and the admission count (running + waiting generations)."""

    def __init__(self, loaded: LoadedModel, model_name: str, limits: Limits = Limits()):
        self.loaded, self.model_name, self.limits = loaded, model_name, limits
        self.engine = BatchEngine(loaded.model, loaded.tokenizer, max_batch=limits.limit_concurrency)
        self.admitted = 0  # touched on the event loop only

    def admit(self, n: int) -> Lease:
        """Claim n generations (429 beyond running + waiting capacity); the lease gives them back when closed."""
        if self.admitted + n > self.limits.limit_concurrency + self.limits.max_queue:
            raise RequestError(f"the server is at capacity ({self.limits.limit_concurrency} generations running, "
                               f"{self.limits.max_queue} waiting); retry shortly", None, 429, "rate_limit_error",
                               {"Retry-After": str(self.limits.retry_after_s)})
        self.admitted += n
        return Lease(self, n)

    def submit(self, ids: list[int], params: SamplingParams, n: int) -> tuple[list[Ticket], asyncio.Queue]:
        """Start n generations; their events arrive on one asyncio queue as (index, kind, payload)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        tickets = []
        for i in range(n):
            p = dataclasses.replace(params, seed=None if params.seed is None else params.seed + i)

            def emit(kind, payload, i=i):
                try:
                    loop.call_soon_threadsafe(events.put_nowait, (i, kind, payload))
                except RuntimeError:  # the event loop is gone (shutdown): nobody is listening any more
                    pass

            tickets.append(self.engine.submit(ids, p, self.loaded.stop_token_ids, emit))
        return tickets, events


class Lease:
    """A request's claim on the service: n admitted generations. `close()` (idempotent) cancels whatever still runs
    and gives the admission back, on every way out: finished, failed, client gone, task cancelled."""

    def __init__(self, service: Service, n: int):
        self.service, self.n = service, n
        self.tickets: list[Ticket] = []
        self.closed = False

    def start(self, ids: list[int], params: SamplingParams) -> asyncio.Queue:
        self.tickets, queue = self.service.submit(ids, params, self.n)
        return queue

    def close(self) -> None:
        for t in self.tickets:
            t.cancel()
        if not self.closed:
            self.closed = True
            self.service.admitted -= self.n


class LeasedStream(StreamingResponse):
    """A streaming response that closes its lease even when its body never started (client gone before the
    first byte): an unstarted async generator's `finally` never runs."""

    def __init__(self, body, lease: Lease):
        super().__init__(body, media_type="text/event-stream")
        self.lease = lease

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.lease.close()


# --- app state and the request helpers every route shares ---------------------------------------------------------
@dataclass
class AppState:
    """What the routes read: the service (model, tokenizer, batch engine, limits), the API keys, and how the model's
    replies carry tool calls (`fmt`) and whether its prompt already opens a reasoning block."""

    service: Service
    api_keys: list[str] | None
    fmt: str | None
    think_opened: bool

    @classmethod
    def of(cls, service: Service, api_keys: list[str] | None = None) -> AppState:
        template, tok = service.loaded.template, service.loaded.tokenizer
        return cls(service, api_keys, call_format(template, tok), prompt_opens_think(template, tok))


def app_state(request: Request) -> AppState:
    return request.app.state.chattune


def error_response(e: RequestError) -> JSONResponse:
    return JSONResponse(status_code=e.status, headers=e.headers,
                        content={"error": {"message": e.message, "type": e.kind, "param": e.param, "code": None}})


async def request_error(request: Request, e: RequestError) -> JSONResponse:
    return error_response(e)


def check_auth(state: AppState, request: Request) -> None:
    if state.api_keys:
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or auth[len("Bearer "):] not in state.api_keys:
            raise RequestError("invalid or missing API key", None, 401, "authentication_error")


async def read_body(state: AppState, request: Request) -> dict:
    """The authenticated request's JSON object, refused (413) past --max-body-bytes without reading further."""
    check_auth(state, request)
    limits = state.service.limits
    too_big = RequestError(f"the request body is larger than {limits.max_body_bytes} bytes", None, 413)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise too_big  # refused before reading a byte of it
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise too_big
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw) if size < 65536 else await run_in_threadpool(json.loads, raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"request body is not valid JSON: {e}", None) from None
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object", None)
    if not isinstance(body.get("stream", False), bool):
        raise RequestError("'stream' must be true or false", "stream")
    return body


def usage(prompt: int, results: list[GenerationResult]) -> dict:
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# --- the two kinds of generation request: how each builds its prompt and shapes its replies -------------------------
class TextRequest:
    """POST /v1/completions: a raw prompt string; replies are plain text."""

    id_prefix, object, chunk_object = "cmpl-", "text_completion", "text_completion"
    param = "prompt"  # what a prompt over the limit is blamed on
    model_stops = False  # raw text: the chat template's stop strings do not apply

    def __init__(self, state: AppState, body: dict):
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("'prompt' must be a non-empty string", "prompt")
        self.prompt = prompt

    def encode(self, tok) -> list[int]:  # runs in the thread pool
        return tok(self.prompt).input_ids

    def open(self, i: int) -> list:
        """Stream deltas that open choice i (before any generated text)."""
        return []

    def feed(self, i: int, text: str) -> list:
        """Stream deltas for choice i's newly generated text."""
        return [text]

    def finish(self, i: int, finish_reason: str) -> tuple[list, str]:
        """Choice i's last stream deltas and its finish_reason."""
        return [], finish_reason

    def chunk_choice(self, i: int, delta: str | None, finish: str | None) -> dict:
        return {"index": i, "text": delta or "", "finish_reason": finish}

    def choice(self, i: int, r: GenerationResult) -> dict:
        return {"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}


class ChatRequest:
    """POST /v1/chat/completions: messages (and tools) rendered with the training template; replies are read back as
    content, reasoning_content and tool_calls (streamed as OpenAI streams them)."""

    id_prefix, object, chunk_object = "chatcmpl-", "chat.completion", "chat.completion.chunk"
    param = "messages"
    model_stops = True

    def __init__(self, state: AppState, body: dict):
        self.state = state
        self.messages = chat_messages(body, state.service.limits)
        try:
            self.tools, self.forced = request_tools(body, state.fmt)
        except ToolRequestError as e:
            raise RequestError(str(e), e.param) from None
        self.known = {t["function"]["name"] for t in self.tools} if self.tools else None
        self.forced_prefix = ""  # a named tool_choice: the reply starts with this call's opening
        self.parsers: dict[int, StreamParser] = {}

    def encode(self, tok) -> list[int]:  # runs in the thread pool
        template = self.state.service.loaded.template
        ids = encode_prompt(self.messages, tok, template, self.tools, False if self.forced is not None else None)
        if self.forced is not None:  # the reply must call (this) function: it begins with a call's opening
            self.forced_prefix = forced_call_prefix(template, tok, self.forced, self.tools)
            ids = ids + run_encoder(tok).encode_text(self.forced_prefix, at_start=False)
        return ids

    def open(self, i: int) -> list:
        self.parsers[i] = StreamParser(self.state.fmt, self.known, self.state.think_opened)
        self.parsers[i].feed(self.forced_prefix)  # part of the prompt: read, not sent
        return [{"role": "assistant", "content": ""}]

    def feed(self, i: int, text: str) -> list:
        return [{field: t} for field, t in self.parsers[i].feed(text)]

    def finish(self, i: int, finish_reason: str) -> tuple[list, str]:
        events, calls = self.parsers[i].finish()
        deltas = [{field: text} for field, text in events]
        for k, call in enumerate(calls):  # OpenAI's shape: name first, then the arguments
            head = {"index": k, "id": call["id"], "type": "function",
                    "function": {"name": call["function"]["name"], "arguments": ""}}
            deltas.append({"tool_calls": [head]})
            deltas.append({"tool_calls": [{"index": k, "function": {"arguments": call["function"]["arguments"]}}]})
        return deltas, "tool_calls" if calls else finish_reason

    def chunk_choice(self, i: int, delta: dict | None, finish: str | None) -> dict:
        return {"index": i, "delta": delta if delta is not None else {}, "finish_reason": finish}

    def choice(self, i: int, r: GenerationResult) -> dict:
        parsed = parse_reply(self.forced_prefix + r.text, self.state.fmt, self.known, self.state.think_opened)
        message = {"role": "assistant", "content": parsed.content or (None if parsed.tool_calls else "")}
        if parsed.reasoning is not None:
            message["reasoning_content"] = parsed.reasoning
        if parsed.tool_calls:
            message["tool_calls"] = parsed.tool_calls
        return {"index": i, "message": message,
                "finish_reason": "tool_calls" if parsed.tool_calls else r.finish_reason}


GenRequest = TextRequest | ChatRequest


# --- what both generation routes share: admission, tokenization, streaming, waiting, the response -------------------
async def prepare(state: AppState, request: Request, kind: type[GenRequest]):
    """Body → (body, prompt ids, sampling params, the lease of its admitted generations, the parsed request)."""
    service = state.service
    body = await read_body(state, request)
    params, n = parse_sampling(body, service.limits)
    req = kind(state, body)
    lease = service.admit(n)  # before tokenizing: an over-capacity request costs no CPU
    try:
        ids = await run_in_threadpool(req.encode, service.loaded.tokenizer)
        params = fit_to_context(params, len(ids), service.loaded, service.limits, req.param, req.model_stops)
    except TemplateError as e:  # e.g. tool history for a template without a tool format, parallel calls for one
        lease.close()  # that takes one call per turn
        raise RequestError(f"the model's chat template cannot render these messages: {e}", "messages") from None
    except BaseException:
        lease.close()
        raise
    return body, ids, params, lease, req


def streaming(state: AppState, req: GenRequest, rid: str, ids: list[int], params: SamplingParams,
              lease: Lease) -> StreamingResponse:
    created = int(time.time())
    model = state.service.model_name

    def chunk(index: int, delta, finish: str | None) -> dict:
        return {"id": rid, "object": req.chunk_object, "created": created, "model": model,
                "choices": [req.chunk_choice(index, delta, finish)]}

    async def events():
        # Runs as the response's task: a client that disconnects cancels it (starlette listens for
        # http.disconnect), and the lease cancels the generations, so no slot is held by a dead client.
        try:
            queue = lease.start(ids, params)
            for i in range(lease.n):
                for delta in req.open(i):
                    yield sse(chunk(i, delta, None))
            pending = lease.n
            while pending:
                i, what, payload = await queue.get()
                if what == "delta":
                    for delta in req.feed(i, payload):
                        yield sse(chunk(i, delta, None))
                elif what == "error":
                    yield sse({"error": {"message": payload, "type": "server_error", "param": None, "code": None}})
                    return
                else:
                    pending -= 1
                    deltas, finish = req.finish(i, payload.finish_reason)
                    for delta in deltas:
                        yield sse(chunk(i, delta, None))
                    yield sse(chunk(i, None, finish))
            final = {"id": rid, "object": req.chunk_object, "created": created, "model": model, "choices": [],
                     "usage": usage(len(ids), [t.result for t in lease.tickets])}
            yield sse(final)
            yield "data: [DONE]\n\n"
        finally:
            lease.close()

    return LeasedStream(events(), lease)


async def complete(request: Request, ids: list[int], params: SamplingParams, lease: Lease) -> list[GenerationResult]:
    """Wait for the lease's generations; cancel them the moment the client disconnects."""
    try:
        queue = lease.start(ids, params)
        pending = lease.n
        checked = time.monotonic()
        while pending:
            try:
                i, what, payload = await asyncio.wait_for(queue.get(), timeout=0.2)
            except TimeoutError:
                what = None
            if time.monotonic() - checked >= 0.2:  # deltas may keep coming: look at the client on a clock
                checked = time.monotonic()
                if await request.is_disconnected():
                    return []
            if what == "error":
                raise RequestError(payload, None, 500, "server_error")
            if what == "done":
                pending -= 1
        return [t.result for t in lease.tickets]
    finally:
        lease.close()


async def generate(request: Request, kind: type[GenRequest]):
    """The body of both generation routes: a stream of chunks, or one response with every choice and the usage."""
    state = app_state(request)
    body, ids, params, lease, req = await prepare(state, request, kind)
    rid = f"{req.id_prefix}{secrets.token_hex(12)}"
    if body.get("stream"):
        return streaming(state, req, rid, ids, params, lease)
    results = await complete(request, ids, params, lease)
    return {"id": rid, "object": req.object, "created": int(time.time()), "model": state.service.model_name,
            "choices": [req.choice(i, r) for i, r in enumerate(results)], "usage": usage(len(ids), results)}


# --- the routes (no return annotations: FastAPI would read them as response models) ---------------------------------
async def list_models(request: Request):
    state = app_state(request)
    check_auth(state, request)
    return {"object": "list", "data": [{"id": state.service.model_name, "object": "model", "created": 0,
                                        "owned_by": "chattune"}]}


async def health(request: Request):
    service = app_state(request).service
    return {"status": "ok", "running": service.engine.running, "waiting": service.engine.waiting,
            "admitted": service.admitted, "limit_concurrency": service.limits.limit_concurrency,
            "max_queue": service.limits.max_queue}


async def chat_completions(request: Request):
    return await generate(request, ChatRequest)


async def completions(request: Request):
    return await generate(request, TextRequest)


@asynccontextmanager
async def lifespan(app: FastAPI):
    yield
    app.state.chattune.service.engine.stop()  # after uvicorn's graceful period: cancel whatever is left


def create_app(service: Service, api_keys: list[str] | None = None) -> FastAPI:
    app = FastAPI(title="chattune OpenAI-compatible API", lifespan=lifespan)
    app.state.chattune = AppState.of(service, api_keys)
    app.add_exception_handler(RequestError, request_error)
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    return app


def main(argv: list[str] | None = None) -> int:
    d = Limits()
    p = argparse.ArgumentParser(prog="python -m serve.openai_api_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--model-name", help="model id reported by /v1/models (default: the directory name)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-keys", help="comma-separated keys; requests must send `Authorization: Bearer KEY`")
    p.add_argument("--limit-concurrency", type=int, default=d.limit_concurrency,
                   help=f"generations decoded together (default {d.limit_concurrency})")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"generations that may wait for a slot; beyond, 429 with Retry-After (default {d.max_queue})")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="larger request bodies get 413")
    p.add_argument("--max-messages", type=int, default=d.max_messages, help="messages per chat request")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="prompt tokens per request (default: the model's context minus one)")
    p.add_argument("--max-stop-chars", type=int, default=d.max_stop_chars, help="characters per stop string")
    p.add_argument("--max-n", type=int, default=d.max_n, help="choices per request (n)")
    p.add_argument("--graceful-shutdown", type=float, default=30.0,
                   help="seconds in-flight generations get after SIGTERM before they are cancelled (default 30)")
    args = p.parse_args(argv)
    for flag in ("limit_concurrency", "max_body_bytes", "max_messages", "max_stop_chars", "max_n"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.max_queue < 0 or args.graceful_shutdown < 0:
        p.error("--max-queue and --graceful-shutdown must be >= 0")
    limits = Limits(args.max_body_bytes, args.max_messages, args.max_prompt_tokens, d.max_stop, args.max_stop_chars,
                    args.max_n, args.limit_concurrency, args.max_queue)
    try:
        loaded = load_from_args(args)
    except (ServeLoadError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    import os

    import uvicorn

    name = args.model_name or os.path.basename(os.path.normpath(args.model_path))
    keys = [k.strip() for k in args.api_keys.split(",") if k.strip()] if args.api_keys else None
    app = create_app(Service(loaded, name, limits), keys)
    print(f"[serve] {loaded.kind} model {name!r} (template {loaded.template}) on http://{args.host}:{args.port}/v1; "
          f"{limits.limit_concurrency} concurrent generations, {limits.max_queue} queued", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=args.graceful_shutdown))
    # uvicorn re-raises the signal it shut down for once it is done, under the handler that was there before;
    # a no-op one turns a clean SIGTERM shutdown into exit status 0 instead of death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    print("[serve] stopped", flush=True)
    return 0


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(main())
