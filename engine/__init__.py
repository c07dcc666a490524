"""A compact LLaVA inference engine with ST3 visual-token trimming."""
from scheduler.policy import FastV, Full, PVTP, ST3

from .errors import EngineError, RequestError
from .llm import LLM, RequestOutput
from .outputs import CompletionOutput
from .sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineError", "RequestError",
           "Full", "FastV", "PVTP", "ST3"]
