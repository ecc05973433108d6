"""Class-activation maps for each stage an image visited, for the label that stage chose.

The map comes from the ``grad-cam`` library (``pytorch_grad_cam``) on a fresh fp32 torch model of the
stage's checkpoint (:func:`hierarchy.engine.backends.torch_backend.build_model`), loaded on first use.
So it is the same whichever engine served the prediction: for ONNX and OpenVINO, which have no
gradients, the entry says that the torch model of the same weights drew the map. A stage whose
plugin loads a predictor of its own has no checkpoint to explain; its entry says so.
"""
from __future__ import annotations

import base64
import importlib.util
import io
import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from hierarchy.core.errors import HierarchyError
from hierarchy.explain import DEFAULT_METHOD, METHODS

if TYPE_CHECKING:
    from torch import nn

    from hierarchy.data.batches import Decoded
    from hierarchy.data.preset import Preset
    from hierarchy.engine.router import Router

log = logging.getLogger("hierarchy.explain")

MIN_OVERLAY = 224  # overlays are drawn at least this many pixels wide
ALL_STAGES = "*"  # key of a layer override for every stage


@dataclass
class Explanation:
    """The map for one stage of one record, or why there is none (``available`` False)."""

    stage: str
    label: str
    available: bool
    method: str | None = None
    layer: str | None = None
    note: str | None = None
    heatmap: np.ndarray | None = field(default=None, repr=False)  # (S, S) float32 in [0, 1]
    overlay: np.ndarray | None = field(default=None, repr=False)  # (H, W, 3) uint8

    @property
    def peak(self) -> tuple[float, float] | None:
        """(y, x) of the map's maximum as fractions of the image height and width."""
        if self.heatmap is None:
            return None
        y, x = np.unravel_index(int(np.argmax(self.heatmap)), self.heatmap.shape)
        h, w = self.heatmap.shape
        return (y + 0.5) / h, (x + 0.5) / w

    def png(self) -> bytes:
        """The overlay as PNG bytes."""
        from PIL import Image

        if self.overlay is None:
            raise HierarchyError(f"stage '{self.stage}': no explanation to write ({self.note})")
        buf = io.BytesIO()
        Image.fromarray(self.overlay).save(buf, "PNG")
        return buf.getvalue()

    def to_dict(self, inline_image: bool = False) -> dict[str, Any]:
        """JSON-ready entry; ``inline_image`` adds the overlay as a ``data:image/png`` URL."""
        out: dict[str, Any] = {"stage": self.stage, "label": self.label, "available": self.available,
                               "method": self.method, "layer": self.layer, "note": self.note}
        if self.available:
            y, x = self.peak  # type: ignore[misc]
            out["peak"] = {"x": round(x, 4), "y": round(y, 4)}
            if inline_image:
                out["image"] = "data:image/png;base64," + base64.b64encode(self.png()).decode("ascii")
        return out


class CamModel:
    """One stage's fp32 torch model, its target layer and CAM method; one map at a time (the
    library's hooks live on the model)."""

    def __init__(self, model: "nn.Module", preset: "Preset", labels: list[str], method: str = DEFAULT_METHOD,
                 layer: str | None = None, device: str = "cpu"):
        from hierarchy.explain.layers import target_layer
        from hierarchy.models.device import select_device

        check_method(method)
        self.device = select_device(device)
        self.model = model.float().eval().to(self.device)
        self.preset, self.labels, self.method = preset, list(labels), method
        self.layer_name, self.layer = target_layer(self.model, preset.size, layer)
        self._lock = threading.Lock()

    def heatmap(self, array: np.ndarray, label: str) -> np.ndarray:
        """(3, S, S) uint8 -> the (S, S) map in [0, 1] for ``label``."""
        import pytorch_grad_cam
        import torch
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        x = self.preset.normalize(torch.from_numpy(np.ascontiguousarray(array))[None].to(self.device))
        cam_class = getattr(pytorch_grad_cam, METHODS[self.method])
        with self._lock, torch.enable_grad(), cam_class(model=self.model, target_layers=[self.layer]) as cam:
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(self.labels.index(label))])
        return np.nan_to_num(np.asarray(maps[0], dtype=np.float32)).clip(0.0, 1.0)


def check_method(method: str) -> None:
    if method not in METHODS:
        raise HierarchyError(f"unknown CAM method '{method}'; choose from {', '.join(METHODS)}")


def overlay(array: np.ndarray, heat: np.ndarray, min_size: int = MIN_OVERLAY) -> np.ndarray:
    """The map over the image the model saw, (3, S, S) uint8 + (S, S) -> (D, D, 3) uint8 with D >= min_size."""
    from PIL import Image
    from pytorch_grad_cam.utils.image import show_cam_on_image

    size = max(min_size, array.shape[-1])
    img = Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0))).resize((size, size), Image.BILINEAR)
    mask = np.asarray(Image.fromarray(heat.astype(np.float32)).resize((size, size), Image.BILINEAR))
    return show_cam_on_image(np.asarray(img, dtype=np.float32) / 255.0, mask.clip(0.0, 1.0), use_rgb=True)


class Explainer:
    """Maps for a router's records: one :class:`CamModel` per stage, built on first use.

    ``layers`` overrides the target layer: ``{stage_id: dotted_name}``, ``"*"`` for every stage."""

    def __init__(self, router: "Router", method: str = DEFAULT_METHOD, layers: Mapping[str, str] | None = None,
                 device: str = "cpu"):
        check_method(method)
        if importlib.util.find_spec("pytorch_grad_cam") is None:
            raise HierarchyError("explanations need the grad-cam package: pip install 'hierarchy-cascade[serve]'")
        unknown = sorted(set(layers or {}) - set(router.stages) - {ALL_STAGES})
        if unknown:
            raise HierarchyError(f"--explain-layer names unknown stage(s) {', '.join(unknown)} "
                                 f"(stages: {', '.join(router.stages)})")
        self.router, self.method, self.layers, self.device = router, method, dict(layers or {}), device
        self._models: dict[str, CamModel | str] = {}
        self._lock = threading.Lock()

    def explain(self, record: Mapping[str, Any], item: "Decoded") -> list[Explanation]:
        """One entry per trace step of ``record`` (the stages ``item`` visited)."""
        out = []
        for step in record.get("trace") or []:
            sid, label = step["stage"], step["label"]
            cam = self.model(sid)
            if isinstance(cam, str):
                out.append(Explanation(sid, label, False, note=cam))
                continue
            heat = cam.heatmap(item.array(cam.preset), label)
            out.append(Explanation(sid, label, True, self.method, cam.layer_name, self._note(sid, heat), heat,
                                   overlay(item.array(cam.preset), heat)))
        return out

    def preload(self) -> "Explainer":
        """Build every stage's CAM model now, so a bad ``--explain-layer`` fails before any image."""
        for sid in self.router.order:
            self.model(sid)
        return self

    def model(self, sid: str) -> CamModel | str:
        """The stage's CAM model, or the reason it has none."""
        with self._lock:
            if sid not in self._models:
                self._models[sid] = self._load(sid)
            return self._models[sid]

    def _load(self, sid: str) -> CamModel | str:
        from hierarchy.engine.backends.base import Checkpoint
        from hierarchy.engine.backends.torch_backend import build_model
        from hierarchy.engine.predictor import Predictor

        predictor = self.router.stages[sid].predictor
        weights = self.router.pipeline.weights_path(sid)
        if not isinstance(predictor, Predictor) or weights is None:
            return (f"explanation not available: stage '{sid}' uses its plugin's own predictor "
                    f"({type(predictor).__name__}), which has no checkpoint to explain")
        ckpt = Checkpoint.open(weights)
        layer = self.layers.get(sid, self.layers.get(ALL_STAGES))
        try:
            cam = CamModel(build_model(ckpt.meta, ckpt.weights), ckpt.preset, list(predictor.labels), self.method,
                           layer, self.device)
        except HierarchyError as exc:
            if layer:  # a layer the user named is a usage error
                raise
            log.warning("stage %s cannot be explained: %s", sid, exc)
            return f"explanation not available: {exc}"
        log.info("explain %s: %s on %s", sid, self.method, cam.layer_name)
        return cam

    def _note(self, sid: str, heat: np.ndarray) -> str | None:
        notes = []
        engine = getattr(self.router.stages[sid].predictor, "engine", "torch")
        if engine != "torch":
            notes.append(f"the {engine} engine has no gradients: drawn with the torch model of the same weights (fp32)")
        if not heat.any():
            notes.append("the map is empty: no region of the image raised this label's score")
        return "; ".join(notes) or None


def parse_layers(specs: list[str] | None) -> dict[str, str]:
    """``["layer3", "gate=layer4.1"]`` -> ``{"*": "layer3", "gate": "layer4.1"}``."""
    out = {}
    for spec in specs or []:
        sid, sep, name = spec.partition("=")
        out[sid if sep else ALL_STAGES] = name if sep else sid
    return out
