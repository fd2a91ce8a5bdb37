"""Cold start against timm: one image, from a fresh process to its top-5.

    python benchmarks/cold_start.py --rounds 5 --name cold_start

Creates (once, under --workdir, a temporary folder by default) a random timm sequencer2d_s checkpoint with a
non-zero head saved as `model.safetensors`, and a test photo (scikit-learn's
`load_sample_images`, saved as JPEG). Then runs N rounds, alternating, of fresh
subprocesses:

- timm: `timm.create_model`, `load_state_dict` from the file, timm's eval
  transform (`resolve_data_config` + `create_transform`), one forward under
  `torch.no_grad()`, print the top-5;
- ours in Python, per backend: `ks.create_model(..., weights=path)`,
  `ks.load_image`, one prediction, print the top-5;
- ours as the command line, per backend: `python -m keras_sequencer.cli predict
  photo.jpg --weights model.safetensors --variant s`;
- `--help` of the command line (what the user waits for before anything runs).

Reports the median wall time, CPU time (user + system, which other load on
the machine disturbs less than wall time), the median peak RSS (the child's
`ru_maxrss`, from `os.wait4`) and the ratios to timm of the same run, checks that
every engine's top-1 class equals timm's, and writes
`benchmarks/results/NAME.json` and `NAME.md`. Run by hand; nothing asserts on
time.
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BACKENDS = ("tensorflow", "jax", "torch")

TIMM_SCRIPT = """\
import sys
import torch, timm
from safetensors.torch import load_file
from timm.data import resolve_data_config, create_transform
from PIL import Image
weights, photo = sys.argv[1:3]
model = timm.create_model("sequencer2d_s")
model.load_state_dict(load_file(weights))
model.eval()
transform = create_transform(**resolve_data_config({}, model=model))
x = transform(Image.open(photo).convert("RGB"))[None]
with torch.no_grad():
    probs = model(x).softmax(-1)[0]
top = probs.topk(5)
print("TOP5", [int(i) for i in top.indices], [round(float(p), 4) for p in top.values])
"""

# What a user writes with the package; `fast_predict` where the package has it.
OURS_SCRIPT = """\
import sys
import numpy as np
import keras_sequencer as ks
try:  # the quickest first call on this backend
    from keras_sequencer.models import fast_predict
except ImportError:  # a package from before fast_predict
    fast_predict = lambda model, x: model.predict(x, verbose=0)
weights, photo = sys.argv[1:3]
model = ks.create_model("sequencer2d_s", weights=weights)
x = ks.load_image(photo)
probs = np.asarray(fast_predict(model, x[None]))[0]
top = np.argsort(probs)[::-1][:5]
print("TOP5", [int(i) for i in top], [round(float(probs[i]), 4) for i in top])
"""


def cpu_info():
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("unknown", "x86_64", ""):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")
    return {"model": model, "cores": os.cpu_count(), "flags": [f for f in wanted if f in flags]}


def versions():
    out = {"python": platform.python_version()}
    for name in ("keras", "tensorflow", "jax", "torch", "timm", "numpy"):
        try:
            from importlib.metadata import version

            out[name] = version(name if name != "tensorflow" else "tensorflow-cpu")
        except Exception:
            try:
                out[name] = version(name)
            except Exception:
                out[name] = None
    return out


def make_inputs(workdir):
    """The weights file and the photo, made once (torch/timm only: no TF here)."""
    os.makedirs(workdir, exist_ok=True)
    weights = os.path.join(workdir, "model.safetensors")
    photo = os.path.join(workdir, "photo.jpg")
    if not os.path.isfile(weights):
        import timm
        import torch
        from safetensors.torch import save_file

        torch.manual_seed(0)
        model = timm.create_model("sequencer2d_s")
        torch.nn.init.normal_(model.head.fc.weight, std=0.02)  # timm zeroes the head
        torch.nn.init.normal_(model.head.fc.bias, std=0.02)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    if not os.path.isfile(photo):
        from PIL import Image
        from sklearn.datasets import load_sample_images

        Image.fromarray(load_sample_images().images[0]).save(photo, quality=95)
    return weights, photo


def run_measured(argv, env, cwd):
    """(wall s, peak RSS MiB, CPU s, stdout) of one fresh process. Popen +
    os.wait4 give this child's own peak RSS (communicate() would reap it first);
    output goes to files, so no pipe can fill up and stall it."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        # Not run from the repository: '' on sys.path would shadow --package-root.
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=err, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:5]} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return wall, usage.ru_maxrss / 1024.0, usage.ru_utime + usage.ru_stime, stdout


def top1(stdout):
    m = re.search(r"TOP5 \[(\d+)", stdout)
    if m:
        return int(m.group(1))
    return None


def engines(args, weights, photo):
    """name -> (argv, env). With --before-root, the same Python form also runs
    against that older copy of the package ("before/..."), in the same rounds."""
    base = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}
    roots = {"": args.package_root}
    if args.before_root:
        roots = {"before/": args.before_root, "": args.package_root or ROOT}
    py = sys.executable
    runs = {"timm": ([py, "-c", TIMM_SCRIPT, weights, photo], base)}
    script = args.ours_script or OURS_SCRIPT
    for prefix, root in roots.items():
        env_root = dict(base)
        if root:
            env_root["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.abspath(root), base.get("PYTHONPATH")]))
        for backend in args.backends:
            env = {**env_root, "KERAS_BACKEND": backend}
            if "python" in args.forms:
                runs[f"{prefix}ours/{backend}/python"] = ([py, "-c", script, weights, photo], env)
            if "cli" in args.forms and not prefix:
                cli = [py, "-m", "keras_sequencer.cli", "predict", photo, "--weights", weights,
                       "--variant", "s", "--json"]
                runs[f"ours/{backend}/cli"] = (cli, env)
        if "help" in args.forms:
            runs[f"{prefix}cli --help"] = ([py, "-m", "keras_sequencer.cli", "--help"], env_root)
    return runs


def cli_top1(stdout):
    """The CLI's top-1 synset (its --json output)."""
    try:
        return json.loads(stdout)[0]["predictions"][0]["synset"]
    except (ValueError, LookupError):
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--forms", nargs="+", default=["python", "cli", "help"], choices=["python", "cli", "help"])
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "keras_sequencer_cold_start"),
                        help="where the weights file and photo are made (outside the repository)")
    parser.add_argument("--name", default="cold_start")
    parser.add_argument("--package-root", default=None,
                        help="put this folder first on PYTHONPATH (e.g. a copy of an older keras_sequencer)")
    parser.add_argument("--before-root", default=None,
                        help="also run the Python form and --help against this older copy of the package")
    parser.add_argument("--ours-script", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ours_script and os.path.isfile(args.ours_script):
        with open(args.ours_script) as f:
            args.ours_script = f.read()

    weights, photo = make_inputs(args.workdir)
    runs = engines(args, weights, photo)
    samples = {name: {"wall_s": [], "peak_rss_mib": [], "cpu_s": []} for name in runs}
    tops = {}
    for round_ in range(args.rounds):
        for name, (argv, env) in runs.items():
            wall, rss, cpu, stdout = run_measured(argv, env, args.workdir)
            samples[name]["wall_s"].append(round(wall, 3))
            samples[name]["cpu_s"].append(round(cpu, 2))
            samples[name]["peak_rss_mib"].append(round(rss, 1))
            if name.endswith("/cli"):
                tops[name] = cli_top1(stdout)
            elif not name.endswith("cli --help"):
                tops[name] = top1(stdout)
            print(f"round {round_ + 1}: {name:28s} {wall:6.2f} s {rss:7.0f} MiB {cpu:6.2f} CPU s", flush=True)

    # The CLI prints synsets; map timm's top-1 index to its synset to compare.
    sys.path.insert(0, ROOT)
    from keras_sequencer.imagenet import imagenet_synsets  # numpy only

    synsets = imagenet_synsets()
    timm_top = tops.get("timm")
    agree = {}
    for name, top in tops.items():
        if name == "timm" or top is None:
            continue
        agree[name] = (top == synsets[timm_top]) if isinstance(top, str) else (top == timm_top)

    timm_wall = statistics.median(samples["timm"]["wall_s"])
    timm_rss = statistics.median(samples["timm"]["peak_rss_mib"])
    timm_cpu = statistics.median(samples["timm"]["cpu_s"])
    rows = []
    for name, s in samples.items():
        wall, rss, cpu = (statistics.median(s[k]) for k in ("wall_s", "peak_rss_mib", "cpu_s"))
        rows.append({"engine": name, "median_s": round(wall, 2), "vs_timm_time": round(wall / timm_wall, 2),
                     "median_peak_rss_mib": round(rss), "vs_timm_rss": round(rss / timm_rss, 2),
                     "median_cpu_s": round(cpu, 2), "vs_timm_cpu": round(cpu / timm_cpu, 2),
                     "samples_s": s["wall_s"], "samples_rss_mib": s["peak_rss_mib"], "samples_cpu_s": s["cpu_s"],
                     "top1_agrees_with_timm": agree.get(name)})
    result = {"name": args.name, "cpu": cpu_info(), "versions": versions(), "rounds": args.rounds,
              "command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
    out_dir = os.path.join(HERE, "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{args.name}.json"), "w") as f:
        json.dump(result, f, indent=2)
    md = markdown(result)
    with open(os.path.join(out_dir, f"{args.name}.md"), "w") as f:
        f.write(md)
    print(md)


def markdown(result):
    cpu = result["cpu"]
    lines = [
        f"`python {result['command']}` ({result['time']}; {result['rounds']} alternating rounds)",
        "",
        f"CPU: {cpu['model']}, {cpu['cores']} cores, flags: {', '.join(cpu['flags']) or 'none of interest'}; "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v),
        "",
        "| engine | median wall s | vs timm | median CPU s | vs timm | peak RSS MiB | vs timm | top-1 = timm | wall samples s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        agree = {True: "yes", False: "NO", None: "-"}[r["top1_agrees_with_timm"]]
        lines.append(
            f"| {r['engine']} | {r['median_s']:.2f} | {r['vs_timm_time']:.2f}x | {r['median_cpu_s']:.2f} "
            f"| {r['vs_timm_cpu']:.2f}x | {r['median_peak_rss_mib']} | {r['vs_timm_rss']:.2f}x | {agree} | {' / '.join(f'{s:.2f}' for s in r['samples_s'])} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
