"""Backbones from torchvision or timm, with a new classifier head and optional pretrained weights.

``pretrained`` is ``"none"``, ``"imagenet"`` (the library's own weights, from its cache or a download
that fails fast offline) or a path to a local ``.safetensors``/``.pth`` weights file.
"""
from __future__ import annotations

import difflib
import os
import pickle
import socket
import threading
import urllib.request
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

import torch
from torch import nn

from hierarchy.core.errors import PretrainedWeightsError, UnknownBackboneError

LIBRARIES = ("torchvision", "timm")
PROBE_TIMEOUT_S = 5.0
_OFFLINE_HINT = (
    "No network? Copy the file there, or use --pretrained none (train from scratch) "
    "or --pretrained PATH (a local .safetensors/.pth weights file)"
)
_HF_OFFLINE_HINT = _OFFLINE_HINT.replace(
    "Copy the file there", "Copy that folder from a machine that ran `hf download REPO` (or set HF_HUB_CACHE)"
)
# torchvision builders set these when loading their own weights (see torchvision.models.googlenet).
_TV_PRETRAINED_KWARGS = {
    "googlenet": {"transform_input": True, "aux_logits": True, "init_weights": False},
    "inception_v3": {"transform_input": True, "aux_logits": True, "init_weights": False},
}


# ---------------------------------------------------------------- names


def _torchvision_names() -> list[str]:
    from torchvision import models

    return models.list_models(module=models)


def resolve_backbone(backbone: str) -> tuple[str, str]:
    """``"timm/x"``/``"torchvision/x"``/bare name -> (library, name). Bare names prefer torchvision."""
    library, sep, name = backbone.partition("/")
    if not sep:
        library, name = "", backbone
    elif library not in LIBRARIES:
        raise UnknownBackboneError(f"Unknown backbone library '{library}' in '{backbone}'; use torchvision/ or timm/")
    if library in ("", "torchvision") and name in _torchvision_names():
        return "torchvision", name
    import timm  # only now: importing timm costs ~0.4 s of `hierarchy run` start-up

    if library in ("", "timm") and timm.is_model(name):
        return "timm", name
    raise UnknownBackboneError(_unknown_message(backbone, name))


def _unknown_message(backbone: str, name: str) -> str:
    import timm

    tv = difflib.get_close_matches(name, _torchvision_names(), n=3, cutoff=0.5)
    tm = timm.list_models(f"*{name}*")[:5] or difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hints = ", ".join(dict.fromkeys(["resnet18", "resnet50", "efficientnet_b0", "convnext_tiny", *tv]))
    timm_hint = f" (similar timm models: {', '.join('timm/' + m for m in tm)})" if tm else ""
    return f"Unknown backbone '{backbone}'; try {hints}{timm_hint}"


# ---------------------------------------------------------------- heads


def _last_layer(module: nn.Module) -> nn.Module:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return module
    layers = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        raise ValueError(f"no Linear/Conv2d classifier layer in {type(module).__name__}")
    return layers[-1]


def classifier_module(model: nn.Module) -> nn.Module:
    """The final classification layer (its input is the penultimate feature vector)."""
    if hasattr(model, "get_classifier"):  # timm
        head = model.get_classifier()
        return head[0] if isinstance(head, tuple) else head
    for attr in ("fc", "classifier", "head", "heads"):
        module = getattr(model, attr, None)
        if isinstance(module, nn.Module):
            return _last_layer(module)
    raise ValueError(f"cannot find the classifier of {type(model).__name__} (no fc/classifier/head/heads)")


def head_name(model: nn.Module) -> str:
    """Dotted module name of :func:`classifier_module` (e.g. ``"fc"``, ``"classifier.1"``)."""
    head = classifier_module(model)
    for name, module in model.named_modules():
        if module is head:
            return name
    raise ValueError(f"classifier of {type(model).__name__} is not a submodule")


def _replace_head(model: nn.Module, num_classes: int) -> None:
    if hasattr(model, "reset_classifier"):  # timm
        model.reset_classifier(num_classes)
        return
    name, old = head_name(model), classifier_module(model)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
    model.set_submodule(name, new)


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass -> (penultimate features (N, D), logits (N, C)); features are the
    classifier's input, captured by a hook so the backbone is not run twice."""
    captured: list[torch.Tensor] = []
    handle = classifier_module(model).register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"{type(model).__name__}'s classifier was not called by forward()")
    feats = captured[-1]
    if feats.ndim == 4:  # 1x1-conv heads (squeezenet) see a feature map
        feats = feats.mean(dim=(2, 3))
    return feats.flatten(1), logits.flatten(1)


# ---------------------------------------------------------------- create


def create_model(backbone: str, num_classes: int, pretrained: str = "none") -> tuple[nn.Module, dict[str, Any]]:
    """Build ``backbone`` with a ``num_classes`` head; return (model, arch dict for the metadata)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    library, name = resolve_backbone(backbone)
    if pretrained == "imagenet":
        model = _torchvision_imagenet(name) if library == "torchvision" else _timm_imagenet(name)
    else:
        model = _build(library, name)
    _replace_head(model, num_classes)
    if pretrained not in ("none", "imagenet"):
        load_backbone_weights(model, Path(pretrained))
    return model, {"backbone": name, "library": library, "num_classes": int(num_classes)}


def model_from_arch(arch: Mapping[str, Any]) -> nn.Module:
    """Rebuild (without pretrained weights) the model an ``arch`` dict describes."""
    missing = [k for k in ("backbone", "library", "num_classes") if k not in arch]
    if missing:
        raise ValueError(f"arch is missing {missing}: {dict(arch)}")
    return create_model(f"{arch['library']}/{arch['backbone']}", int(arch["num_classes"]))[0]


def _build(library: str, name: str, **kwargs: Any) -> nn.Module:
    if library == "torchvision":
        from torchvision import models

        return models.get_model(name, weights=None, **kwargs)
    import timm

    return timm.create_model(name, pretrained=False, **kwargs)


# ---------------------------------------------------------------- imagenet weights


def _probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
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


def _hub_checkpoint_file(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _fetch_url(url: str) -> Path:
    """The torch.hub cache file for ``url``, downloading it first when absent and reachable."""
    file = _hub_checkpoint_file(url)
    if file.is_file():
        return file
    if not _probe(url):
        raise PretrainedWeightsError(
            file, f"ImageNet weights are not cached and {url} is unreachable. {_OFFLINE_HINT}", url=url
        )
    match = torch.hub.HASH_REGEX.search(file.name)
    file.parent.mkdir(parents=True, exist_ok=True)
    try:  # download_url_to_file writes a temp file and renames it: atomic
        torch.hub.download_url_to_file(url, str(file), hash_prefix=match.group(1) if match else None)
    except (OSError, RuntimeError) as e:
        raise PretrainedWeightsError(file, f"downloading {url} failed: {e}. {_OFFLINE_HINT}", url=url) from e
    return file


def _torchvision_imagenet(name: str) -> nn.Module:
    from torchvision import models

    try:
        weights = models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError) as e:
        raise PretrainedWeightsError(name, "torchvision has no ImageNet weights for this model") from e
    file = _fetch_url(weights.url)
    try:  # the library's loader; weights_only because a cached file may have been tampered with
        state = torch.hub.load_state_dict_from_url(
            weights.url, model_dir=str(file.parent), map_location="cpu", check_hash=True, weights_only=True
        )
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise PretrainedWeightsError(file, f"cannot load cached ImageNet weights ({e}); delete the file") from e
    model = _build("torchvision", name, **_TV_PRETRAINED_KWARGS.get(name, {}))
    model.load_state_dict(state)
    if name == "googlenet":  # as torchvision does: aux heads only exist to load the weights
        model.aux_logits, model.aux1, model.aux2 = False, None, None
    return model


def _hf_cache_dir() -> Path:
    """The HF hub cache, from the environment at call time (huggingface_hub reads it at import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(constants.HF_HUB_CACHE)


def _timm_imagenet(name: str) -> nn.Module:
    import timm
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is not None and cfg.hf_hub_id:
        file = _fetch_hf(cfg.hf_hub_id, cfg.hf_hub_filename)
    elif cfg is not None and cfg.url:
        file = _fetch_url(cfg.url)
    else:
        raise PretrainedWeightsError(name, "timm has no pretrained weights for this model")
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(file)})
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise PretrainedWeightsError(file, f"cannot load cached timm weights ({e}); delete the file") from e


def _fetch_hf(hub_id: str, filename: str | None) -> Path:
    """timm's HF hub weights: the cached file if present, else a download that fails fast offline."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    repo, _, revision = hub_id.partition("@")
    cache = _hf_cache_dir()
    names = [filename] if filename else ["model.safetensors", "pytorch_model.bin"]
    for fname in names:
        hit = try_to_load_from_cache(repo, fname, cache_dir=cache, revision=revision or None)
        if isinstance(hit, str):
            return Path(hit)
    where = f"{cache}/models--{repo.replace('/', '--')} (file {names[0]})"
    url = f"{constants.ENDPOINT}/{repo}"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or not _probe(url):
        raise PretrainedWeightsError(where, f"timm weights for HF repo {repo} are not cached and {url} "
                                     f"is unreachable. {_HF_OFFLINE_HINT.replace('REPO', repo)}", url=url)
    errors = []
    for fname in names:
        try:
            return Path(hf_hub_download(repo, fname, revision=revision or None, cache_dir=cache))
        except Exception as e:  # noqa: BLE001 - httpx/hub errors vary by version; all mean "not obtained"
            errors.append(f"{fname}: {e}")
    raise PretrainedWeightsError(where, f"downloading from HF repo {repo} failed: {'; '.join(errors)}. "
                                 f"{_HF_OFFLINE_HINT.replace('REPO', repo)}", url=url)


# ---------------------------------------------------------------- local weights file


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A local weights file as a flat state_dict: safetensors, or a torch.save file loaded with
    ``weights_only=True`` (plain state_dict or ``{"state_dict"|"model": ...}``)."""
    if not path.is_file():
        raise PretrainedWeightsError(path, "pretrained weights file not found (--pretrained takes none, "
                                     "imagenet or a path to a .safetensors/.pth file)")
    from hierarchy.models.checkpoint import describe_load_error, load_weights

    if path.suffix == ".safetensors":
        return load_weights(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise PretrainedWeightsError(path, "refused or unreadable weights file (loaded with weights_only=True; "
                                     f"{describe_load_error(e)})") from e
    return _unwrap_state_dict(obj, path)


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedWeightsError(path, "not a state_dict (expected a dict of tensors, or one under "
                                     "'state_dict' or 'model')")
    if obj and all(k.startswith("module.") for k in obj):  # saved from DataParallel/DDP
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _listing(keys: list[str], limit: int = 8) -> str:
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_backbone_weights(model: nn.Module, path: Path) -> list[str]:
    """Load a local weights file into ``model``; head tensors of another shape (another class
    count) are dropped and returned. Any other missing/unexpected/mismatched key is an error."""
    state = read_weights_file(path)
    own = model.state_dict()
    head = head_name(model) + "."
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    dropped = [k for k in mismatched if k.startswith(head)]
    bad_shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched if k not in dropped]
    missing = [k for k in own if k not in state and not k.startswith(head) and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    problems = [
        f"{label} {len(keys)}: {_listing(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", bad_shapes))
        if keys
    ]
    if problems:
        raise PretrainedWeightsError(path, f"weights do not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict({k: v for k, v in state.items() if k not in dropped}, strict=False)
    return dropped
