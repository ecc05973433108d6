"""benign_vs_malignant: is a HAM10000 skin lesion malignant?

malignant = mel (melanoma), bcc (basal cell carcinoma), akiec (actinic keratosis / Bowen's
disease); benign = nv, bkl, df, vasc. The engine's shared builder splits by ``lesion_id``, so no
lesion has images in two splits; training, prediction and preprocessing are the engine's too.
"""
from __future__ import annotations

from typing import Callable

from hierarchy import Ham10000Source, Stage, hookimpl

HIERARCHY_PLUGIN_API = 1

MALIGNANT_DX = ("akiec", "bcc", "mel")
BENIGN_DX = ("bkl", "df", "nv", "vasc")
LABEL_MAP = {**{dx: "malignant" for dx in MALIGNANT_DX}, **{dx: "benign" for dx in BENIGN_DX}}


class BenignVsMalignant(Stage):
    name = "benign_vs_malignant"
    labels = ("benign", "malignant")
    description = "HAM10000 lesion: benign (nv, bkl, df, vasc) or malignant (mel, bcc, akiec)."
    sources = (Ham10000Source(label_map=LABEL_MAP),)  # every dx -> benign or malignant


@hookimpl
def register_stages(register: Callable[[type[Stage]], None]) -> None:
    register(BenignVsMalignant)
