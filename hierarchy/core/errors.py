"""Typed errors. Every error names the file, YAML key or stage it is about."""
from __future__ import annotations


class HierarchyError(Exception):
    """Base class for all errors raised by hierarchy."""

    exit_code = 1


class ConfigError(HierarchyError):
    """A YAML/CLI configuration is invalid. ``errors`` holds every problem found, not just the first."""

    exit_code = 2

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = list(errors)
        super().__init__(f"{source}: invalid configuration\n" + "\n".join(f"  {e}" for e in self.errors))


class UnknownStageError(HierarchyError, KeyError):
    """A stage name was looked up that no plugin registered."""

    exit_code = 2

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class PluginError(HierarchyError):
    """A plugin failed to import, raised in a hook or registered an invalid stage, or two plugins
    register one stage name. A configuration problem: exit 2."""

    exit_code = 2


class ImageError(HierarchyError):
    """An input image could not be used. ``type`` is a stable machine-readable code:
    unreadable, undecodable, truncated, too_large, unsupported_format, not_a_file, not_found, empty."""

    def __init__(self, type: str, path: object, message: str):
        self.type = type
        self.path = path
        self.message = message
        super().__init__(f"{path}: {type}: {message}")


class CheckpointError(HierarchyError):
    """A checkpoint or its metadata is missing, unsafe, corrupt or does not match the stage: the
    pipeline or command points at the wrong file, a configuration problem (exit 2)."""

    exit_code = 2

    def __init__(self, path: object, message: str):
        self.path = path
        super().__init__(f"{path}: {message}")


class ExportError(CheckpointError):
    """An exported model (``best.onnx``) is missing, stale (its weights changed since the export), does
    not match ``metadata.json``, or failed the export-time check against the torch model."""


class EngineError(HierarchyError):
    """An inference engine cannot be used here: its package is not installed, or it cannot serve the
    requested device. The message says what to install or which option to change."""


class DatasetError(HierarchyError):
    """A dataset (manifest, ImageFolder tree or source) cannot be used."""


class LabelMismatchError(DatasetError):
    """Labelled evaluation data whose labels the pipeline's stages do not have (exit 2, a usage error)."""

    exit_code = 2


class PretrainedWeightsError(CheckpointError):
    """Pretrained backbone weights (``--pretrained imagenet`` or a local file) could not be obtained.
    The message names the file looked for and, for downloads, the URL or hub repo."""

    def __init__(self, path: object, message: str, url: str | None = None):
        self.url = url
        super().__init__(path, message)


class UnknownBackboneError(HierarchyError, ValueError):
    """A backbone name matches no torchvision or timm model."""

    exit_code = 2


class BundleError(HierarchyError):
    """A pipeline bundle (``.hbundle``) is unreadable or was tampered with. ``member`` names the zip
    member at fault (``(all members)`` for the whole archive)."""

    def __init__(self, member: str, message: str):
        self.member = member
        super().__init__(f"bundle member {member!r}: {message}")


class OutputError(HierarchyError):
    """``-o FILE`` cannot be written: a directory, a missing folder, no permission, a full disk.
    Records streamed before the fault are kept (jsonl); an atomic format leaves no partial file."""

    exit_code = 4

    def __init__(self, path: object, message: str):
        self.path = path
        super().__init__(f"{path}: {message}")
