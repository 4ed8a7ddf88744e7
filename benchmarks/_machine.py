"""What machine a benchmark ran on, and how busy it was: printed at the start and end of every script.

Figures from a shared or different CPU are not comparable; the CPU model, torch's thread count,
the vector instructions torch dispatches to, and the load average before and after make that
visible next to the numbers. Run alone, it prints the header.
"""

from __future__ import annotations

import os
import platform
import time

import torch


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux; ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def load() -> str:
    """The 1, 5 and 15 minute load averages: above the core count, timings are stretched by other jobs."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min; {os.cpu_count()} cores)"


def header(title: str) -> None:
    """Print the benchmark's title, the machine and the load average before any work."""
    flags = _cpu_flags()
    # bf16 runs natively only with AVX512-BF16 or AMX; elsewhere torch emulates it in fp32.
    bf16 = "native" if flags & {"avx512_bf16", "amx_bf16"} else "not native (emulated)" if flags else "unknown"
    avx512 = "yes" if "avx512f" in flags else "no" if flags else "unknown"
    print(title)
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"AVX-512 {avx512}, bf16 {bf16}")
    print(f"load average at start: {load()}", flush=True)


def footer(result: str) -> None:
    """Print the load average after the work, then the one-line result (the script's last line)."""
    print(f"\nload average at end: {load()}")
    print(f"RESULT: {result}", flush=True)


def best_of(fn, repeat, warm=None):
    """Best wall time of ``repeat`` calls after one untimed warm-up call (of ``warm`` when given: a cheaper one)."""
    (warm or fn)()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def settle(limit: float = 60.0, busy: float = 15.0) -> float:
    """Wait (at most ``limit`` seconds) until this machine's CPUs are under ``busy`` per cent over a
    second: background work started before a timing (a Ray cluster's workers importing torch) would
    otherwise stretch it. Returns the seconds waited."""
    import psutil

    began = time.perf_counter()
    while time.perf_counter() - began < limit and psutil.cpu_percent(interval=1.0) >= busy:
        pass
    return time.perf_counter() - began


if __name__ == "__main__":
    header("convscope benchmarks: machine")
