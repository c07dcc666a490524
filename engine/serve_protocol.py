"""OpenAI request parsing for engine.serve: messages to a LLaVA-1.5 prompt, fields to SamplingParams.

Every problem is an APIError naming the offending field, which the server answers as
HTTP 400 {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .processor import IMAGE_TAG
from .sampling import SamplingParams

# LLaVA-1.5 (llava_v1) turns. A single user turn renders exactly as Tokenizer.chat_prompt, the llava-hf template.
USER, ASSISTANT, TURN_END = "USER: ", "ASSISTANT:", "</s>"
ROLES = ("system", "developer", "user", "assistant")
# Accepted for compatibility, but they change nothing here: refuse values that would.
NEUTRAL = {"echo": False, "best_of": 1}
# OpenAI fields that are SamplingParams fields of the same name and meaning.
OPENAI_SAMPLING = ("temperature", "top_p", "seed", "stop", "n", "presence_penalty", "frequency_penalty")
# Non-OpenAI sampling fields (vLLM's extra_body spellings) -> SamplingParams names.
EXTRA_SAMPLING = ("top_k", "min_p", "repetition_penalty", "ignore_eos", "stop_token_ids")


class APIError(Exception):
    """An error the server answers with an OpenAI-style body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ParsedRequest:
    """What a chat or completions request asks for, validated."""
    prompt: str
    image_urls: list[str]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None         # top alternatives per token, None = no logprobs
    extra: dict = field(default_factory=dict)


def _want(body: dict, key: str, kinds, default=None, what: str = ""):
    value = body.get(key, default)
    if value is not None and (isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds)):
        raise APIError(f"'{key}' must be {what or ' or '.join(k.__name__ for k in kinds)}, got {value!r}", key)
    return value


def check_model(body: dict, served: str) -> None:
    model = body.get("model")
    if model is not None and model != served:
        raise APIError(f"the model {model!r} does not exist; this server serves {served!r}", "model",
                       code="model_not_found")


def _content_parts(message: dict, i: int) -> list[tuple[str, str]]:
    """[(kind, text-or-url)] for one message's content (a string or a list of parts)."""
    content = message.get("content")
    where = f"messages[{i}].content"
    if isinstance(content, str):
        parts = [("text", content)]
    elif isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(("text", part["text"]))
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str) or not url:
                    raise APIError(f"{where}[{j}].image_url must be {{'url': '...'}}", f"{where}[{j}].image_url")
                parts.append(("image", url))
            else:
                raise APIError(f"unsupported content part {kind!r} in {where}[{j}]; this server takes 'text' and "
                               "'image_url' parts", f"{where}[{j}].type")
    elif content is None and message.get("role") == "assistant":
        parts = []
    else:
        raise APIError(f"{where} must be a string or a list of content parts", where)
    for kind, value in parts:
        if kind == "text" and IMAGE_TAG in value:
            raise APIError(f"{where} contains the text {IMAGE_TAG!r}; send images as image_url parts", where)
    return parts


def render_chat(messages) -> tuple[str, list[str]]:
    """(prompt, image URLs in prompt order) under the LLaVA-1.5 conversation template.

    system text, then `USER: ... ` / `ASSISTANT: ...</s>` turns, ending with `ASSISTANT:`; each image
    becomes `<image>\\n` where its part stands and each text part is followed by a space.
    """
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty list", "messages")
    prompt, urls = "", []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise APIError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}", f"messages[{i}].role")
        parts = _content_parts(m, i)
        if role != "user" and any(kind == "image" for kind, _ in parts):
            raise APIError(f"messages[{i}]: only user messages may carry images", f"messages[{i}].content")
        urls += [v for kind, v in parts if kind == "image"]
        body = "".join(IMAGE_TAG + "\n" if kind == "image" else value + " " for kind, value in parts)
        if role == "user":
            prompt += USER + body
        elif role == "assistant":
            prompt += ASSISTANT + " " + body.rstrip() + TURN_END
        else:
            prompt += body
    return prompt + ASSISTANT, urls


def sampling_params(body: dict, max_tokens: int | None, logprobs: int | None, max_n: int) -> SamplingParams:
    """SamplingParams from OpenAI fields (plus vLLM-style extras); a bad value names its field.

    `max_n` bounds n: the server's max_num_seqs, the most sequences the engine decodes at once.
    """
    for key, neutral in NEUTRAL.items():
        if body.get(key, neutral) not in (None, neutral):
            raise APIError(f"'{key}' = {body[key]!r} is not supported (only {neutral!r})", key)
    kw = {k: body[k] for k in OPENAI_SAMPLING + EXTRA_SAMPLING if body.get(k) is not None}
    try:
        params = SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **kw)
    except ValueError as e:
        name = str(e).split("SamplingParams.", 1)[-1].split(" ", 1)[0] if "SamplingParams." in str(e) else None
        raise APIError(str(e).replace("SamplingParams.", ""), name) from None
    if params.n > max_n:
        # More completions than the engine decodes at once would not share the prefill (the rest queue up
        # for prefills of their own), and an unbounded n lets one request flood the queue.
        raise APIError(f"'n' must be <= {max_n} (this server's --max-num-seqs), got {params.n}", "n")
    return params


def _max_tokens(body: dict, default: int, *keys: str) -> int:
    for key in keys:
        if body.get(key) is not None:
            return body[key]
    return default


def _stream_options(body: dict) -> tuple[bool, bool]:
    stream = bool(_want(body, "stream", (bool,), False))
    opts = _want(body, "stream_options", (dict,), None, "an object")
    include_usage = bool(opts and opts.get("include_usage"))
    if opts is not None and not stream:
        raise APIError("'stream_options' is only allowed with stream=true", "stream_options")
    return stream, include_usage


def parse_chat(body: dict, served: str, default_max_tokens: int, max_n: int) -> ParsedRequest:
    """A /v1/chat/completions body, validated."""
    check_model(body, served)
    prompt, urls = render_chat(body.get("messages"))
    want_lp = bool(_want(body, "logprobs", (bool,), False))
    top = _want(body, "top_logprobs", (int,), None, "an integer")
    if top is not None and not want_lp:
        raise APIError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    if top is not None and top < 0:
        raise APIError(f"'top_logprobs' must be >= 0, got {top}", "top_logprobs")
    logprobs = (top or 0) if want_lp else None
    params = sampling_params(body, _max_tokens(body, default_max_tokens, "max_completion_tokens", "max_tokens"),
                             logprobs, max_n)
    stream, include_usage = _stream_options(body)
    return ParsedRequest(prompt, urls, params, stream, include_usage, logprobs)


def parse_completion(body: dict, served: str, default_max_tokens: int, max_n: int) -> ParsedRequest:
    """A /v1/completions body (a raw prompt: no template, no images), validated."""
    check_model(body, served)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise APIError("'prompt' must be a non-empty string (one prompt per request)", "prompt")
    if IMAGE_TAG in prompt:
        raise APIError(f"'prompt' contains {IMAGE_TAG!r}; send images through /v1/chat/completions", "prompt")
    logprobs = _want(body, "logprobs", (int,), None, "an integer")
    if logprobs is not None and logprobs < 0:
        raise APIError(f"'logprobs' must be >= 0, got {logprobs}", "logprobs")
    params = sampling_params(body, _max_tokens(body, default_max_tokens, "max_tokens"), logprobs, max_n)
    stream, include_usage = _stream_options(body)
    return ParsedRequest(prompt, [], params, stream, include_usage, logprobs)
