"""Every ```python block of README.md runs, so README code cannot drift.

The blocks are read from README.md at collection time: a block added later is
picked up without touching this file. Test ids are the nearest heading above the
block plus its index under that heading (`usage-1`, `usage-2`, `training-1`, ...).

Rules for README authors:

- Every python block is a complete script: it imports what it uses and defines
  the names it needs (a reader copies one block, not the whole page). Each runs
  as `python block.py` in a fresh interpreter, in an empty directory.
- `weights="imagenet"` works for sequencer2d_s only: a random-weight S
  checkpoint is served from a local Hugging-Face-shaped server (HF_ENDPOINT) and
  its sha256 becomes the pin. M and L ImageNet weights are not served (a block
  that downloads them fails with HTTP 404): use S in examples, or `weights=None`
  where a line is about the architecture.
- Files a block reads must be listed in `FILES` below (today: `photo.jpg`, a
  scikit-learn sample photo); each is created in the block's directory when the
  block's text names it.
- A block must be quick: it runs on every CI run. Where a real-size version is
  too slow, the README shows a smaller form that still makes sense to a user.
- A block that cannot run (a fragment, a placeholder path) is marked in the
  README with `<!-- readme-test: skip REASON -->` on the line before its fence.
- A block that imports an optional package (`OPTIONAL`: keras-hub) is skipped
  where that package is not installed; the `test` extra installs it, so CI runs it.

The blocks run once, in the TensorFlow session (`run_once`): the README's code is
backend-neutral. A block meant for another backend sets `KERAS_BACKEND` itself
before importing keras, which works because the runner does not import keras
before the block does. The runner neither imports torch first: the blocks are
users' scripts, and run as they are written.

How pins are patched in a fresh interpreter: the runner installs an import hook
that, when the block imports `keras_sequencer.weights`, replaces the sha256 of
each served variant in `PRETRAINED` (repo, commit and file name stay), then runs
the block with `runpy` as `__main__`. The cache (KERAS_HOME, HF_HOME) is a
temporary directory shared by the blocks, so the served file is converted once.
"""

import ast
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import run_once

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
SERVED = ("sequencer2d_s",)
BLOCK_TIMEOUT_S = 600
SKIP_MARK = re.compile(r"<!--\s*readme-test:\s*skip\b\s*(.*?)\s*-->")


def _photo(path):
    from PIL import Image
    from sklearn.datasets import load_sample_images

    Image.fromarray(load_sample_images().images[0]).save(path)  # china.jpg, 427x640


# File names README blocks read -> a function that writes one at the given path.
FILES = {"photo.jpg": _photo}


# Import name -> package, for blocks that may be skipped where it is missing.
OPTIONAL = {"keras_hub": "keras-hub"}


def _missing_optional(code):
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return None  # let the run report it
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    for name in sorted(names & set(OPTIONAL)):
        if importlib.util.find_spec(name) is None:
            return f"needs {OPTIONAL[name]} (pip install {OPTIONAL[name]})"
    return None


def _marks(skip, code):
    reason = skip or _missing_optional(code)
    return [pytest.mark.skip(reason=reason)] if reason else []


def _slug(text):
    return re.sub(r"[^a-z0-9_]+", "-", text.lower()).strip("-") or "top"


def readme_blocks(text):
    """(id, code, first line number, skip reason or None) for each ```python block."""
    blocks, heading, counts = [], "top", {}
    lines = text.splitlines()
    fence, body, start, language, previous = None, [], 0, None, ""
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if fence is None:
            match = re.match(r"^(`{3,}|~{3,})\s*([\w+-]*)", stripped)
            if match:
                fence, language, body, start = match.group(1), match.group(2).lower(), [], number + 1
                skip = SKIP_MARK.search(previous)
                skip_reason = (skip.group(1) or "marked in README") if skip else None
            elif line.startswith("#"):
                heading = line.lstrip("#").strip()
            if stripped:
                previous = stripped
        elif stripped.startswith(fence) and stripped.strip(fence[0]) == "":
            if language in ("python", "py", "python3"):
                counts[heading] = counts.get(heading, 0) + 1
                block_id = f"{_slug(heading)}-{counts[heading]}"
                blocks.append((block_id, textwrap.dedent("\n".join(body)) + "\n", start, skip_reason))
            fence, previous = None, ""
        else:
            body.append(line)
    assert fence is None, f"README.md: the block opened at line {start - 1} is never closed"
    return blocks


with open(README, encoding="utf-8") as _file:
    BLOCKS = readme_blocks(_file.read())

RUNNER = textwrap.dedent(
    '''
    """Runs one README block as __main__, with the served files' sha256 pinned."""
    import json
    import os
    import runpy
    import sys

    PINS = json.loads(os.environ["README_TEST_PINS"])


    from keras_sequencer import registry  # imports nothing else: the block starts cold

    for variant, sha256 in PINS.items():
        registry.PRETRAINED[variant]["sha256"] = sha256
    block = sys.argv[1]
    sys.argv = [block]
    runpy.run_path(block, run_name="__main__")
    '''
)


def test_readme_has_python_blocks():
    ids = [block_id for block_id, *_ in BLOCKS]
    assert "usage-1" in ids, ids
    assert len(set(ids)) == len(ids), ids


def test_block_parser():
    text = textwrap.dedent(
        """
        # Title
        ```python
        a = 1
        ```
        ## Usage
        ```bash
        echo no
        ```
        ```python
            b = 2
        ```
        <!-- readme-test: skip needs a GPU -->
        ```py
        c = 3
        ```
        ### Sub
        ~~~python
        ```not a fence end
        ~~~
        """
    )
    blocks = readme_blocks(text)
    assert [(i, code, skip) for i, code, _, skip in blocks] == [
        ("title-1", "a = 1\n", None),
        ("usage-1", "b = 2\n", None),
        ("usage-2", "c = 3\n", "needs a GPU"),
        ("sub-1", "```not a fence end\n", None),
    ]
    assert _missing_optional("import keras_hub_missing_x\n") is None
    assert _missing_optional("import os\nimport numpy as np\n") is None


@pytest.fixture(scope="module")
def readme_env(tmp_path_factory):
    pytest.importorskip("timm")
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    from hub_server import Hub
    from keras_sequencer import registry
    from reference import make_reference

    base = tmp_path_factory.mktemp("readme")
    server = Hub()
    pins = {}
    for seed, variant in enumerate(SERVED):
        source = registry.PRETRAINED[variant]
        repo, commit, filename = source["repo_id"], source["revision"], source["filename"]
        state = make_reference(variant, seed=seed).state_dict()
        path = base / f"{variant}.safetensors"
        safetensors_numpy.save_file(
            {k: np.ascontiguousarray(v.detach().numpy()) for k, v in state.items()}, str(path)
        )
        body = path.read_bytes()
        server.files[f"/{repo}/resolve/{commit}/{filename}"] = body
        pins[variant] = hashlib.sha256(body).hexdigest()
    runner = base / "run_block.py"
    runner.write_text(RUNNER)
    env = dict(os.environ)
    env.pop("HF_HUB_OFFLINE", None)
    env.update(
        HF_ENDPOINT=server.endpoint,
        KERAS_HOME=str(base / "keras_home"),
        HF_HOME=str(base / "hf_home"),
        README_TEST_PINS=json.dumps(pins),
        TF_CPP_MIN_LOG_LEVEL="3",
        MPLBACKEND="Agg",
    )
    env.setdefault("KERAS_BACKEND", "tensorflow")
    yield dict(runner=str(runner), env=env, server=server)
    server.stop()


@run_once
@pytest.mark.parametrize(
    "code, line",
    [
        pytest.param(code, line, id=block_id, marks=_marks(skip, code))
        for block_id, code, line, skip in BLOCKS
    ],
)
def test_readme_block_runs(code, line, readme_env, tmp_path):
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    for name, make in FILES.items():
        if name in code:
            make(str(workdir / name))
    script = tmp_path / "block.py"
    script.write_text(code)
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, readme_env["runner"], str(script)],
        cwd=workdir,
        env=readme_env["env"],
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 0, (
        f"README.md block at line {line} failed (exit {result.returncode}, {elapsed:.0f} s):\n"
        f"{code}\n--- stderr (end) ---\n{result.stderr[-4000:]}"
    )
