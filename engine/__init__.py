"""A compact LLaVA inference engine with ST3 visual-token trimming."""
import logging

from scheduler.policy import FastV, Full, PVTP, ST3

from .async_llm import AsyncLLM
from .errors import ConcurrentUseError, EngineError, QueueFullError, RequestError
from .llm import LLM, RequestOutput
from .outputs import CompletionOutput
from .sampling import SamplingParams

# The engine logs under "st3" (KV pool, attention backend, graph capture, preemptions) and prints nothing
# itself; the application decides where, if anywhere, the records go.
logging.getLogger("st3").addHandler(logging.NullHandler())

__all__ = ["LLM", "AsyncLLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineError", "RequestError",
           "ConcurrentUseError", "QueueFullError", "Full", "FastV", "PVTP", "ST3"]
