"""ImageNet weights from the Hugging Face Hub: the pinned revision of timm's
safetensors file, through `huggingface_hub` into the standard Hugging Face cache
(shared with timm: a file timm already fetched is not fetched again), its
sha256 checked. `HF_ENDPOINT`, `HF_HUB_OFFLINE`, `HF_HOME`/`HF_HUB_CACHE` and
tokens behave as in every Hugging Face library; they are read at each call.
"""

import glob
import hashlib
import os
import sys

from keras_sequencer import registry
from keras_sequencer.files import remove
from keras_sequencer.weights.checkpoint import WeightsError

DEFAULT_ENDPOINT = "https://huggingface.co"
# Seconds to wait for the Hub's answer to the metadata request before a
# download gives up (huggingface_hub's `etag_timeout`).
CONNECT_TIMEOUT_S = 10.0


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def offline():
    return _truthy("HF_HUB_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE")


def hub_cache_dir():
    """The Hugging Face hub cache, resolved as huggingface_hub does, now."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return os.path.join(home, "hub")


def endpoint():
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def pretrained_source(variant):
    if variant not in registry.PRETRAINED:
        raise WeightsError(
            f"No ImageNet weights for {variant!r}; available: {', '.join(registry.PRETRAINED)}."
        )
    return registry.PRETRAINED[variant]


def weights_url(variant):
    source = pretrained_source(variant)
    return f"{endpoint()}/{source['repo_id']}/resolve/{source['revision']}/{source['filename']}"


def how_to_work_offline():
    return (
        "Pass a local file instead (weights='/path/to/model.safetensors', a .pth "
        "or a .weights.h5), or set HF_ENDPOINT to a reachable mirror."
    )


def imagenet_checkpoint(variant):
    """The path of `variant`'s ImageNet checkpoint in the Hugging Face cache,
    downloaded (with a progress bar) and verified on first use."""
    source = pretrained_source(variant)
    _retire_converted_cache(variant)
    cache = hub_cache_dir()
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(
        source["repo_id"], source["filename"], cache_dir=cache, revision=source["revision"]
    )
    if isinstance(cached, str) and os.path.isfile(cached):
        # A cache blob is named by its ETag, the sha256 of an LFS file: a
        # matching name is the checked file, anything else is hashed.
        if source["sha256"] is None or os.path.basename(os.path.realpath(cached)) == source["sha256"]:
            return cached
        _verify(cached, source, variant)
        return cached
    if offline():
        raise WeightsError(
            f"HF_HUB_OFFLINE is set and the {variant} ImageNet weights are not in the "
            f"Hugging Face cache ({cache}). " + how_to_work_offline()
        )
    path = _download(source, cache, variant)
    _verify(path, source, variant)
    return path


def _download(source, cache, variant):
    import huggingface_hub
    from huggingface_hub import errors

    url = weights_url(variant)
    try:
        return huggingface_hub.hf_hub_download(
            source["repo_id"],
            source["filename"],
            revision=source["revision"],
            cache_dir=cache,
            endpoint=endpoint(),
            etag_timeout=CONNECT_TIMEOUT_S,
            library_name="keras-sequencer",
        )
    except errors.HfHubHTTPError as error:
        response = getattr(error, "response", None)
        status = getattr(response, "status_code", None)
        reason = f"HTTP {status}" if status else str(error).splitlines()[0]
        raise WeightsError(f"Downloading {url} failed: {reason}. " + how_to_work_offline()) from None
    except errors.LocalEntryNotFoundError:
        # huggingface_hub's word for "could not reach the server, and not cached".
        raise WeightsError(
            f"Could not reach {endpoint()} to download {url}. " + how_to_work_offline()
        ) from None
    except Exception as error:  # httpx and OS errors: one line, not their chain
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if any(word in message.lower() for word in ("consistency check", "complete message body", "received")):
            message = f"the download was interrupted and is truncated ({message})"
        raise WeightsError(f"The download from {url} failed: {message}. Try again.") from None


def _verify(path, source, variant):
    """Checks the file's sha256 (where published); a file that fails is removed
    from the cache (blob and snapshot link), so the next call downloads anew."""
    expected = source["sha256"]
    if expected is None:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    actual = digest.hexdigest()
    if actual != expected:
        blob = os.path.realpath(path)
        remove(path)
        remove(blob)
        raise WeightsError(
            f"sha256 mismatch for {weights_url(variant)}: expected {expected}, got {actual}. "
            "The file was removed from the Hugging Face cache; check HF_ENDPOINT or try again."
        )


def _retire_converted_cache(variant):
    """Versions before 0.2 kept a converted copy under $KERAS_HOME/models; the
    checkpoint in the Hugging Face cache is now converted at load, so the copy
    is removed once, with a line saying so."""
    base = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    for old in glob.glob(os.path.join(base, "models", f"{variant}.in1k.*.weights.h5")):
        remove(old)
        print(
            f"keras-sequencer: removed the old converted copy {old} (weights now load from "
            "the Hugging Face cache).",
            file=sys.stderr,
        )
