"""The learning routes (`hyprjax serve --learn NAME`), thin over hyprjax.learn.Learner:

- `POST /v1/feedback` `{"id": COMPLETION_ID, "label": true|false}`, `{"id", "score": 0..1}` or
  `{"id", "correction": "better answer"}` (optionally `"choice": i` for n > 1): 200 with what was
  stored, 404 for an id this server did not record, 400 for a malformed body.
- `GET /v1/adapters/NAME`: versions, the alias target, training status, feedback counts and
  the last round's numbers.
- `POST /v1/adapters/NAME/train`: 202 with the round's job (queued now, or already queued).
- `POST /v1/adapters/NAME/rollback`: the alias back to the version the live one replaced.

Every route needs the API key when the server has one. The learner's calls touch SQLite only
(milliseconds), but run on a worker thread so the event loop never waits on the disk.
"""

from __future__ import annotations

import logging

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .errors import APIError, internal_error, unauthorized

logger = logging.getLogger("hyprjax.serve")


def learn_error(e) -> APIError:
    """A LearnError as an OpenAI-shaped error with its status (400, 404 or 409)."""
    kind = {404: "not_found_error", 409: "conflict_error"}.get(e.status, "invalid_request_error")
    return APIError(e.status, str(e), kind, None, None)


class LearnRoutes:
    def __init__(self, server, learner):
        self.server, self.learner = server, learner

    async def _run(self, request: Request, fn, *, body: bool = False, status: int = 200) -> Response:
        from hyprjax.learn.learner import LearnError

        try:
            if not self.server._authorized(request):
                raise unauthorized()
            args = []
            if body:
                from .app import _json_body
                args.append(await _json_body(request, self.server.max_request_bytes))
            result = await run_in_threadpool(fn, *args)
            if isinstance(result, tuple):  # (body, status)
                result, status = result
            return JSONResponse(result, status_code=status)
        except LearnError as e:
            return learn_error(e).response()
        except APIError as e:
            return e.response()
        except Exception:
            logger.exception("%s failed", request.url.path)
            return internal_error().response()

    async def feedback(self, request: Request) -> Response:
        return await self._run(request, self.learner.feedback, body=True)

    async def adapter(self, request: Request) -> Response:
        return await self._run(request, lambda: self.learner.status(request.path_params["name"]))

    async def train(self, request: Request) -> Response:
        def start():
            job, queued = self.learner.train(request.path_params["name"])
            return {"object": "adapter.training", "queued": queued, **job.view()}, 202
        return await self._run(request, start)

    async def rollback(self, request: Request) -> Response:
        return await self._run(request, lambda: self.learner.rollback(request.path_params["name"]))


def recorded_request(chat: bool, req, tokenizer) -> dict | None:
    """What a learned adapter's interaction stores as its request, or None if it is not one the
    trainer can learn from: a batch of prompts, or a chat with tools or template arguments (the
    trainer renders the plain template, so it would learn from another prompt than was served)."""
    if chat:
        if req.tools or req.template_kwargs or not req.add_generation_prompt:
            return None
        return {"messages": req.messages}
    if len(req.prompts) != 1:
        return None
    prompt = req.prompts[0]
    return {"prompt": prompt if isinstance(prompt, str) else tokenizer.decode(prompt)}
