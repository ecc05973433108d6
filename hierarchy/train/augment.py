"""Training-time augmentation of uint8 (3, S, S) images (:class:`hierarchy.config.train.AugmentConfig`).

Every random draw comes from torch's global RNG, which the trainer seeds per epoch, in a fixed
order and only for enabled operations: the default recipe (hflip only) draws exactly one number per
image, as the original recipe did, so its runs are reproduced bit for bit.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

if TYPE_CHECKING:
    from hierarchy.config.train import AugmentConfig

BILINEAR = InterpolationMode.BILINEAR


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(()))


def round_field(x: torch.Tensor, radius: float, edge: float, dark: float = 0.0,
                centre: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    """uint8 (3, H, W) inside a circle of ``radius`` x half the short side (centre offset ``centre`` =
    (dy, dx) in the same unit, soft edge ``edge`` wide), ``dark`` outside it."""
    h, w = x.shape[-2:]
    half = min(h, w) / 2
    yy = (torch.arange(h, dtype=torch.float32) + 0.5 - h / 2) / half - centre[0]
    xx = (torch.arange(w, dtype=torch.float32) + 0.5 - w / 2) / half - centre[1]
    inside = ((radius - torch.hypot(yy[:, None], xx[None, :])) / edge).clamp(0, 1)
    return (x.float() * inside + dark * (1 - inside)).round().to(torch.uint8)


class Augment:
    """Callable uint8 (3, S, S) -> uint8 (3, S, S): geometry first (crop, flips, rotations), then
    the optics (a round field of view), colour, then the camera-like degradations (downscale, JPEG)."""

    def __init__(self, hflip: bool = True, cfg: "AugmentConfig | None" = None):
        self.hflip, self.cfg = hflip, cfg

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        if self.cfg is None or not self.cfg.enabled():
            return x
        return self._degrade(self._colour(self._aperture(self._geometry(x))))

    def _geometry(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if c.crop_scale is not None:
            x = self._crop(x, c.crop_scale, c.crop_ratio)
        if c.vflip and torch.rand(()) < 0.5:
            x = x.flip(-2)
        if c.rot90:
            x = torch.rot90(x, int(torch.randint(4, ())), dims=(-2, -1))
        if c.rotate > 0:  # corners filled with the image's mean colour, not black
            fill = [float(v) for v in x.float().mean(dim=(1, 2))]
            x = F.rotate(x, _uniform(-c.rotate, c.rotate), interpolation=BILINEAR, fill=fill)
        return x

    @staticmethod
    def _crop(x: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float]) -> torch.Tensor:
        """torchvision's RandomResizedCrop sampling (10 tries, then the whole image), resized back to S."""
        h, w = x.shape[-2:]
        log_r = (math.log(ratio[0]), math.log(ratio[1]))
        for _ in range(10):
            area = h * w * _uniform(*scale)
            r = math.exp(_uniform(*log_r))
            cw, ch = int(round(math.sqrt(area * r))), int(round(math.sqrt(area / r)))
            if 0 < cw <= w and 0 < ch <= h:
                top, left = int(torch.randint(h - ch + 1, ())), int(torch.randint(w - cw + 1, ()))
                return F.resized_crop(x, top, left, ch, cw, [h, w], interpolation=BILINEAR, antialias=True)
        return x

    def _aperture(self, x: torch.Tensor) -> torch.Tensor:
        """What many dermatoscopes record: the image inside a circle (radius, centre, edge width and
        the dark level outside drawn per image), near-black outside it."""
        c = self.cfg
        if c.aperture <= 0 or torch.rand(()) >= c.aperture:
            return x
        radius, edge, dark = _uniform(*c.aperture_radius), _uniform(0.01, 0.08), _uniform(0, 24)
        centre = (_uniform(-0.05, 0.05), _uniform(-0.05, 0.05))
        return round_field(x, radius, edge, dark, centre)

    def _colour(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if c.color_jitter > 0 and torch.rand(()) < c.p:
            j = c.color_jitter
            x = F.adjust_brightness(x, _uniform(1 - j, 1 + j))
            x = F.adjust_contrast(x, _uniform(1 - j, 1 + j))
            x = F.adjust_saturation(x, _uniform(1 - j, 1 + j))
        if c.hue > 0 and torch.rand(()) < c.p:
            x = F.adjust_hue(x, _uniform(-c.hue, c.hue))
        return x

    def _degrade(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if c.downscale is not None and torch.rand(()) < c.p:
            h, w = x.shape[-2:]
            f = _uniform(*c.downscale)
            small = [max(4, int(h * f)), max(4, int(w * f))]
            x = F.resize(F.resize(x, small, interpolation=BILINEAR, antialias=True), [h, w], interpolation=BILINEAR)
        if c.jpeg_quality is not None and torch.rand(()) < c.p:
            x = F.jpeg(x.contiguous(), int(torch.randint(c.jpeg_quality[0], c.jpeg_quality[1] + 1, ())))
        return x
