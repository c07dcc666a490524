"""OpenAI-style chat messages -> one engine request on the LLaVA-1.5 template (vLLM's LLM.chat input).

A message is {"role": "system" | "user" | "assistant", "content": str | [part, ...]} with parts
{"type": "text", "text": ...}, {"type": "image_url", "image_url": {"url": ...}} (a data: URI, a
file path or a file:// URL), {"type": "image_pil", "image_pil": PIL.Image} or, as in transformers'
processors, {"type": "image", "image": <any image kind>}. The images go to the request in the
order the template places their `<image>` tags: message by message.
"""
from __future__ import annotations

from models.chat_template import IMAGE_TAG, ROLES, llava_chat_prompt

from .errors import RequestError
from .image_input import short
from .outputs import RequestOutput

PART_TYPES = ("text", "image_url", "image_pil", "image")


def is_conversation_list(messages) -> bool:
    """True for a list of conversations (a list of lists of messages), False for one conversation."""
    return isinstance(messages, (list, tuple)) and bool(messages) and isinstance(messages[0], (list, tuple))


def chat_request(messages) -> dict:
    """{"prompt", "images"} for one conversation; a malformed one raises RequestError naming the message."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise RequestError(f"a conversation must be a non-empty list of messages, got {_kind(messages)}")
    turns, images = [], []
    for m, message in enumerate(messages):
        where = f"message {m}"
        if not isinstance(message, dict):
            raise RequestError(f"{where}: must be a dict with 'role' and 'content', got {_kind(message)}")
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}: role must be one of {', '.join(ROLES)}, got {short(str(role))}")
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, (list, tuple)):
            raise RequestError(f"{where}: content must be a string or a list of parts, got {_kind(content)}")
        texts, n_images = [], 0
        for p, part in enumerate(parts):
            at = f"{where}, part {p}"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in PART_TYPES:
                raise RequestError(f"{at}: a part must be a dict with 'type' one of {', '.join(PART_TYPES)}, "
                                   f"got {short(str(kind)) if isinstance(part, dict) else _kind(part)}")
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise RequestError(f"{at}: 'text' must be a string, got {_kind(text)}")
                if IMAGE_TAG in text:
                    raise RequestError(f"{at}: text must not contain {IMAGE_TAG!r}; send images as image parts")
                texts.append(text)
            else:
                images.append(_image_of(part, kind, at))
                n_images += 1
        turns.append((role, n_images, texts))
    return {"prompt": llava_chat_prompt(turns), "images": images}


def _image_of(part: dict, kind: str, at: str):
    if kind not in part:
        raise RequestError(f"{at}: a {kind!r} part needs a {kind!r} field")
    value = part[kind]
    if kind == "image_url":
        url = value.get("url") if isinstance(value, dict) else value
        if not isinstance(url, str):
            raise RequestError(f"{at}: image_url must be {{'url': str}} or a string, got {_kind(value)}")
        return url  # data: URIs, paths and file:// URLs are resolved (and checked) by engine/image_input.py
    return value


def _kind(value) -> str:
    return "None" if value is None else type(value).__name__


def run_chat(llm, messages, sampling_params=None, use_tqdm: bool = True) -> list[RequestOutput]:
    """LLM.chat: one conversation or a list; in a list a malformed one gets an "error" output."""
    batch = is_conversation_list(messages)
    convs = list(messages) if batch else [messages]
    if isinstance(sampling_params, list) and len(sampling_params) != len(convs):
        raise RequestError(f"{len(convs)} conversations but {len(sampling_params)} SamplingParams")
    outs: list[RequestOutput | None] = [None] * len(convs)
    reqs, where = [], []
    for i, conv in enumerate(convs):
        try:
            reqs.append(chat_request(conv))
            where.append(i)
        except RequestError as e:
            if not batch:
                raise
            outs[i] = RequestOutput(f"error-{next(llm._ids)}", "", [], "error", error=str(e))
    params = [sampling_params[i] for i in where] if isinstance(sampling_params, list) else sampling_params
    done = llm.generate(reqs if batch else reqs[0], params, use_tqdm) if reqs else []
    for i, out in zip(where, done):
        outs[i] = out
    return outs
