"""The OpenAI API's request bodies as `moelab serve` accepts them, checked field by field, and its response objects.

    params = parse_completion(body, chat=False)   # a CompletionParams, or ApiError(400, message, param)

Accepted: model, prompt (a string, or a list of one string) / messages, max_tokens (max_completion_tokens for
chat), temperature, top_p, seed, stop (a string or up to 4 strings), stream, stream_options.include_usage, n = 1,
user, and for chat `chat_template_kwargs` (vLLM's and SGLang's extension: more variables for the chat template, e.g.
{"enable_thinking": false} for Qwen3); the options that change nothing at their default (echo false, logprobs null,
best_of 1, presence and frequency penalty 0, ...) are accepted at that default and refused otherwise, naming the
field. Unknown fields are refused. Error bodies follow the API: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

MAX_STOP = 4
# options that moelab does not implement, with the value that means "off" (accepted) — any other value is a 400
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1, None), "best_of": (1, None), "echo": (False, None), "logprobs": (None, False, 0),
    "top_logprobs": (None, 0), "presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None),
    "logit_bias": (None, {}), "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
    "parallel_tool_calls": (None, True, False), "service_tier": (None, "auto", "default"),
}
TEMPLATE_SET = {"messages", "add_generation_prompt"}  # the chat template's variables the server itself sets
COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "user",
          "metadata", "store"}


class ApiError(Exception):
    """An HTTP error with the API's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class CompletionParams:
    model: str | None
    prompt: str | None = None  # completions
    messages: list[dict[str, Any]] | None = None  # chat
    max_tokens: int | None = None  # None: the route's default
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # chat: more chat-template variables


def parse_completion(body: Any, chat: bool) -> CompletionParams:
    """The request's parameters, or ApiError(400) naming the first bad field and what is allowed."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    allowed = COMMON | set(NEUTRAL) | ({"messages", "max_completion_tokens", "chat_template_kwargs"} if chat
                                       else {"prompt"})
    for key in body:
        if key not in allowed:
            raise ApiError(400, f"{key}: unrecognized request argument (supported: {', '.join(sorted(allowed))})",
                           key)
    for key, neutral in NEUTRAL.items():
        if key in body and not any(body[key] == v and type(body[key]) is type(v) for v in neutral if v is not None) \
                and body[key] is not None:
            raise ApiError(400, f"{key}={body[key]!r} is not supported by moelab serve (allowed: "
                           f"{', '.join(repr(v) for v in neutral)})", key)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "model must be a string", "model")
    p = CompletionParams(model=model)
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "messages")
        p.messages = messages
        kwargs = body.get("chat_template_kwargs")
        if kwargs is not None:
            if not isinstance(kwargs, dict) or not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
                raise ApiError(400, "chat_template_kwargs must be an object of template variables (names: "
                               "identifiers), e.g. {\"enable_thinking\": false}", "chat_template_kwargs")
            taken = sorted(set(kwargs) & TEMPLATE_SET)
            if taken:
                raise ApiError(400, f"chat_template_kwargs: {', '.join(taken)} is set by the server (allowed: any "
                               f"other variable)", "chat_template_kwargs")
            p.template_kwargs = kwargs
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list):
            raise ApiError(400, "prompt: a list of several prompts is not supported (send one request each); "
                           "allowed a string", "prompt")
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string", "prompt")
        p.prompt = prompt
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    if body.get(key) is not None:
        p.max_tokens = _int(body[key], key, 1)
    if body.get("temperature") is not None:
        p.temperature = _number(body["temperature"], "temperature", 0.0, 2.0, "in [0, 2] (0 = greedy)")
    if body.get("top_p") is not None:
        p.top_p = _number(body["top_p"], "top_p", 0.0, 1.0, "in (0, 1]")
        if p.top_p == 0:
            raise ApiError(400, "top_p=0 is invalid: allowed a number in (0, 1]", "top_p")
    if body.get("seed") is not None:
        p.seed = _int(body["seed"], "seed", -(2**63))
        p.seed &= 2**64 - 1  # torch.Generator seeds are unsigned 64-bit
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
            raise ApiError(400, f"stop must be a non-empty string or a list of up to {MAX_STOP} non-empty strings",
                           "stop")
        p.stop = stop
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", "stream")
    p.stream = bool(stream)
    opts = body.get("stream_options")
    if opts is not None:
        if not p.stream or not isinstance(opts, dict) or set(opts) - {"include_usage"} or \
                not isinstance(opts.get("include_usage", False), bool):
            raise ApiError(400, "stream_options must be {\"include_usage\": true|false}, with stream=true",
                           "stream_options")
        p.include_usage = bool(opts.get("include_usage"))
    return p


def _int(value: Any, name: str, lo: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ApiError(400, f"{name}={value!r} is invalid: allowed an integer >= {lo}", name)
    return value


def _number(value: Any, name: str, lo: float, hi: float, allowed: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or not lo <= value <= hi:
        raise ApiError(400, f"{name}={value!r} is invalid: allowed a number {allowed}", name)
    return float(value)


# -- responses -------------------------------------------------------------------------------------------------
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(chat: bool, rid: str, model: str, text: str, finish: str, use: dict[str, int]) -> dict[str, Any]:
    """A whole (non-streamed) completion or chat completion."""
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": use}


def chunk(chat: bool, rid: str, model: str, text: str | None, finish: str | None, role: bool = False,
          use: dict[str, int] | None = None) -> dict[str, Any]:
    """One streamed piece: a text delta, the finish reason, or (no choices) the usage."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
           "model": model, "choices": [] if use is not None else choices}
    if use is not None:
        out["usage"] = use
    return out
