"""An optional tqdm progress bar for LLM.generate over a list (tqdm is an optional extra)."""
from __future__ import annotations

import time


class Progress:
    """Counts finished requests on a tqdm bar with the output token rate; does nothing without tqdm."""

    def __init__(self, total: int, enabled: bool):
        self.bar, self.tokens, self.start = None, 0, time.perf_counter()
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:  # no tqdm installed: no bar (pip install 'st3-engine[progress]')
            return
        self.bar = tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)

    def update(self, finished: int, output_tokens: int = 0) -> None:
        if self.bar is None or not finished:
            return
        self.tokens += output_tokens
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"output: {rate:.1f} toks/s", refresh=False)
        self.bar.update(finished)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
