"""The one-thread rule of LLM, enforced: a second thread gets a clear error, not corrupted state."""
from __future__ import annotations

import functools

from .errors import ConcurrentUseError


def exclusive(method):
    """Refuse a call while another thread is inside the LLM (the same thread may re-enter)."""
    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        if not self._lock.acquire(blocking=False):
            name = {"_drive": "stream"}.get(method.__name__, method.__name__)
            raise ConcurrentUseError(
                f"LLM.{name}() called from a second thread while another thread is inside the LLM; "
                "LLM is single-threaded: use engine.AsyncLLM to serve requests from several threads or event "
                "loops")
        try:
            return method(self, *args, **kwargs)
        finally:
            self._lock.release()
    return guarded
