"""The LLaVA-1.5 chat template (llava-hf's chat_template.json), as plain Python.

Each message renders as `ROLE: ` (nothing for system), one `<image>\\n` per image, then each text
part followed by a space; the generation prompt is `ASSISTANT:`. So one question with one image is
`USER: <image>\\nWhat is this? ASSISTANT:` and a second turn continues
`... ASSISTANT: It is a cat. USER: And its colour? ASSISTANT:`.
"""
from __future__ import annotations

IMAGE_TAG = "<image>"
ROLES = ("system", "user", "assistant")


def llava_chat_prompt(turns: list[tuple[str, int, list[str]]], add_generation_prompt: bool = True) -> str:
    """The prompt for (role, number of images, text parts) turns."""
    out = []
    for role, num_images, texts in turns:
        if role not in ROLES:
            raise ValueError(f"chat role must be one of {', '.join(ROLES)}, got {role!r}")
        if role != "system":
            out.append(role.upper() + ": ")
        out.append(f"{IMAGE_TAG}\n" * num_images)
        out.extend(text + " " for text in texts)
    if add_generation_prompt:
        out.append("ASSISTANT:")
    return "".join(out)
