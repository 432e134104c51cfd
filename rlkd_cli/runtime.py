"""Where and how a command computes: device, precision, processes (Accelerate), autocast, CPU threads.

A command builds one :class:`Runtime` from its ``trainer`` config and hands it to everything it
runs, so every mode flag is decided here once: the device and precision (``trainer.device``,
``trainer.precision``), how many processes train together and which one this is, and whether the
model is sharded (FSDP / DeepSpeed, from the ``accelerate launch`` config). Nothing else in rlkd
asks Accelerate or CUDA these questions again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from rlkd_cli.errors import RlkdError, require

log = logging.getLogger("rlkd.runtime")

#: The distributed types rlkd trains with (Accelerate's names).
SUPPORTED = ("NO", "MULTI_CPU", "MULTI_GPU", "FSDP", "DEEPSPEED")


def choose_device_and_precision(tc: Mapping[str, Any]) -> tuple[str, str]:
    """Resolve ``trainer.device``/``trainer.precision`` ('auto' included) to ``("cpu"|"cuda", "fp32"|"bf16")``."""
    cuda = torch.cuda.is_available()
    device = str(tc.get("device", "auto"))
    if device == "cuda" and not cuda:
        raise RlkdError("trainer.device=cuda but no CUDA device is visible; use trainer.device=auto or cpu")
    if device == "auto":
        device = "cuda" if cuda else "cpu"
    precision = str(tc.get("precision", "auto"))
    if precision == "auto":
        precision = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise RlkdError("trainer.precision=bf16 but this GPU has no bf16 support; use trainer.precision=fp32")
    if precision == "bf16" and device == "cpu":
        raise RlkdError("trainer.precision=bf16 is for CUDA; on the CPU use trainer.precision=fp32 (or auto)")
    return device, precision


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process for reuse (glibc only; returns whether it applied).

    glibc maps every allocation above its mmap threshold (adaptive, at most 32 MiB) afresh and
    returns it to the system when freed, and trims the heap top once 2x that is free. A training
    step allocates and frees the same large tensors again and again (activations, chunk-sized
    logits), so each one is page-faulted in anew: on 2 CPU cores that took 10-25 % of a step.
    Fixing the threshold at its maximum and not trimming makes the allocator reuse that memory.
    The peak footprint does not grow; memory is returned to the system when the process ends.
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
    ok &= libc.mallopt(m_trim_threshold, 2**31 - 1)
    return bool(ok)


def usable_cores(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """Cores this process may use: its CPU affinity mask, capped by a cgroup CPU quota (containers, SLURM).

    ``os.cpu_count()`` (and torch's default thread count) sees every core of the machine, not the ones a
    job was given: a container limited to 2 of 64 cores would start 32 threads per process.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(cgroup_root)
    return max(1, min(cores, int(quota))) if quota is not None else cores


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """The CPU quota in cores (cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), ``None`` when unlimited."""
    try:
        quota, period = Path(root, "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path(root, "cpu", "cpu.cfs_quota_us").read_text())
        period_us = int(Path(root, "cpu", "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def _cpu_times(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) jiffies summed over ``cpus`` from ``/proc/stat``; ``None`` where it cannot be read."""
    busy = total = 0
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                name, *fields = line.split()
                if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
                    continue
                ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
                total += sum(ticks)
                busy += sum(ticks) - ticks[3] - ticks[4]
    except (OSError, ValueError, IndexError):
        return None
    return (busy, total) if total else None


def busy_cores(sample_s: float = 0.25) -> float:
    """How many of this process's cores other processes keep busy now, measured over ``sample_s`` seconds."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    before = _cpu_times(cpus)
    if before is None:
        return 0.0
    time.sleep(sample_s)
    after = _cpu_times(cpus)
    if after is None or after[1] <= before[1]:
        return 0.0
    return len(cpus) * (after[0] - before[0]) / (after[1] - before[1])


def choose_threads(requested: int | None, *, cores: int, busy: float, procs: int = 1) -> tuple[int, str | None]:
    """Intra-op threads per process and a warning when the machine is oversubscribed (``None`` when not).

    ``requested`` is ``trainer.threads`` (``None``: choose). The choice is the cores nobody else keeps busy,
    split between this launch's ``procs`` processes on the node, at least one each: threads beyond the
    free cores only make the processes wait for each other (a 2-core machine running another job was 4x
    slower per step with 2 threads than with 1).
    """
    free = max(1, round(cores - busy))
    if requested is not None:
        if requested * procs > free:
            return requested, (f"trainer.threads={requested} x {procs} process(es) is more than the {free} free of "
                               f"{cores} usable cores ({busy:.1f} busy with other processes); steps will be slower "
                               f"(trainer.threads={max(1, free // procs)} fits)")
        return requested, None
    threads = max(1, free // procs)
    if free < cores:
        return threads, (f"this machine is busy: {busy:.1f} of {cores} usable cores are taken by other processes; "
                         f"using {threads} thread(s) per process (set trainer.threads=N to choose)")
    return threads, None


_THREADS: dict[str, int] = {}


def set_threads(threads: int | None) -> int:
    """Apply ``trainer.threads`` (``None``: the free cores, decided once per process); returns the count.

    An explicit ``OMP_NUM_THREADS`` (a launcher's or the user's) is honoured as torch honours it.
    """
    procs = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    if threads is None and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    key = "auto" if threads is None else str(threads)
    if key not in _THREADS:  # measured (and warned about) once per process, not again for the tiny teacher's run
        _THREADS[key], warning = choose_threads(threads, cores=usable_cores(), busy=busy_cores(), procs=procs)
        if warning:
            log.warning(warning)
    chosen = _THREADS[key]
    torch.set_num_threads(chosen)
    return chosen


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA for ``precision == 'bf16'``; a no-op context otherwise."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def quiet_libraries() -> None:
    """No per-file progress bars from transformers/hub/datasets (rlkd draws its own)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # no line per file saved in every checkpoint
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass


def peak_rss_mb(reset: bool = False) -> float | None:
    """The process's peak resident set size in MiB (Linux ``VmHWM``), ``None`` where it cannot be read.

    ``reset`` clears the kernel's high-water mark (``/proc/self/clear_refs``, value 5), so the next
    call reports the peak of the window in between; where that is refused the peak stays cumulative.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            peak = next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), None)
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (no reset possible)
        reset = False
    if reset:
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
    return peak / 1024 if peak is not None else None


@dataclass
class Runtime:
    """The process's place in the run: decided once per command from ``trainer.*`` and the launcher."""

    accelerator: Any
    device: torch.device
    device_name: str       # "cpu" or "cuda"
    precision: str         # "fp32" or "bf16" (autocast on CUDA)
    world: int             # processes training together
    rank: int              # this process's index among them
    distributed_type: str  # Accelerate's: NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED
    sharded: bool          # FSDP or DeepSpeed: the model's parameters are split between processes
    peaks: dict = field(default_factory=dict)  # the highest peak_memory() so far, per key

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @classmethod
    def create(cls, tc: Mapping[str, Any]) -> "Runtime":
        """Device, precision and processes for the ``trainer`` config ``tc`` (one Accelerator per process)."""
        from accelerate import Accelerator

        device_name, precision = choose_device_and_precision(tc)
        set_threads(tc.get("threads"))
        if device_name == "cpu":
            # Subnormal floats (from tiny gradients and Adam moments) make CPU kernels several times slower;
            # flushing them to zero changes nothing that matters for training.
            torch.set_flush_denormal(True)
            tune_cpu_allocator()
        quiet_libraries()
        # Accelerate handles processes and devices; mixed precision is rlkd's own autocast (Accelerate's
        # would cast every model output to float32, i.e. upcast whole [B, T, V] logits, which the chunked
        # loss exists to avoid). The schedule steps once per optimizer step on every process.
        acc = Accelerator(cpu=device_name == "cpu", mixed_precision="no", step_scheduler_with_optimizer=False)
        kind = acc.distributed_type.value
        require(kind in SUPPORTED, f"rlkd trains with DDP, FSDP or DeepSpeed, not {kind}; change the accelerate config")
        return cls(accelerator=acc, device=acc.device, device_name=device_name, precision=precision,
                   world=acc.num_processes, rank=acc.process_index, distributed_type=kind,
                   sharded=kind in ("FSDP", "DEEPSPEED"))

    def autocast(self):
        return autocast(self.device, self.precision)

    def describe(self) -> str:
        procs = f", {self.world} processes ({self.distributed_type})" if self.distributed else ""
        return f"{self.device_name} ({self.precision}{procs})"

    # -- collectives (no-ops in a single process) -------------------------------------------------

    def reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(x, reduction="sum") if self.distributed else x

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on any (e.g. a non-finite loss, a SIGTERM)."""
        if not self.distributed:
            return bool(flag)
        return bool(self.reduce_sum(torch.tensor(float(flag), device=self.device)) > 0)

    def sum_dicts(self, sums: dict[str, float]) -> dict[str, float]:
        """Key-wise sums of every process's dict (the dict itself with one process)."""
        if not self.distributed:
            return sums
        from accelerate.utils import gather_object

        total: dict[str, float] = {}
        for part in gather_object([sums]):
            for key, value in part.items():
                total[key] = total.get(key, 0) + value
        return total

    def peak_memory(self, reset: bool = True) -> dict[str, float]:
        """This process's peak memory since the last reset, in MiB: ``mem/peak_cuda_mb`` (what PyTorch's
        CUDA allocator held) on GPU, ``mem/peak_rss_mb`` (resident set size) on CPU; ``reset`` starts a new window."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            if reset:
                torch.cuda.reset_peak_memory_stats(self.device)
            out = {"mem/peak_cuda_mb": round(peak, 1)}
        else:
            peak = peak_rss_mb(reset=reset)
            out = {"mem/peak_rss_mb": round(peak, 1)} if peak is not None else {}
        for key, value in out.items():
            self.peaks[key] = max(self.peaks.get(key, 0.0), value)
        return out

    def new_memory_window(self) -> None:
        """Start counting peak memory afresh: a new window, and the highest peaks so far forgotten."""
        self.peak_memory(reset=True)
        self.peaks.clear()

    def barrier(self) -> None:
        if self.distributed:
            self.accelerator.wait_for_everyone()

    def release(self) -> None:
        """Drop the accelerator's references to a finished run's models and optimizers.

        Accelerate's ``free_memory`` on GPUs (it also empties the CUDA cache); on the CPU only the
        references are dropped, as its full ``gc.collect()`` of the whole heap cost more than a short
        run itself.
        """
        with contextlib.suppress(Exception):
            if self.device.type == "cuda" or self.sharded:
                self.accelerator.free_memory()
            else:
                acc = self.accelerator
                acc._schedulers, acc._optimizers, acc._models, acc._dataloaders = [], [], [], []
