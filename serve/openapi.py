"""The OpenAPI 3 description of the server, published at /openapi.json.

Written by hand from serve/protocol.py's parsers (the request fields each route reads, with
their types and ranges) and serve/errors.py's answers (every error is OpenAI's
`{"error": {"message", "type", "param", "code"}}` with its status). Clients can generate code
from it, and tests/serve/test_openapi_fuzz.py has schemathesis check the server against it:
no 5xx, and every answer in the documented statuses, media types and shapes.
"""

from __future__ import annotations

from .protocol import MAX_LOGPROBS_COMPLETION, MAX_N, MAX_STOP, MAX_STOP_CHARS, MAX_TOP_LOGPROBS_CHAT

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def _errors(*statuses: int) -> dict:
    what = {400: "the request is malformed or out of range", 401: "a missing or wrong API key",
            403: "the route is off, or a path is not allowed", 404: "an unknown model or adapter",
            409: "nothing to do yet (no new or held-out feedback; no earlier version)",
            413: "the body is over --max-request-bytes", 429: "the waiting queue is full",
            500: "the engine failed (or is down); never the client's fault",
            503: "the model is still loading"}
    return {str(s): {"description": what[s], "content": {"application/json": {"schema": _ERROR}}} for s in statuses}


_NUMBER_OR_NULL = {"type": ["number", "null"]}
_SAMPLING = {
    "model": {"type": ["string", "null"], "description": "the served model or an adapter's name"},
    "max_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": 2**31 - 1},
    "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 1e4},
    "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": ["integer", "null"], "minimum": -1, "maximum": 2**31 - 1, "description": "0 or -1: off"},
    "min_p": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
    "presence_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
    "repetition_penalty": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1e4},
    "seed": {"type": ["integer", "null"]},
    "n": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_N},
    "stream": {"type": ["boolean", "null"]},
    "stop": {"oneOf": [{"type": "string", "maxLength": MAX_STOP_CHARS},
                       {"type": "array", "maxItems": MAX_STOP, "items": {"type": "string", "maxLength": MAX_STOP_CHARS}},
                       {"type": "null"}]},
    "ignore_eos": {"type": ["boolean", "null"]},
    "speculative": {"type": ["boolean", "null"], "description": "false: no speculative decoding for this request"},
    "user": {"type": ["string", "null"]},
    "lora_adapters": {"oneOf": [{"type": "string", "minLength": 1},
                                {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                                {"type": "null"}],
                      "description": "adapters mixed for this request (needs lora_weights to weigh them)"},
    "lora_weights": {"oneOf": [{"type": "object", "additionalProperties": {"type": "number"}},
                               {"type": "array", "items": {"type": "number"}}, {"type": "null"}]},
    "lora_combination_strategy": {"enum": ["weighted_sum", "linear", "ties", "dare_linear", "dare_ties", None]},
}
_MESSAGE = {"type": "object", "required": ["role"],  # any role the chat template knows (system, user, tool, ...)
            "properties": {"role": {"type": "string"},
                           "content": {"oneOf": [{"type": "string"}, {"type": "null"}, {"type": "array", "items": {
                               "type": "object", "required": ["type", "text"],
                               "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}]}}}
_CHOICE = {"type": "object", "required": ["index"], "properties": {"index": {"type": "integer"}}}
_COMPLETION_ANSWER = {"type": "object", "required": ["id", "object", "created", "model", "choices"],
                      "properties": {"id": {"type": "string"}, "object": {"type": "string"},
                                     "created": {"type": "integer"}, "model": {"type": "string"},
                                     "choices": {"type": "array", "items": _CHOICE},
                                     "usage": {"type": ["object", "null"]}}}
_GENERATED = {"description": "the answer, or with stream=true its server-sent events",
              "content": {"application/json": {"schema": _COMPLETION_ANSWER},
                          "text/event-stream": {"schema": {  # one per event: data is a JSON chunk or [DONE]
                              "type": "object", "required": ["data"],
                              "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}}}}
_ADMIN_STATUSES = (400, 401, 403, 404, 413, 429, 500)
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}


def openapi_schema() -> dict:
    chat_body = {"type": "object", "required": ["messages"], "properties": {
        **_SAMPLING,
        "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
        "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": 2**31 - 1},
        "logprobs": {"type": ["boolean", "null"]},
        "top_logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_TOP_LOGPROBS_CHAT},
        "add_generation_prompt": {"type": ["boolean", "null"]},
        "chat_template_kwargs": {"type": ["object", "null"]}}}
    completion_body = {"type": "object", "required": ["prompt"], "properties": {
        **_SAMPLING,
        "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "string"}},
                             {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}]},
        "logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_LOGPROBS_COMPLETION}}}

    def post(summary, body, ok, statuses):
        return {"post": {"summary": summary, "security": [{"bearer": []}, {}],
                         "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
                         "responses": {"200": ok, **_errors(*statuses)}}}

    generated = (400, 401, 404, 413, 429, 500, 503)
    admin_ok = {"description": "done", "content": {"application/json": {"schema": {"type": "object"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "hyprjax", "version": "1",
                 "description": "OpenAI-compatible serving of one base model and its LoRA adapters"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/v1/chat/completions": post("a chat reply (OpenAI's chat completions)", chat_body, _GENERATED, generated),
            "/v1/completions": post("a text completion (OpenAI's completions)", completion_body, _GENERATED,
                                    generated),
            "/v1/models": {"get": {"summary": "the base model and the adapters", "security": [{"bearer": []}, {}],
                                   "responses": {"200": {"description": "the model cards", "content": {
                                       "application/json": {"schema": {
                                           "type": "object", "required": ["object", "data"],
                                           "properties": {"object": {"const": "list"},
                                                          "data": {"type": "array", "items": {"type": "object"}}}}}}},
                                       **_errors(401)}}},
            "/v1/load_lora_adapter": post(
                "load an adapter (with --enable-adapter-admin)",
                {"type": "object", "required": ["lora_name", "lora_path"],
                 "properties": {"lora_name": {"type": "string"}, "lora_path": {"type": "string"}}},
                admin_ok, _ADMIN_STATUSES),
            "/v1/unload_lora_adapter": post(
                "unload an adapter (with --enable-adapter-admin)",
                {"type": "object", "required": ["lora_name"], "properties": {"lora_name": {"type": "string"}}},
                admin_ok, _ADMIN_STATUSES),
            "/v1/feedback": post(
                "feedback on a learned adapter's completion (with --learn): exactly one of label, score (0..1), "
                "correction",
                {"type": "object", "required": ["id"], "properties": {
                    "id": {"type": "string"}, "label": {"type": "boolean"},
                    "score": {"type": "number", "minimum": 0, "maximum": 1}, "correction": {"type": "string"},
                    "choice": {"type": "integer", "minimum": 0}}},
                admin_ok, (400, 401, 404, 413, 500)),
            "/v1/adapters/{name}": {"get": {
                "summary": "a learned adapter: versions, alias target, training status, last round (with --learn)",
                "security": [{"bearer": []}, {}], "parameters": [_NAME],
                "responses": {"200": admin_ok, **_errors(401, 404)}}},
            "/v1/adapters/{name}/train": {"post": {
                "summary": "start a training round now (with --learn); 202 with its job",
                "security": [{"bearer": []}, {}], "parameters": [_NAME],
                "responses": {"202": admin_ok, **_errors(401, 404, 409)}}},
            "/v1/adapters/{name}/rollback": {"post": {
                "summary": "point the alias back at the version the live one replaced (with --learn)",
                "security": [{"bearer": []}, {}], "parameters": [_NAME],
                "responses": {"200": admin_ok, **_errors(401, 404, 409)}}},
            "/health": {"get": {"summary": "200 when ready", "responses": {
                "200": {"description": "ready", "content": {"application/json": {"schema": {"type": "object"}}}},
                "500": {"description": "the engine is down", "content": {"application/json": {
                    "schema": {"type": "object"}}}},
                "503": {"description": "loading", "content": {"application/json": {"schema": {"type": "object"}}}}}}},
        },
    }
