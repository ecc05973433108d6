"""First-party providers: torchvision's and timm's own weights, from their caches (torch.hub,
Hugging Face hub). A missing file is downloaded only when the host answers (see :mod:`.fetch`)."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hierarchy.core.errors import PretrainedWeightsError

from . import fetch
from .base import WeightsEntry, WeightsPreset, WeightsProvider

IMAGENET = "imagenet"
# torchvision builders set these when loading their own weights (see torchvision.models.googlenet).
_TV_PRETRAINED_KWARGS = {
    "googlenet": {"transform_input": True, "aux_logits": True, "init_weights": False},
    "inception_v3": {"transform_input": True, "aux_logits": True, "init_weights": False},
}
_LOAD_ERRORS = (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError)


class TorchvisionCache(WeightsProvider):
    """torchvision's DEFAULT ImageNet weights of a model, from ``$TORCH_HOME/hub/checkpoints``."""

    name = "torchvision"
    downloads = True

    def offer(self, library: str, model: str, tag: str) -> WeightsEntry | None:
        if library != "torchvision" or tag != IMAGENET:
            return None
        weights = _tv_weights(model)
        if weights is None:
            return None
        tf = weights.transforms()
        preset = WeightsPreset(tuple(tf.mean), tuple(tf.std), int(tf.crop_size[0]), str(tf.interpolation.value))
        return WeightsEntry(self.name, f"torchvision/{model}", tag, "torchvision", model, preset,
                            fetch.hub_checkpoint_file(weights.url), f"torch.hub cache ({weights.url})",
                            fetch.OFFLINE_HINT)

    def listing(self) -> list[WeightsEntry]:
        from torchvision import models

        folder = Path(torch.hub.get_dir()) / "checkpoints"
        cached = {p.name for p in folder.glob("*")} if folder.is_dir() else set()
        entries = [self.offer("torchvision", m, IMAGENET) for m in models.list_models(module=models)] if cached else []
        return [e for e in entries if e is not None and e.file.name in cached]

    def load(self, entry: WeightsEntry) -> tuple[nn.Module, Path]:
        from .. import backbones

        weights = _tv_weights(entry.model)
        file = fetch.fetch_url(weights.url)
        try:  # the library's loader; weights_only because a cached file may have been tampered with
            state = torch.hub.load_state_dict_from_url(
                weights.url, model_dir=str(file.parent), map_location="cpu", check_hash=True, weights_only=True
            )
        except _LOAD_ERRORS as e:
            raise PretrainedWeightsError(file, f"cannot load cached ImageNet weights ({e}); delete the file") from e
        model = backbones.build_model("torchvision", entry.model, **_TV_PRETRAINED_KWARGS.get(entry.model, {}))
        model.load_state_dict(state)
        if entry.model == "googlenet":  # as torchvision does: aux heads only exist to load the weights
            model.aux_logits, model.aux1, model.aux2 = False, None, None
        return model, file


def _tv_weights(model: str) -> Any:
    from torchvision import models

    try:
        return models.get_model_weights(model).DEFAULT
    except (ValueError, AttributeError):
        return None


class TimmCache(WeightsProvider):
    """timm's default pretrained weights of a model, from the HF hub cache (or torch.hub for the
    few timm models that still have a URL)."""

    name = "timm"
    downloads = True

    def offer(self, library: str, model: str, tag: str) -> WeightsEntry | None:
        from timm.models import get_pretrained_cfg

        if library != "timm" or tag != IMAGENET:
            return None
        cfg = get_pretrained_cfg(model)
        if cfg is None or not (cfg.hf_hub_id or cfg.url):
            return None
        preset = WeightsPreset(tuple(cfg.mean), tuple(cfg.std), int(cfg.input_size[-1]), str(cfg.interpolation))
        if cfg.hf_hub_id:
            file = fetch.hf_cached(cfg.hf_hub_id, cfg.hf_hub_filename)
            where, source = fetch.hf_where(cfg.hf_hub_id, cfg.hf_hub_filename), f"HF hub cache ({cfg.hf_hub_id})"
            hint = fetch.HF_OFFLINE_HINT.replace("REPO", cfg.hf_hub_id.partition("@")[0])
        else:
            file, where, source = fetch.hub_checkpoint_file(cfg.url), "", f"torch.hub cache ({cfg.url})"
            hint = fetch.OFFLINE_HINT
        return WeightsEntry(self.name, f"timm/{model}", tag, "timm", model, preset, file or Path(where), source, hint)

    def listing(self) -> list[WeightsEntry]:
        folder = fetch.hf_cache_dir()
        repos = sorted(folder.glob("models--timm--*")) if folder.is_dir() else []
        names = {r.name[len("models--timm--"):].partition(".")[0] for r in repos}
        entries = [self.offer("timm", n, IMAGENET) for n in sorted(names)]
        return [e for e in entries if e is not None and self.available(e)]

    def load(self, entry: WeightsEntry) -> tuple[nn.Module, Path]:
        import timm
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(entry.model)
        file = fetch.fetch_hf(cfg.hf_hub_id, cfg.hf_hub_filename) if cfg.hf_hub_id else fetch.fetch_url(cfg.url)
        try:
            model = timm.create_model(entry.model, pretrained=True, pretrained_cfg_overlay={"file": str(file)})
        except _LOAD_ERRORS as e:
            raise PretrainedWeightsError(file, f"cannot load cached timm weights ({e}); delete the file") from e
        return model, file
