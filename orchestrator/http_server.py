"""OpenAI-compatible HTTP (`/v1/models`, `/v1/completions`, `/v1/chat/completions`, with SSE
streaming), Prometheus `/metrics` and `/health`, on aiohttp in the server's event loop.

Errors use OpenAI's JSON shape, `{"error": {"message", "type", "param", "code"}}`: 400 for bad
input, 401 without the bearer token, 404 for another model's name, 429 when full, 503 while
draining or when the cluster failed the request.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time
import uuid
from typing import Any

from afd.models.tokenizer import ChatTemplateError, render_chat
from afd.orchestrator.service import (
    Finished,
    InvalidRequest,
    Overloaded,
    Prompt,
    Service,
    Unavailable,
)
from aiohttp import web

_SERVICE = web.AppKey("service", Service)
log = logging.getLogger(__name__)
_NUMBER = (int, float)
# The type of every field afd reads from a request body (others are ignored, as OpenAI's
# clients send fields afd has no use for). `bool` never passes for a number.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "prompt": (str, list),
    "messages": (list,),
    "max_tokens": (int,),
    "max_completion_tokens": (int,),
    "temperature": _NUMBER,
    "top_p": _NUMBER,
    "top_k": (int,),
    "seed": (int,),
    "n": (int,),
    "stop": (str, list),
    "stop_token_ids": (list,),
    "ignore_eos": (bool,),
    "logprobs": (bool, int),
    "stream": (bool,),
    "stream_options": (dict,),
}
_TYPE_NAMES = {
    str: "a string",
    list: "a list",
    dict: "an object",
    bool: "true or false",
    int: "an integer",
    float: "a number",
}


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param


def make_app(service: Service, token: str | None) -> web.Application:
    app = web.Application(
        middlewares=[_errors, *([_bearer(token)] if token else [])],
        client_max_size=service.deployment.serve.max_message_bytes,
    )
    app[_SERVICE] = service
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/health", _health)
    return app


@web.middleware
async def _errors(request: web.Request, handler) -> web.StreamResponse:
    service = request.app[_SERVICE]
    try:
        return await handler(request)
    except _HTTPError as err:
        return _error(err.status, str(err), err.kind, err.param)
    except InvalidRequest as err:
        service.metrics.failed("INVALID_ARGUMENT")
        return _error(400, str(err), "invalid_request_error", err.field)
    except Overloaded as err:
        return _error(429, str(err), "rate_limit_error")
    except Unavailable as err:
        return _error(503, str(err), "service_unavailable")
    except web.HTTPRequestEntityTooLarge as err:
        return _error(413, err.text or "request body too large", "invalid_request_error")
    except web.HTTPException as err:  # no such route, a wrong method: the same JSON shape
        return _error(
            err.status, f"{request.method} {request.path}: {err.reason}", "invalid_request_error"
        )
    except Exception:  # a bug, not the client's fault: say so in JSON and keep serving
        log.exception("HTTP %s %s failed", request.method, request.path)
        return _error(500, "internal server error", "server_error")


def _bearer(token: str):
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler) -> web.StreamResponse:
        if request.path.startswith("/v1/"):
            sent = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(sent, expected):
                raise _HTTPError(
                    401, "missing or wrong 'Authorization: Bearer' token", "authentication_error"
                )
        return await handler(request)

    return check


def _error(status: int, message: str, kind: str, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return web.json_response(body, status=status)


async def _models(request: web.Request) -> web.Response:
    service = request.app[_SERVICE]
    card = {"id": service.model_name, "object": "model", "created": 0, "owned_by": "afd"}
    return web.json_response({"object": "list", "data": [card]})


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[_SERVICE].metrics.exposition()
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


async def _health(request: web.Request) -> web.Response:
    if request.app[_SERVICE].draining:
        return web.json_response({"status": "draining"}, status=503)
    return web.json_response({"status": "ok"})


# ---- completions --------------------------------------------------------------------------
async def _completions(request: web.Request) -> web.StreamResponse:
    service = request.app[_SERVICE]
    body = await _body(request, service)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        parsed = _parse(service, body, text=prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        parsed = _parse(service, body, ids=prompt)
    else:
        raise InvalidRequest("prompt", "must be a string or a list of token ids (one prompt)")
    return await _respond(request, service, body, parsed, chat=False)


async def _chat(request: web.Request) -> web.StreamResponse:
    service = request.app[_SERVICE]
    body = await _body(request, service)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages", "must be a non-empty list of {role, content} objects")
    for m in messages:
        if not (
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
        ):
            raise InvalidRequest("messages", "every message needs a string role and string content")
    try:
        text = render_chat(service.tokenizer.chat_template, messages)
    except ChatTemplateError as err:
        raise InvalidRequest("messages", str(err)) from err
    body.setdefault("max_tokens", body.get("max_completion_tokens"))
    return await _respond(request, service, body, _parse(service, body, text=text), chat=True)


async def _body(request: web.Request, service: Service) -> dict[str, Any]:
    """The request's JSON object, its fields of the right types, or InvalidRequest."""
    raw = await request.read()
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise InvalidRequest("body", f"not valid UTF-8 (byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise InvalidRequest("body", f"not valid JSON ({err.msg} at position {err.pos})") from err
    except RecursionError as err:
        raise InvalidRequest("body", "nested too deeply") from err
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise InvalidRequest("body", f"not acceptable JSON ({err})") from err
    if not isinstance(body, dict):
        raise InvalidRequest("body", "must be a JSON object")
    for name, value in body.items():
        _check_type(name, value)
    model = body.get("model")
    if model is not None and model != service.model_name:
        raise _HTTPError(
            404,
            f"model '{model}' is not served here; this server serves '{service.model_name}'",
            "invalid_request_error",
            "model",
        )
    if body.get("n", 1) != 1:
        raise InvalidRequest("n", "only n=1 is supported")
    return body


def _check_type(name: str, value: Any) -> None:
    kinds = _FIELD_TYPES.get(name)
    if kinds is None or value is None:
        return
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = [_TYPE_NAMES[k] for k in kinds if not (k is int and float in kinds)]
        shown = _TYPE_NAMES.get(type(value)) if isinstance(value, list | dict) else None
        shown = shown or json.dumps(value)[:80]
        raise InvalidRequest(name, f"must be {' or '.join(names)}, got {shown}")


def _parse(service: Service, body: dict[str, Any], **prompt: Any) -> Prompt:
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequest("stop", "must be a string or a list of strings")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) for t in stop_ids):
        raise InvalidRequest("stop_token_ids", "must be a list of token ids")
    return service.parse(
        max_tokens=body.get("max_tokens"),
        temperature=body.get("temperature"),
        top_p=body.get("top_p"),
        top_k=body.get("top_k"),
        seed=body.get("seed"),
        stop=stop,
        stop_token_ids=stop_ids,
        ignore_eos=bool(body.get("ignore_eos", False)),
        logprobs=bool(body.get("logprobs")),
        **prompt,
    )


async def _respond(
    request: web.Request, service: Service, body: dict[str, Any], prompt: Prompt, chat: bool
) -> web.StreamResponse:
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    kind = "chat.completion" if chat else "text_completion"
    stream = service.stream(prompt)
    choice: dict[str, Any]
    if not body.get("stream"):
        text, reason, usage = "", None, None
        async with contextlib.aclosing(stream):
            async for item in stream:
                if isinstance(item, Finished):
                    usage = item
                else:
                    text, reason = text + item.text_delta, item.finish_reason
        choice = {"index": 0, "finish_reason": reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return web.json_response(
            {
                "id": rid,
                "object": kind,
                "created": created,
                "model": service.model_name,
                "choices": [choice],
                "usage": _usage(usage),
            }
        )
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    chunk_kind = "chat.completion.chunk" if chat else "text_completion"
    response: web.StreamResponse | None = None
    first = True

    def chunk(**fields: Any) -> dict[str, Any]:
        return {
            "id": rid,
            "object": chunk_kind,
            "created": created,
            "model": service.model_name,
            **fields,
        }

    try:
        async with contextlib.aclosing(stream):
            async for item in stream:
                if response is None:  # errors before the first token are still plain HTTP errors
                    response = web.StreamResponse(
                        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
                    )
                    await response.prepare(request)
                if isinstance(item, Finished):
                    if include_usage:
                        await _sse(response, chunk(choices=[], usage=_usage(item)))
                    continue
                if chat:
                    delta = {"content": item.text_delta}
                    if first:
                        delta["role"] = "assistant"
                    choice = {
                        "index": 0,
                        "delta": delta,
                        "finish_reason": item.finish_reason,
                        "logprobs": None,
                    }
                else:
                    choice = {
                        "index": 0,
                        "text": item.text_delta,
                        "finish_reason": item.finish_reason,
                        "logprobs": None,
                    }
                first = False
                await _sse(response, chunk(choices=[choice]))
    except ConnectionResetError:
        if response is None:
            raise
        return response  # the client left mid-stream: the request is aborted, nothing to send
    except Unavailable as err:
        if response is None:
            raise
        await _sse(
            response,
            {
                "error": {
                    "message": str(err),
                    "type": "service_unavailable",
                    "param": None,
                    "code": None,
                }
            },
        )
    assert response is not None  # a stream yields at least one token before finishing
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _sse(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(f"data: {json.dumps(payload)}\n\n".encode())


def _usage(f: Finished | None) -> dict[str, int] | None:
    if f is None:
        return None
    return {
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
    }
