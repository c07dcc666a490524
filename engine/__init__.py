"""A compact LLaVA inference engine with ST3 visual-token trimming."""
from scheduler.policy import FastV, Full, PVTP, ST3

from .async_llm import AsyncLLM
from .errors import ConcurrentUseError, EngineError, QueueFullError, RequestError
from .llm import LLM, RequestOutput
from .outputs import CompletionOutput
from .sampling import SamplingParams

__all__ = ["LLM", "AsyncLLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineError", "RequestError",
           "ConcurrentUseError", "QueueFullError", "Full", "FastV", "PVTP", "ST3"]
