"""The machine a stage runs on: the device it picks, and the wall time, peak memory and energy it uses.

The paper's headline figures are memory and energy. Shared by both stages.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.common.config import TrainConfig
from pipeline.common.errors import ConfigError
from pipeline.common.settings import parse_text

RAPL = Path("/sys/class/powercap/intel-rapl:0/energy_uj")


def pick_device(device: str) -> torch.device:
    """The torch device for a ``--device`` value, refused in one line if this machine cannot run it.

    Every command picks its device here, so each says the same thing, before any work: a value outside the
    declared ones (the ``device`` setting's), a GPU kind this torch or machine lacks, a CUDA index past the
    visible devices. 'auto' -> CUDA when visible, else CPU. A CUDA device always carries its index ('cuda' is
    the current one, cuda:0 unless set otherwise), so that `cuda` and `cuda:0` are one device wherever devices are
    compared or recorded (a checkpoint's identity, a batch already in place).
    """
    device = parse_text(TrainConfig, "device", device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps was asked for but this torch or machine has no MPS (Apple GPU) support; "
                          "use --device cpu or auto")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device} was asked for but no CUDA GPU is visible; use --device cpu or auto")
        index, count = torch.device(device).index, torch.cuda.device_count()
        if index is not None and index >= count:
            raise ConfigError(f"--device {device}: there is no CUDA device {index} ({count} visible: "
                              f"{', '.join(f'cuda:{i}' for i in range(count))}); use one of those, cuda or auto")
        return torch.device("cuda", torch.cuda.current_device() if index is None else index)
    return torch.device(device)


def set_cuda_tf32(enabled: bool) -> None:
    """CUDA float32 matrix products on TensorFloat-32 tensor cores, or in full float32 (process-wide, as torch keeps
    it). The legacy flag, not ``fp32_precision``: reading one API after setting the other raises in torch 2.13, and
    ``torch.set_float32_matmul_precision`` would change CPU (oneDNN) products too."""
    torch.backends.cuda.matmul.allow_tf32 = enabled


def _rapl_uj() -> int | None:
    try:
        return int(RAPL.read_text())
    except (OSError, ValueError):
        return None


def _nvml_mj(device: torch.device) -> tuple[Any, int] | None:
    if device.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        try:  # by UUID: NVML numbers every card, torch only the visible ones (CUDA_VISIBLE_DEVICES)
            handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{torch.cuda.get_device_properties(index).uuid}")
        except Exception:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return handle, int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
    except Exception:  # no pynvml, or a GPU without the energy counter
        return None


def peak_tensor_bytes(run: Callable[[], object]) -> int:
    """The most bytes of CPU tensors alive at once while ``run`` runs, above those alive when it starts.

    What ``torch.cuda.max_memory_allocated`` tells on a GPU, read here from the allocator's events as torch's profiler
    records them (``profile_memory``): a CPU step runs the same operators in the same order as a GPU's, so the same
    tensors are alive at each point, and a GPU's activation memory can be measured and tested without one.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    alive = peak = 0
    for _, nbytes in events:
        alive += nbytes
        peak = max(peak, alive)
    return peak


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-memory high-water mark (VmHWM; Linux 4.0+), so that it measures from now on;
    whether it could. getrusage's ru_maxrss cannot be reset: it is the process's peak since it started."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss_kib() -> int | None:
    """VmHWM from /proc/self/status, in KiB (None where it cannot be read)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class ResourceMeter:
    """Measures a block of work; ``summary()`` says what the hardware let it read (None otherwise)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> ResourceMeter:
        self.own_peak = _reset_peak_rss()
        self.started = time.perf_counter()
        self.rapl = _rapl_uj()
        self.nvml = _nvml_mj(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def elapsed(self) -> float:
        """Seconds since the block began (while it runs)."""
        return time.perf_counter() - self.started

    def __exit__(self, *exc: Any) -> None:
        self.wall = self.elapsed()
        end = _rapl_uj()
        self.cpu_energy = (end - self.rapl) / 1e6 if end is not None and self.rapl is not None and end >= self.rapl else None
        self.gpu_energy = None
        if self.nvml is not None:
            import pynvml

            handle, start = self.nvml
            self.gpu_energy = (int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)) - start) / 1e3

    def summary(self) -> dict[str, Any]:
        block_peak = _peak_rss_kib() if self.own_peak else None
        peak_kib = block_peak if block_peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        cuda = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None
        return {
            "wall_time_s": round(self.wall, 3),
            "peak_rss_mb": round(peak_kib / 1024, 1),  # Linux: KiB
            # "run": the peak of this block (the kernel's high-water mark, reset when it began); "process": the
            # process's peak so far, which in a notebook or a sweep's worker includes what ran before.
            "peak_rss_scope": "run" if block_peak is not None else "process",
            "cuda_max_allocated_mb": None if cuda is None else round(cuda, 1),
            "cpu_energy_j": None if self.cpu_energy is None else round(self.cpu_energy, 1),
            "gpu_energy_j": None if self.gpu_energy is None else round(self.gpu_energy, 1),
            "device": str(self.device),
        }
