"""A compact LLaVA inference engine with ST3 visual-token trimming."""
import logging

from scheduler.policy import FastV, Full, PVTP, ST3

from .errors import EngineError, RequestError
from .llm import LLM, RequestOutput
from .sampling import SamplingParams

# The engine logs under "st3" (KV pool, attention backend, graph capture, preemptions) and prints nothing
# itself; the application decides where, if anywhere, the records go.
logging.getLogger("st3").addHandler(logging.NullHandler())

__all__ = ["LLM", "SamplingParams", "RequestOutput", "EngineError", "RequestError", "Full", "FastV", "PVTP", "ST3"]
