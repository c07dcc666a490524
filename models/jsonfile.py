"""Reading the small JSON side files of a checkpoint (config, tokenizer, preprocessor) with clear errors."""
from __future__ import annotations

import json
from pathlib import Path


def read_json_object(path: Path, error: type[ValueError] = ValueError, missing_ok: bool = False) -> dict:
    """The JSON object in `path`; `error` naming the file if it is missing, unreadable or not an object.

    With missing_ok, a file that does not exist reads as {} (optional side files).
    """
    path = Path(path)
    if missing_ok and not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
