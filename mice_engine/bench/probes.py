"""Efficiency probes: machine description, matrix-multiply rate, peak memory, bare forward pass."""

from __future__ import annotations

import os
import platform
import random
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from typing_extensions import Self

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def hardware(device: str) -> dict[str, Any]:
    """Processor, cores, memory, platform, torch threads and GPU of this machine."""
    import psutil
    import torch

    processor = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                processor = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "processor": processor or platform.machine(),
        "logical_cores": psutil.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def load_average() -> list[float] | None:
    """Return the 1, 5 and 15 minute load averages, since other work on the machine slows every
    timing."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def git_state(folder: Path) -> dict[str, Any]:
    """Commit of the git checkout that contains ``folder``, and whether it had local changes."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True,
                                  check=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def matmul_rate(size: int, device: str, *, seconds: float = 1.0) -> dict[str, Any]:
    """Measure float32 matrix-multiply throughput on square ``size`` matrices.

    Repeats the product for about ``seconds`` after two warm-up products, and reports the best
    and the median GFLOP/s over the repeats (2 * size^3 floating-point operations each).
    """
    import torch

    generator = torch.Generator().manual_seed(0)
    left = torch.randn(size, size, generator=generator).to(device)
    right = torch.randn(size, size, generator=generator).to(device)
    for _ in range(2):
        torch.mm(left, right)
    _synchronize(device)
    rates = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(rates) < 3:
        tick = time.perf_counter()
        torch.mm(left, right)
        _synchronize(device)
        rates.append(2 * size**3 / (time.perf_counter() - tick) / 1e9)
    return {"size": size, "dtype": "float32", "repeats": len(rates),
            "best_gflops": round(max(rates), 2), "median_gflops": round(float(np.median(rates)), 2)}


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


class PeakMemory:
    """Peak resident memory (and GPU memory) of this process during a ``with`` block.

    On Linux the kernel's high-water mark (VmHWM) is reset on entry by writing 5 to
    /proc/self/clear_refs, so the peak belongs to the block alone. Where that file cannot be
    written, the reported peak is the process's peak since it started, and ``scope`` is ``"process"``.
    """

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.scope = "block"
        self.peak_rss_mib: float | None = None
        self.peak_gpu_mib: float | None = None

    def __enter__(self) -> Self:
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            self.scope = "process"
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.peak_rss_mib = _peak_rss_mib()
        if self.device.startswith("cuda"):
            import torch

            self.peak_gpu_mib = round(torch.cuda.max_memory_allocated() / 2**20, 1)

    def record(self) -> dict[str, Any]:
        return {"peak_rss_mib": self.peak_rss_mib, "peak_gpu_mib": self.peak_gpu_mib,
                "peak_scope": self.scope}


def _peak_rss_mib() -> float:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource

    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    per_mib = 2**20 if platform.system() == "Darwin" else 2**10
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / per_mib, 1)


def sample_texts(documents: Sequence[str], count: int, seed: int) -> list[str]:
    """Return ``count`` texts drawn without replacement with ``seed`` (all when fewer)."""
    if count >= len(documents):
        return list(documents)
    positions = sorted(random.Random(seed).sample(range(len(documents)), count))
    return [documents[i] for i in positions]


def bare_forward_throughput(model: Any, texts: Sequence[str], batch_size: int, *,
                            on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Time the lower layers alone on ``texts``: tokenised beforehand, length-sorted batches of
    ``batch_size`` as indexing forms them, nothing converted, copied to the host or stored.

    Returns documents, tokens, seconds, documents/s and tokens/s (tokens without padding).
    """
    import torch

    from ..encoding import pad, tokenize

    sequences = tokenize(model.tokenizer, texts, model.config.doc_max_length).input_ids
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)
    pad_id = model.tokenizer.pad_token_id or 0
    batches = [pad([sequences[i] for i in order[start : start + batch_size]], pad_id, model.device)
               for start in range(0, len(order), batch_size)]
    device = str(model.device)
    seconds = 0.0
    with torch.inference_mode():
        model.encode(*batches[-1])  # warm-up on the shortest batch
        _synchronize(device)
        for ids, mask in batches:
            tick = time.perf_counter()
            model.encode(ids, mask)
            _synchronize(device)
            seconds += time.perf_counter() - tick
            if on_batch is not None:
                on_batch(len(ids))
    tokens = sum(len(sequence) for sequence in sequences)
    return {"documents": len(sequences), "tokens": tokens, "batch_size": batch_size,
            "seconds": round(seconds, 3),
            "documents_per_second": round(len(sequences) / seconds, 2),
            "tokens_per_second": round(tokens / seconds, 1)}


def folder_bytes(folder: Path) -> int:
    """Total size of the files under ``folder``."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())
