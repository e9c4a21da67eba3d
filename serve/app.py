"""The OpenAI-compatible HTTP app: parse, validate, enqueue, stream back. It never touches the model.

Each /v1 request is tokenized here (off the event loop), turned into one engine request per
choice with `engine.generate`, and answered from those requests' own streams. A client that goes
away closes its streams, which aborts its engine requests; every failure is an OpenAI-shaped
error (`errors.py`), never a traceback.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import secrets
import time
import uuid
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles


from . import responses as R
from .engine_api import (AdapterError, AdapterNotFoundError, AdapterPathError, Engine, EngineDeadError, EngineError,
                         HyprjaxError, LoraRequest, PromptTooLongError, QueueFullError, check_allowed)
from .errors import (APIError, adapter_not_found, bad_request, forbidden, internal_error, model_not_found,
                     overloaded, too_large, unauthorized)
from .learn_routes import LearnRoutes, recorded_request
from .metrics import ServerMetrics
from .openapi import openapi_schema
from .protocol import DEFAULT_COMPLETION_MAX_TOKENS, ChatRequest, CompletionRequest, parse_chat, parse_completion, \
    params_for
from .streams import ChoiceStreams

logger = logging.getLogger("hyprjax.serve")


DEFAULT_MAX_REQUEST_BYTES = 16 << 20  # a 128k-token prompt as text is ~0.5 MB; JSON token ids ~1 MB


def create_app(engine: Engine, *, api_key: str | None = None, served_model_names: list[str] | None = None,
               lora_paths: list[str] | None = None, lora_dir: str | None = None, enable_adapter_admin: bool = False,
               public_metrics: bool = False, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               learner=None) -> Starlette:
    """A Starlette app serving `engine`; with `api_key`, /v1 routes (and /metrics, unless
    `public_metrics`) need `Authorization: Bearer KEY`.

    The adapter admin routes (load/unload) answer 403 unless `enable_adapter_admin` (vLLM keeps
    them off by default too); loads may name only `lora_paths` (the --lora paths) or paths
    inside `lora_dir`. A request body over `max_request_bytes` gets 413. With a `learner`
    (hyprjax.learn.Learner: `--learn NAME`), learned adapters answer under their alias, pinned to
    the live version at admission, their interactions are recorded, and the learning routes
    (serve/learn_routes.py) are on.
    """
    server = _Server(engine, api_key, served_model_names or [engine.model_name], list(lora_paths or []), lora_dir,
                     learner)
    server.enable_adapter_admin, server.public_metrics = enable_adapter_admin, public_metrics
    server.max_request_bytes = max_request_bytes
    routes = [Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
              Route("/v1/completions", server.completions, methods=["POST"]),
              Route("/v1/models", server.models, methods=["GET"]),
              Route("/v1/load_lora_adapter", server.load_lora_adapter, methods=["POST"]),
              Route("/v1/unload_lora_adapter", server.unload_lora_adapter, methods=["POST"]),
              Route("/health", server.health, methods=["GET"]),
              Route("/metrics", server.metrics_endpoint, methods=["GET"]),
              Route("/openapi.json", _openapi, methods=["GET"]),
              Route("/", _chat_page, methods=["GET"]),
              Mount("/static", StaticFiles(directory=WEB_DIR), name="static")]
    if learner is not None:
        learn = LearnRoutes(server, learner)
        routes += [Route("/v1/feedback", learn.feedback, methods=["POST"]),
                   Route("/v1/adapters/{name}", learn.adapter, methods=["GET"]),
                   Route("/v1/adapters/{name}/train", learn.train, methods=["POST"]),
                   Route("/v1/adapters/{name}/rollback", learn.rollback, methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
    app.state.metrics = server.metrics
    return app


WEB_DIR = Path(__file__).parent / "web"


async def _openapi(request: Request) -> Response:
    """The server's OpenAPI 3 description (serve/openapi.py)."""
    return JSONResponse(openapi_schema())


async def _chat_page(request: Request) -> Response:
    """The web chat page (serve/web: static files, no build step). It holds no secret: with
    --api-key it asks the user for the key and sends it on its /v1 calls."""
    return FileResponse(WEB_DIR / "index.html", media_type="text/html")


class ModelNames:
    """The names requests may ask for: the base model's, and the engine's LoRA adapters.

    Adapters are read from the engine on each call (`adapters()`: name -> path), so hot loads
    and unloads show at once; each is listed in /v1/models with its name as "root" (never its
    path) and the base model as "parent", and accepted as `model` (vLLM's convention).
    """

    def __init__(self, names: list[str], root: str, max_model_len: int, adapters=lambda: {},
                 adapter_info=lambda name: {}, aliases=lambda: {}):
        if not names:
            raise ValueError("served_model_names=[]: serve at least one name")
        self.names, self.root, self.max_model_len = list(names), root, max_model_len
        self.adapters, self.adapter_info, self.aliases = adapters, adapter_info, aliases
        self.created = int(time.time())

    def resolve(self, requested: str | None) -> str:
        """The model name to answer with; 404 for a name not served."""
        if requested is None:
            return self.names[0]
        if requested in self.names or requested in self.adapters() or requested in self.aliases():
            return requested
        raise model_not_found(requested)

    def cards(self) -> list[dict]:
        def card(name, root, parent):
            return {"id": name, "object": "model", "created": self.created, "owned_by": "hyprjax",
                    "root": root, "parent": parent, "max_model_len": self.max_model_len}

        # An adapter's root is its name: its path on the server's disk is nobody else's business.
        # Its card also says what it is: kind (lora, shira, block-sparse, lora+sparse), density,
        # bytes as held in memory, trained values and rank. A learned adapter's alias says which
        # version it points at; its versions are listed as adapters of their own.
        aliases = self.aliases()
        return [card(n, self.root, None) for n in self.names] + [
            {**card(n, n, self.names[0]), "adapter": self.adapter_info(n)} for n in sorted(self.adapters())] + [
            {**card(n, n, self.names[0]), "adapter": {**self.adapter_info(target), "alias_of": target}}
            for n, target in sorted(aliases.items())]


class _Server:
    """The handlers of one app, sharing its engine, names, key and metrics."""

    def __init__(self, engine: Engine, api_key: str | None, names: list[str], lora_paths: list[str],
                 lora_dir: str | None, learner=None):
        self.engine = engine
        self.api_key = api_key
        self.lora_paths, self.lora_dir = lora_paths, lora_dir
        self.learner = learner
        self.names = ModelNames(names, engine.model_name, engine.max_model_len, engine.adapters,
                                getattr(engine, "adapter_info", lambda name: {}),
                                learner.aliases if learner is not None else lambda: {})
        self.metrics = ServerMetrics(engine, learner)
        decode = engine.tokenizer.decode
        # Logprob entries show each token on its own, special tokens included.
        self.token_text = functools.lru_cache(maxsize=1 << 16)(lambda i: decode([i], skip_special_tokens=False))

    # ------------------------------------------------------------------------------------- routes
    async def chat_completions(self, request: Request) -> Response:
        return await self._post(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._post(request, "completion")

    async def models(self, request: Request) -> Response:
        if not self._authorized(request):
            return unauthorized().response()
        self.names.max_model_len = self.engine.max_model_len  # known once the engine has loaded
        return JSONResponse({"object": "list", "data": self.names.cards()})

    async def load_lora_adapter(self, request: Request) -> Response:
        """{"lora_name", "lora_path"}: read the adapter and make it servable (vLLM's endpoint)."""
        async def load(body):
            name = _required_str(body, "lora_name")
            path = _required_str(body, "lora_path")
            if name in self.names.names:
                raise bad_request(f"'{name}' is the base model's name", param="lora_name")
            if self.lora_dir is not None and not os.path.isabs(os.path.expanduser(path)):
                path = os.path.join(self.lora_dir, path)  # relative names are inside --lora-dir
            try:
                resolved = check_allowed(path, self.lora_paths, self.lora_dir)
            except AdapterPathError as e:
                raise forbidden(str(e), param="lora_path") from None
            await self.engine.load_adapter(name, str(resolved))
            return JSONResponse({"object": "lora_adapter", "lora_name": name, "lora_path": str(resolved),
                                 "status": "loaded"})

        return await self._admin(request, load)

    async def unload_lora_adapter(self, request: Request) -> Response:
        """{"lora_name"}: refuse it to new requests now; answer once its running requests end."""
        async def unload(body):
            name = _required_str(body, "lora_name")
            await self.engine.unload_adapter(name)
            return JSONResponse({"object": "lora_adapter", "lora_name": name, "status": "unloaded"})

        return await self._admin(request, unload)

    async def _admin(self, request: Request, handle) -> Response:
        try:
            if not self._authorized(request):
                raise unauthorized()
            if not self.enable_adapter_admin:
                raise forbidden(f"{request.url.path} is off: start the server with --enable-adapter-admin to load "
                                "and unload adapters at runtime")
            return await handle(await _json_body(request, self.max_request_bytes))
        except APIError as e:
            return e.response()
        except AdapterNotFoundError as e:
            return adapter_not_found(str(e), param="lora_name").response()
        except QueueFullError as e:
            return overloaded(str(e)).response()
        except HyprjaxError as e:  # the adapter's files, or a name already taken
            return bad_request(str(e)).response()
        except EngineError as e:
            return _engine_error(e).response()
        except Exception:
            logger.exception("%s failed", request.url.path)
            return internal_error().response()

    async def health(self, request: Request) -> Response:
        reason = self.engine.dead_reason
        if reason is not None:  # the engine is down: not "loading", and retrying will not help
            return JSONResponse({"status": "error", "reason": reason}, status_code=500)
        if not self.engine.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_endpoint(self, request: Request) -> Response:
        if not self.public_metrics and not self._authorized(request):
            return unauthorized().response()
        body, content_type = self.metrics.render()
        return Response(body, headers={"Content-Type": content_type})

    # ----------------------------------------------------------------------------------- handling
    async def _post(self, request: Request, kind: str) -> Response:
        arrival = time.monotonic()
        try:
            if not self._authorized(request):
                raise unauthorized()
            body = await _json_body(request, self.max_request_bytes)
            return await _unless_disconnected(request, self._generate(kind, body, arrival))
        except APIError as e:
            return e.response()
        except EngineError as e:  # the engine failed this request (or is down), not the client
            return _engine_error(e).response()
        except Exception:
            logger.exception("%s failed", request.url.path)
            return internal_error().response()

    async def _generate(self, kind: str, body: dict, arrival: float) -> Response:
        chat = kind == "chat"
        reason = self.engine.dead_reason
        if reason is not None:
            raise _engine_error(EngineDeadError(reason))
        if not self.engine.ready:  # the context length and the compiled steps are not there yet
            raise overloaded("the model is still loading and compiling; retry shortly")
        req: ChatRequest | CompletionRequest = parse_chat(body) if chat else parse_completion(body)
        opts = req.options
        model = self.names.resolve(opts.model)
        lora = opts.lora
        if model not in self.names.names:  # the model field named an adapter
            if lora is not None:
                raise bad_request(f"'model' names the adapter '{model}' and 'lora_adapters' names "
                                  f"{list(lora.adapters)}: name adapters in one place", param="lora_adapters")
            lora = LoraRequest.make([model])
        learned = None  # (adapter, version) whose interaction is recorded
        if self.learner is not None:
            lora, learned = self.learner.pin(lora)
            record = recorded_request(chat, req, self.engine.tokenizer) if learned else None
            learned = learned if record is not None else None
        prompts = await run_in_threadpool(self._chat_ids if chat else self._completion_ids, req)
        param = "messages" if chat else "prompt"
        default = None if chat else DEFAULT_COMPLETION_MAX_TOKENS
        jobs = [(ids, params_for(opts, len(ids), self.engine.max_model_len, default_max_tokens=default, choice=j,
                                 prompt_param=param)) for ids in prompts for j in range(opts.n)]
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            label = None if lora is None else "+".join(sorted(lora.adapters))
            streams = await ChoiceStreams.start(self.engine, jobs, request_id=rid, logprobs=opts.logprobs, lora=lora,
                                                timer=lambda: self.metrics.request(arrival, model_name=model,
                                                                                   lora_name=label))
        except AdapterNotFoundError as e:
            raise adapter_not_found(str(e), param="model" if opts.lora is None else "lora_adapters") from None
        except AdapterError as e:
            raise bad_request(str(e), param="lora_adapters") from None
        except QueueFullError as e:
            raise overloaded(str(e)) from None
        except PromptTooLongError as e:
            raise bad_request(str(e), param=param, code="context_length_exceeded") from None
        except HyprjaxError as e:
            raise bad_request(str(e)) from None
        async def record_interaction(texts: list[str], finish: list[str]) -> None:
            try:
                await run_in_threadpool(self.learner.record, rid, *learned, record, texts, finish)
            except Exception:  # the answer stands; only its record is lost, and the log says so
                logger.exception("recording %s for learning failed", rid)

        on_done = record_interaction if learned is not None else None
        headers = {} if lora is None else {"x-hyprjax-adapter": "+".join(lora.adapters)}
        answer = _Answer(kind, rid, int(time.time()), model, opts.logprobs is not None, self.token_text,
                         prompt_tokens=sum(len(ids) for ids in prompts), n=opts.n, on_done=on_done)
        if opts.stream:
            return _EngineStreamResponse(answer.events(streams, opts.include_usage), streams, headers)
        try:
            choices = [R.Choice() for _ in jobs]
            async for i, out in streams.outputs():
                choices[i].add(out)
        finally:
            await streams.aclose()
        if on_done is not None and all(c.finish_reason in ("stop", "length") for c in choices):
            await on_done(["".join(c.text) for c in choices], [c.finish_reason for c in choices])
        return JSONResponse(answer.whole(choices), headers=headers)

    def _chat_ids(self, req: ChatRequest) -> list[list[int]]:
        tok = self.engine.tokenizer
        try:
            text = tok.apply_chat_template(req.messages, add_generation_prompt=req.add_generation_prompt,
                                           tools=req.tools, **req.template_kwargs)
        except HyprjaxError as e:
            raise bad_request(str(e), param="messages") from None
        return [tok.encode(text, add_special_tokens=False)]  # the template writes BOS itself

    def _completion_ids(self, req: CompletionRequest) -> list[list[int]]:
        tok, out = self.engine.tokenizer, []
        for p in req.prompts:
            ids = tok.encode(p) if isinstance(p, str) else p
            if not ids:
                raise bad_request("'prompt' is empty (no tokens)", param="prompt")
            bad = next((t for t in ids if not 0 <= t < tok.vocab_size), None)
            if bad is not None:
                raise bad_request(f"'prompt' has token id {bad}, outside the vocabulary [0, {tok.vocab_size})",
                                  param="prompt")
            out.append(ids)
        return out

    def _authorized(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key.encode())


class _Answer:
    """Turns one request's engine outputs into OpenAI's body (`whole`) or SSE events (`events`)."""

    def __init__(self, kind: str, rid: str, created: int, model: str, want_logprobs: bool, token_text,
                 *, prompt_tokens: int, n: int, on_done=None):
        self.chat = kind == "chat"
        self.rid, self.created, self.model = rid, created, model
        self.want_logprobs, self.token_text = want_logprobs, token_text
        self.prompt_tokens, self.n = prompt_tokens, n
        self.on_done = on_done  # async fn(texts, finish reasons): every choice finished (stop or length)

    def _usage(self, output_tokens: list[int], cached: list[int]) -> dict:
        # A prompt is counted once however many choices it has; choice p * n is prompt p's first.
        return R.usage(self.prompt_tokens, sum(output_tokens), sum(cached[:: self.n]))

    def whole(self, choices: list[R.Choice]) -> dict:
        build = R.chat_response if self.chat else R.completion_response
        u = self._usage([c.num_output_tokens for c in choices], [c.num_cached_tokens for c in choices])
        return build(self.rid, self.created, self.model, choices, self.want_logprobs, self.token_text, u)

    async def events(self, streams: ChoiceStreams, include_usage: bool):
        head = (self.rid, self.created, self.model)
        k = len(streams)
        output_tokens, cached, offsets = [0] * k, [0] * k, [0] * k
        texts, finished = [[] for _ in range(k)], [None] * k
        try:
            if self.chat:  # OpenAI opens each choice with the role
                for i in range(k):
                    yield R.sse(R.chat_chunk(*head, i, {"role": "assistant", "content": ""}, with_usage=include_usage))
            async for i, out in streams.outputs():
                output_tokens[i], cached[i] = out.num_output_tokens, out.num_cached_tokens
                texts[i].append(out.new_text)
                if out.finished:
                    finished[i] = out.finish_reason
                lp = None
                if self.want_logprobs and out.logprobs:
                    if self.chat:
                        lp = R.chat_logprobs(out.logprobs, self.token_text)
                    else:
                        lp, offsets[i] = R.completion_logprobs(out.logprobs, self.token_text, offsets[i])
                finish = out.finish_reason if out.finished else None
                if self.chat:
                    if out.new_text or lp:
                        yield R.sse(R.chat_chunk(*head, i, {"content": out.new_text}, logprobs=lp,
                                                 with_usage=include_usage))
                    if out.finished:
                        yield R.sse(R.chat_chunk(*head, i, {}, finish_reason=finish, with_usage=include_usage))
                elif out.new_text or lp or out.finished:
                    yield R.sse(R.completion_chunk(*head, i, out.new_text, logprobs=lp, finish_reason=finish,
                                                   with_usage=include_usage))
            if include_usage:
                obj = "chat.completion.chunk" if self.chat else "text_completion"
                yield R.sse(R.usage_chunk(obj, *head, self._usage(output_tokens, cached)))
            if self.on_done is not None and all(f in ("stop", "length") for f in finished):
                await self.on_done(["".join(t) for t in texts], finished)
        except Exception as e:  # headers are gone: report in-band, as OpenAI and vLLM do
            logger.exception("stream %s failed", self.rid)
            yield R.sse((_engine_error(e) if isinstance(e, EngineError) else internal_error()).body())
        yield R.DONE


class _EngineStreamResponse(StreamingResponse):
    """An SSE response that closes its engine streams however it ends: done, client gone, or error."""

    def __init__(self, events, streams: ChoiceStreams, headers: dict | None = None):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self._streams = streams

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self._streams.aclose()


def _engine_error(e: EngineError) -> APIError:
    """500 naming what failed: a step (the engine recovered, a retry may succeed) or the whole engine."""
    code = "engine_dead" if isinstance(e, EngineDeadError) else "engine_step_failed"
    return APIError(500, str(e), "server_error", None, code)


def _required_str(body: dict, name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise bad_request(f"'{name}' is required and must be a non-empty string", param=name)
    return value


async def _json_body(request: Request, limit: int) -> dict:
    """The JSON object of the body, read up to `limit` bytes (413 past it, before parsing)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit, exact=False)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise bad_request(f"The request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad_request(f"The request body must be a JSON object, got {type(body).__name__}")
    return body


async def _unless_disconnected(request: Request, work) -> Response:
    """Await `work`, cancelling it if the client disconnects first (its streams close, aborting them)."""
    task = asyncio.ensure_future(work)

    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(watcher, task, return_exceptions=True)
    if task.cancelled():
        logger.info("client disconnected from %s; its request was aborted", request.url.path)
        return Response(status_code=499)  # nobody reads it
    return task.result()


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own 404/405 in OpenAI's error shape."""
    return APIError(exc.status_code, str(exc.detail), "invalid_request_error", None, None,
                    dict(exc.headers or {})).response()
