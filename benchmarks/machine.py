"""What the benchmarks share: the CPU a benchmark ran on, for its results
(model name, core count and the flags that decide bf16 speed: AVX512-BF16,
AMX), as every table records them; paired timing of two calls; alternating
calls of several."""

import os
import statistics
import time


def cpu_info():
    model, flags = "unknown", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    wanted = [f for f in flags if f in ("avx2", "avx512f", "avx512_bf16") or f.startswith("amx")]
    return {
        "model": model,
        "flags": wanted,
        "cores": os.cpu_count(),
        "bf16_hardware": "avx512_bf16" in flags or "amx_bf16" in flags,
    }


def paired_rounds(calls, rounds):
    """Times of two calls, alternating within each round (the order swapped
    every other round): ([first's seconds], [second's seconds]), one per round."""
    times = [[], []]
    for round_ in range(rounds):
        for index in (0, 1) if round_ % 2 == 0 else (1, 0):
            start = time.perf_counter()
            calls[index]()
            times[index].append(time.perf_counter() - start)
    return times


def paired_summary(times, first, second):
    """One line for paired_rounds' times: each call's median and the median of
    the per-round ratios second / first (below 1: the second is faster)."""
    ratios = [b / a for a, b in zip(*times)]
    return (
        f"{first} {1e3 * statistics.median(times[0]):.1f} ms, {second} {1e3 * statistics.median(times[1]):.1f} ms, "
        f"paired {statistics.median(ratios):.3f} ({sum(r < 1 for r in ratios)}/{len(ratios)} rounds faster)"
    )


def alternate(functions, calls, warmup=3):
    """Calls each function in turn `calls` times; returns each one's median seconds."""
    for _ in range(warmup):
        for fn in functions.values():
            fn()
    times = {name: [] for name in functions}
    for _ in range(calls):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
