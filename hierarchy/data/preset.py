"""The one shared preprocessing preset used by training, validation and inference of every stage.

Images are resized (squashed, as the original recipe's ``Resize((S, S))``) to uint8 on the CPU, and
normalised in float on the model's device, so only uint8 crosses threads and the host-device link.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preset:
    size: int = 224
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)
    resize: str = "squash"  # squash to size x size, bilinear with antialiasing (PIL)

    def to_array(self, img: "Image.Image") -> "np.ndarray":
        """RGB PIL image -> (3, size, size) uint8 numpy array (a channels-first view of an owned copy)."""
        import numpy as np
        from PIL import Image

        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8).copy().transpose(2, 0, 1)

    def to_uint8(self, img: "Image.Image") -> "torch.Tensor":
        """RGB PIL image -> (3, size, size) uint8 tensor (shares memory with :meth:`to_array`)."""
        import torch

        return torch.from_numpy(self.to_array(img))

    def normalize_array(self, batch: "np.ndarray") -> "np.ndarray":
        """(N, 3, S, S) uint8 -> float32 ImageNet-normalised numpy, the same float32 steps as
        :meth:`normalize` (divide by 255, subtract the mean, divide by the std)."""
        import numpy as np

        x = batch.astype(np.float32)
        x /= np.float32(255.0)
        x -= np.asarray(self.mean, dtype=np.float32).reshape(1, 3, 1, 1)
        x /= np.asarray(self.std, dtype=np.float32).reshape(1, 3, 1, 1)
        return x

    def normalize(self, batch: "torch.Tensor", dtype: "torch.dtype | None" = None) -> "torch.Tensor":
        """(N, 3, S, S) uint8 -> float, ImageNet-normalised, on the batch's device."""
        import torch

        x = batch.to(torch.float32).div_(255.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        x = x.sub_(mean).div_(std)
        return x if dtype is None else x.to(dtype)

    def reference(self, img: "Image.Image") -> "torch.Tensor":
        """The seed-style torchvision pipeline (Resize, ToTensor, Normalize): the accuracy reference."""
        from torchvision import transforms

        tf = transforms.Compose(
            [transforms.Resize((self.size, self.size)), transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]
        )
        return tf(img)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preset":
        return cls(size=int(d["size"]), mean=tuple(d["mean"]), std=tuple(d["std"]), resize=d.get("resize", "squash"))
