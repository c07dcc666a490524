"""The engine's exception family: every bad request is a ValueError naming what is wrong."""


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class RequestError(EngineError, ValueError):
    """A request the engine cannot serve: bad prompt, image, parameters or size."""


class ArgumentError(EngineError, ValueError):
    """An LLM(...) argument the engine cannot use: an unknown dtype, a device whose backend is missing, bad sizes."""


class ConcurrentUseError(EngineError, RuntimeError):
    """A second thread called into an LLM while another thread was inside it."""


class QueueFullError(EngineError):
    """The engine's waiting queue is full; try again later (HTTP 503 in the server)."""
