"""What a candidate costs, measured in the same run as its quality.

Parameters (total, and active per token: top-k of E experts for an MoE, every member for an
ensemble) come from the loaded models. Throughput comes from the candidate's own `Counters` (tokens
scored / generated per second of wall time). Peak memory is the largest rise of this process's
resident memory (RSS) above its level before the candidate was loaded, sampled every 10 ms on
CPU; on CUDA it is torch's peak allocated memory instead.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch


class PeakMemory:
    """Context manager: `.peak_bytes` is the peak RSS (or CUDA allocation) rise inside the block."""

    def __init__(self, device: str = "cpu", interval: float = 0.01):
        self.device, self.interval = device, interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._base = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss - self._base)
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._base
            return
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss - self._base)


def summarize(params: tuple[int, int], counters: dict, peak_bytes: int, paths: list[Path] | None = None) -> dict:
    """The cost row of one candidate."""
    total, active = params
    sc, gc = counters.get("score_seconds", 0.0), counters.get("gen_seconds", 0.0)
    return {
        "params_total": int(total),
        "params_active": int(active),
        "score_tokens_per_s": counters["score_tokens"] / sc if sc > 0 else None,
        "gen_tokens_per_s": counters["gen_tokens"] / gc if gc > 0 else None,
        "peak_memory_bytes": int(peak_bytes),
        "score_tokens": counters.get("score_tokens", 0),
        "gen_tokens": counters.get("gen_tokens", 0),
    }


@dataclass
class Counters:
    """Tokens and seconds a candidate spent, per activity (the cost table's throughput)."""

    score_tokens: int = 0
    score_seconds: float = 0.0
    gen_tokens: int = 0
    gen_seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)
