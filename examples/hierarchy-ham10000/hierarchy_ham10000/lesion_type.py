"""lesion_type: which of the 7 HAM10000 diagnoses (``dx``) a skin lesion shows.

Trained on all 7 classes, although a cascade only sends it lesions the previous stage called
malignant: a mistaken "malignant" can then still come out as e.g. ``nv`` instead of being forced
into a malignant class. The shared builder splits by ``lesion_id``; training, prediction and
preprocessing are the engine's.
"""
from __future__ import annotations

from typing import Callable

from hierarchy import Ham10000Source, Stage, hookimpl

HIERARCHY_PLUGIN_API = 1

DX_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


class LesionType(Stage):
    name = "lesion_type"
    labels = DX_CLASSES
    description = "HAM10000 diagnosis: akiec, bcc, bkl, df, mel, nv or vasc."
    sources = (Ham10000Source(label_map={dx: dx for dx in DX_CLASSES}),)  # each dx is its own label


@hookimpl
def register_stages(register: Callable[[type[Stage]], None]) -> None:
    register(LesionType)
