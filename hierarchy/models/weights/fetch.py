"""Cached library weights: torch.hub checkpoint files and the Hugging Face hub cache, with a
download only when the host answers within :data:`PROBE_TIMEOUT_S` (so offline fails fast)."""
from __future__ import annotations

import os
import socket
import threading
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import torch

from hierarchy.core.errors import PretrainedWeightsError

PROBE_TIMEOUT_S = 5.0
OFFLINE_HINT = (
    "No network? Copy the file there, or use --pretrained none (train from scratch) "
    "or --pretrained PATH (a local .safetensors/.pth weights file)"
)
HF_OFFLINE_HINT = OFFLINE_HINT.replace(
    "Copy the file there", "Copy that folder from a machine that ran `hf download REPO` (or set HF_HUB_CACHE)"
)


def probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Can we open a TCP connection to the URL's host (or the HTTPS proxy) within ``timeout``?
    Runs in a thread because DNS lookups ignore socket timeouts and can hang offline."""
    proxy = urllib.request.getproxies().get("https") or urllib.request.getproxies().get("http")
    parsed = urlparse(proxy or url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    ok: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(ok)


def hub_checkpoint_file(url: str) -> Path:
    """Where torch.hub caches the file of ``url`` (``$TORCH_HOME/hub/checkpoints/<name>``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def fetch_url(url: str) -> Path:
    """The torch.hub cache file for ``url``, downloading it first when absent and reachable."""
    file = hub_checkpoint_file(url)
    if file.is_file():
        return file
    if not probe(url):
        raise PretrainedWeightsError(
            file, f"ImageNet weights are not cached and {url} is unreachable. {OFFLINE_HINT}", url=url
        )
    match = torch.hub.HASH_REGEX.search(file.name)
    file.parent.mkdir(parents=True, exist_ok=True)
    try:  # download_url_to_file writes a temp file and renames it: atomic
        torch.hub.download_url_to_file(url, str(file), hash_prefix=match.group(1) if match else None)
    except (OSError, RuntimeError) as e:
        raise PretrainedWeightsError(file, f"downloading {url} failed: {e}. {OFFLINE_HINT}", url=url) from e
    return file


def hf_cache_dir() -> Path:
    """The HF hub cache, from the environment at call time (huggingface_hub reads it at import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(constants.HF_HUB_CACHE)


def hf_names(filename: str | None) -> list[str]:
    return [filename] if filename else ["model.safetensors", "pytorch_model.bin"]


def hf_cached(hub_id: str, filename: str | None) -> Path | None:
    """The cached file of HF repo ``hub_id`` (``repo@revision``), or None; never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = hub_id.partition("@")
    for fname in hf_names(filename):
        hit = try_to_load_from_cache(repo, fname, cache_dir=hf_cache_dir(), revision=revision or None)
        if isinstance(hit, str):
            return Path(hit)
    return None


def hf_where(hub_id: str, filename: str | None) -> str:
    repo = hub_id.partition("@")[0]
    return f"{hf_cache_dir()}/models--{repo.replace('/', '--')} (file {hf_names(filename)[0]})"


def fetch_hf(hub_id: str, filename: str | None) -> Path:
    """timm's HF hub weights: the cached file if present, else a download that fails fast offline."""
    from huggingface_hub import constants, hf_hub_download

    hit = hf_cached(hub_id, filename)
    if hit is not None:
        return hit
    repo, _, revision = hub_id.partition("@")
    where, url = hf_where(hub_id, filename), f"{constants.ENDPOINT}/{repo}"
    hint = HF_OFFLINE_HINT.replace("REPO", repo)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or not probe(url):
        raise PretrainedWeightsError(where, f"timm weights for HF repo {repo} are not cached and {url} "
                                     f"is unreachable. {hint}", url=url)
    errors = []
    for fname in hf_names(filename):
        try:
            return Path(hf_hub_download(repo, fname, revision=revision or None, cache_dir=hf_cache_dir()))
        except Exception as e:  # noqa: BLE001 - httpx/hub errors vary by version; all mean "not obtained"
            errors.append(f"{fname}: {e}")
    raise PretrainedWeightsError(where, f"downloading from HF repo {repo} failed: {'; '.join(errors)}. {hint}",
                                 url=url)
