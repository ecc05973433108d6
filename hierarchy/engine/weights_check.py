"""Static checks of a pipeline's ``weights:``: read ``metadata.json`` (a few hundred bytes), load no weights.

For every stage served by the engine's shared predictor (one that does not override
``Stage.load_predictor``): ``weights:`` is set, resolves to a run directory or ``.safetensors`` file
with ``metadata.json`` beside it, the metadata's schema is supported, and it names this stage with
this stage's labels in this order. ``hierarchy validate`` reports these with every other config
error; ``run``, ``evaluate`` and the rest load the pipeline the same way, so they fail before any
image is read.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from hierarchy.core.errors import CheckpointError
from hierarchy.core.yamlio import Loc, with_line

if TYPE_CHECKING:
    from hierarchy.config.stage import Stage
    from hierarchy.engine.pipeline import Pipeline


def uses_shared_predictor(stage_cls: "type[Stage]") -> bool:
    from hierarchy.config.stage import Stage

    return stage_cls.load_predictor is Stage.load_predictor


def weights_errors(pipe: "Pipeline", sid: str, stage_cls: "type[Stage]", lines: dict[Loc, int]) -> list[str]:
    """The problems of stage ``sid``'s ``weights:`` as 'stages.SID.weights: message (line N)'."""
    from hierarchy.models.metadata import check_stage, read_metadata, resolve_checkpoint

    if not uses_shared_predictor(stage_cls):
        return []  # the stage loads its own predictor; only it knows what `weights:` means
    loc = ("stages", sid)
    if pipe.stages[sid].weights is None:
        return [with_line(loc, f"no `weights:`; stage '{stage_cls.name}' needs a trained run directory or "
                          f"best.safetensors (`hierarchy train {stage_cls.name}` writes runs/{stage_cls.name}/NAME/)",
                          lines)]
    path = pipe.weights_path(sid)
    try:
        _, meta_path = resolve_checkpoint(path)
        check_stage(read_metadata(meta_path), stage_cls.name, stage_cls.labels, meta_path)
    except CheckpointError as exc:
        return [with_line(loc + ("weights",), str(exc).replace("\n", " "), lines)]
    return []
