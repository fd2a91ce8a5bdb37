"""The CPU a benchmark ran on, for its results: model name, core count and the
flags that decide bf16 speed (AVX512-BF16, AMX), as every table records them."""

import os


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
