"""The offline entry points of LLM (vLLM's names): generate, chat, stream, get_tokenizer.

They drive the same add_request / step loop as any caller, collecting the outputs of the requests they
own; outputs of other callers' requests are kept for the next step().
"""
from __future__ import annotations

from typing import Iterator

from models.tokenizer import Tokenizer

from .chat import run_chat
from .errors import RequestError
from .outputs import RequestOutput
from .progress import Progress
from .sampling import SamplingParams
from .thread_guard import exclusive


class Entrypoints:
    """Mixed into LLM; uses its add_request, abort, _drive, _done and _pop."""

    @exclusive
    def generate(self, prompts: dict | str | list, sampling_params: SamplingParams | list | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run requests to completion; outputs in submission order (vLLM's LLM.generate).

        A single request that is bad raises RequestError. In a list, a bad request gets an output with
        finish_reason "error" (and `.error`) while the others run normally. A list shows a tqdm progress
        bar when tqdm is installed and use_tqdm is True; nothing is printed otherwise.
        """
        single = not isinstance(prompts, list)
        reqs = [prompts] if single else prompts
        params = sampling_params
        if isinstance(params, list):
            if len(params) != len(reqs):
                raise RequestError(f"{len(reqs)} requests but {len(params)} SamplingParams")
            plist = params
        else:
            plist = [params] * len(reqs)
        ids, errors = [], {}
        for r, p in zip(reqs, plist):
            try:
                ids.append(self.add_request(r, p))
                self._owned.add(ids[-1])
            except RequestError as e:
                if single:
                    raise
                rid = f"error-{next(self._ids)}"
                ids.append(rid)
                errors[rid] = str(e)
        pending = {i for i in ids if i not in errors}
        progress = Progress(len(reqs), use_tqdm and not single)
        progress.update(len(errors))
        while pending:
            self._drive()
            done = {i for i in pending if self._done(i)}
            pending -= done
            made = sum(len(s.output_ids) for i in done for s in self._families.members(i, self._seqs))
            progress.update(len(done), made)
        progress.close()
        return [RequestOutput(i, "", [], "error", error=errors[i]) if i in errors else self._pop(i) for i in ids]

    def chat(self, messages: list, sampling_params: SamplingParams | list | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Answer OpenAI-style conversations on the LLaVA-1.5 template (vLLM's LLM.chat).

        `messages` is one conversation (a list of {"role", "content"} dicts) or a list of them; content
        parts are text, image_url (data: URI or path), image_pil and image (see engine/chat.py).
        """
        return run_chat(self, messages, sampling_params, use_tqdm)

    def get_tokenizer(self) -> Tokenizer:
        """The model's tokenizer (encode / decode / chat_prompt)."""
        return self.tokenizer

    def stream(self, request: dict | str, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield outputs for one request as its text grows; deltas are final (never taken back)."""
        rid = self.add_request(request, params)
        self._owned.add(rid)
        try:
            while not self._done(rid):
                for out in self._drive():
                    if out.request_id == rid and (any(c.delta for c in out.outputs) or out.finished):
                        yield out
            # Finished by abort or by another request's step.
        finally:
            if not self._done(rid):
                self.abort(rid)
            self._pop(rid)
