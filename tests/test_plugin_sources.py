"""Source types from plugins (the ``register_sources`` hook), the stage face without a Config
subclass, and the lazy ``import hierarchy`` surface plugin authors use."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
from plugin_dist import hierarchy_cli, install_dist

from hierarchy import FolderSource, Source, Stage, StageConfig, hookimpl
from hierarchy.data.sources import Item, Problems

LABELS = ("cat", "dog")


class ListSource(Source):
    """``<root>/<listing>``: a CSV of ``path,label`` rows, paths relative to root."""

    type: Literal["csvlist"] = "csvlist"
    root: Path = Path("data/pets")
    listing: str = "list.csv"

    def collect(self, root: Path, problems: Problems, *, exclude: Path | None = None) -> list[Item]:
        with open(root / self.listing, newline="") as f:
            rows = list(csv.DictReader(f))
        items = []
        for row in rows:
            path = os.path.abspath(root / row["path"])
            if not os.path.isfile(path):
                problems.add("missing_files", source=self.key, path=path)
                continue
            items.append(Item(path=path, label=row["label"], source=self.key, group=row["path"]))
        return items


class Pets(Stage):
    name = "pets"
    labels = LABELS
    sources = (ListSource(),)


class PetsPlugin:
    @hookimpl
    def register_sources(self, register):
        register(ListSource)

    @hookimpl
    def register_stages(self, register):
        register(Pets)


def sources_plugin(*classes: object) -> object:
    class Plugin:
        @hookimpl
        def register_sources(self, register):
            for cls in classes:
                register(cls)

    return Plugin()


@pytest.fixture
def pets(no_autoload):
    from hierarchy.registry import get_registry, register_plugin

    register_plugin(PetsPlugin(), name="pets")
    assert get_registry().failures == []
    return get_registry()


def listed_pets(root: Path, n: int = 6) -> Path:
    """``root/<label>/*.jpg`` plus ``root/list.csv`` naming each file and one file that is missing."""
    from hierarchy.data.synth import make_image_folder

    make_image_folder(root, LABELS, n_per_label=n, size=(16, 16))
    with open(root / "list.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        for path in sorted(root.rglob("*.jpg")):
            writer.writerow([path.relative_to(root).as_posix(), path.parent.name])
        writer.writerow(["cat/gone.jpg", "cat"])
    return root


def test_a_plugin_source_builds_from_python(pets, tmp_path):
    from hierarchy.data.builder import build_dataset

    stage = Pets()
    assert [s.type for s in stage.config.dataset.sources] == ["csvlist"]
    info = build_dataset(stage.config.dataset, tmp_path / "ds", labels=stage.labels, stage=stage.name,
                         roots={"csvlist": listed_pets(tmp_path / "pets")}, progress=False)
    assert info["num_items"] == 12 and info["counts"]["by_source"]["csvlist"]["cat"]["train"] > 0
    assert info["problems"]["missing_files"]["count"] == 1
    assert info["config"]["sources"][0] == {"type": "csvlist", "name": None, "root": str(tmp_path / "pets"),
                                            "max_images": None, "listing": "list.csv"}


def test_a_plugin_source_builds_from_yaml_through_the_cli(pets, tmp_path, capsys):
    from hierarchy.commands.cli import main
    from hierarchy.data.labelled import read_manifest

    root = listed_pets(tmp_path / "pets")
    (root / "list.csv").rename(root / "pets.csv")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"dataset:\n  sources:\n    - {{type: csvlist, name: mine, root: '{root}', listing: pets.csv}}\n")
    assert main(["build-dataset", "pets", "--config", str(cfg), "--out", str(tmp_path / "ds")]) == 0
    assert {s.source for s in read_manifest(tmp_path / "ds")} == {"mine"}
    assert json.loads(capsys.readouterr().out)["counts"]["total"] == 12


def test_unknown_or_missing_source_type_names_the_key_and_the_known_types(pets, tmp_path, capsys):
    from hierarchy.commands.cli import main

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("dataset:\n  sources:\n    - {type: csvlist}\n    - {type: dicom, root: x}\n    - {root: y}\n")
    assert main(["build-dataset", "pets", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "dataset.sources.1.type: unknown source type 'dicom'; known types: coco, csvlist, folder, ham10000, outliers" in err
    assert "dataset.sources.2.type: field required: the source type, one of coco, csvlist, folder, ham10000, outliers" in err
    assert str(cfg) in err and "dataset.sources.0" not in err


def test_source_fields_are_checked_by_their_own_model(pets, tmp_path, capsys):
    from hierarchy.commands.cli import main

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("dataset:\n  sources:\n    - type: csvlist\n      listng: x.csv\n")
    assert main(["build-dataset", "pets", "--config", str(cfg)]) == 2
    assert "dataset.sources.0.listng: extra field not permitted (line 4)" in capsys.readouterr().err


def test_reset_forgets_plugin_source_types(pets):
    from hierarchy.data.sources import source_types
    from hierarchy.registry import reset_registry

    assert "csvlist" in source_types()
    reset_registry()
    assert set(source_types()) == {"coco", "folder", "ham10000", "outliers"}
    with pytest.raises(ValueError, match="ListSource \\(type 'csvlist'\\) is not a registered source type"):
        Pets.Config()


class NoDefault(Source):
    type: Literal["nodefault"]

    def collect(self, root, problems, *, exclude=None):
        return []


class NoReader(Source):
    type: Literal["noreader"] = "noreader"


class Coco2(ListSource):
    type: Literal["coco"] = "coco"


@pytest.mark.parametrize("cls, phase, message", [
    (dict, "register", "not a hierarchy.Source subclass"),
    (NoDefault, "register", "NoDefault.type must be a one-value Literal with that value as its default"),
    (NoReader, "register", "source type 'noreader': NoReader does not implement collect"),
    (Coco2, "conflict", "source type 'coco' is already registered by hierarchy.data.sources.coco.CocoSource"),
])
def test_a_broken_source_registration_is_a_named_failure(no_autoload, cls, phase, message):
    from hierarchy.data.sources import CocoSource, source_types
    from hierarchy.registry import get_registry, register_plugin

    register_plugin(sources_plugin(cls), name="broken")
    [failure] = get_registry().failures
    assert (failure.plugin.name, failure.phase) == ("broken", phase) and message in failure.error
    assert source_types()["coco"] is CocoSource and set(source_types()) == {"coco", "folder", "ham10000", "outliers"}


def test_a_source_type_two_plugins_register_is_used_by_neither(no_autoload):
    from hierarchy.data.sources import source_types
    from hierarchy.registry import get_registry, register_plugin

    class OtherList(ListSource):
        pass

    register_plugin(sources_plugin(ListSource), name="one")
    register_plugin(sources_plugin(OtherList), name="two")
    [failure] = get_registry().failures
    assert failure.phase == "conflict"
    assert "source type 'csvlist' is registered by plugin 'one'" in failure.error and "'two'" in failure.error
    assert "csvlist" not in source_types() and get_registry().sources == {}


def test_a_stage_whose_source_type_is_not_registered_is_refused(no_autoload):
    from hierarchy.core.errors import UnknownStageError
    from hierarchy.registry import get_registry, get_stage, register_plugin

    class StagesOnly:
        @hookimpl
        def register_stages(self, register):
            register(Pets)

    register_plugin(StagesOnly(), name="pets")
    [failure] = get_registry().failures
    assert failure.phase == "register"
    assert failure.error == ("stage 'pets': its default config is invalid: DatasetConfig.sources.0: ListSource "
                             "(type 'csvlist') is not a registered source type; known types: coco, folder, ham10000, outliers")
    with pytest.raises(UnknownStageError, match="its default config is invalid"):
        get_stage("pets")


def test_an_unregistered_source_instance_is_refused(no_autoload):
    from pydantic import ValidationError

    from hierarchy import DatasetConfig

    with pytest.raises(ValidationError, match="ListSource \\(type 'csvlist'\\) is not a registered source type"):
        DatasetConfig(sources=[ListSource()])


SOURCE_PLUGIN = '''
import csv, os
from pathlib import Path
from typing import Literal

from hierarchy import Source, hookimpl
from hierarchy.data.sources import Item

HIERARCHY_PLUGIN_API = 1


class ListSource(Source):
    type: Literal["csvlist"] = "csvlist"
    root: Path = Path("data/pets")

    def collect(self, root, problems, *, exclude=None):
        with open(root / "list.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if os.path.isfile(root / r["path"])]
        return [Item(path=os.path.abspath(root / r["path"]), label=r["label"], source=self.key, group=r["path"])
                for r in rows]


@hookimpl
def register_sources(register):
    register(ListSource)
'''

STAGE_PLUGIN = '''
from hierarchy import Stage, hookimpl
from petsources.b_sources import ListSource

HIERARCHY_PLUGIN_API = 1


class Pets(Stage):
    name = "pets"
    labels = ("cat", "dog")
    sources = (ListSource(),)


@hookimpl
def register_stages(register):
    register(Pets)
'''


def test_installed_plugins_source_serves_another_plugins_stage(tmp_path):
    """Entry point a_stage (alphabetically first) uses the source type entry point b_sources registers."""
    site = tmp_path / "site"
    install_dist(tmp_path, site, "hierarchy-pets", "0.1.0", "petsources",
                 {"a_stage": STAGE_PLUGIN, "b_sources": SOURCE_PLUGIN},
                 {"a_stage": "petsources.a_stage", "b_sources": "petsources.b_sources"})
    out = tmp_path / "ds"
    proc = hierarchy_cli(["build-dataset", "pets", "--source", f"csvlist={listed_pets(tmp_path / 'pets')}",
                          "--out", str(out)], site=site)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["counts"]["total"] == 12
    assert json.loads((out / "dataset.json").read_text())["sources"]["csvlist"]["type"] == "csvlist"


# ------------------------------------------------------------------ the stage face


def test_sources_need_no_config_subclass_and_type_no_repeating():
    class Wounds(Stage):
        name = "wounds"
        labels = ("burn", "cut")
        sources = (FolderSource(root="data/wounds"),)

    first, second = Wounds.Config(), Wounds().config
    assert issubclass(Wounds.Config, StageConfig) and first == second
    assert first.dataset.sources[0].type == "folder" and str(first.dataset.sources[0].root) == "data/wounds"
    first.dataset.sources[0].label = "burn"  # each config gets its own copy of the sources
    assert Wounds.Config().dataset.sources[0].label is None
    assert Wounds.Config(train={"epochs": 3}).dataset.sources == second.dataset.sources


def test_a_derived_config_pickles_and_round_trips_through_yaml_text(tmp_path):
    import pickle

    import yaml

    from hierarchy.config.load import dump_stage_config, load_stage_config
    from hierarchy.stages.skin_vs_nonskin.plugin import SkinVsNonskin

    config = SkinVsNonskin.Config(train={"epochs": 2})
    assert SkinVsNonskin.Config.__qualname__ == "SkinVsNonskin.Config"
    assert pickle.loads(pickle.dumps(config)) == config
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(dump_stage_config(config, SkinVsNonskin.name)))
    assert load_stage_config(SkinVsNonskin, tmp_path / "c.yaml") == config


def test_a_config_subclass_with_sources_keeps_its_fields():
    from hierarchy import DatasetConfig

    class WoundConfig(StageConfig):
        dataset: DatasetConfig = DatasetConfig(seed=7)
        margin: float = 0.5

    class Wounds(Stage):
        name = "wounds"
        labels = ("burn", "cut")
        sources = (FolderSource(root="data/wounds"),)
        Config = WoundConfig

    class Stricter(Wounds):
        Config = WoundConfig

    for cls in (Wounds, Stricter):
        config = cls.Config()
        assert isinstance(config, WoundConfig) and config.margin == 0.5
        assert config.dataset.seed == 7 and [s.type for s in config.dataset.sources] == ["folder"]


def test_import_hierarchy_is_lazy_and_exposes_the_plugin_api():
    code = ("import sys, hierarchy; loaded = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('hierarchy', 'registry', 'pydantic', 'pluggy', 'numpy')); print(loaded); "
            "from hierarchy import *; import hierarchy.stage as old; from hierarchy.registry import hookimpl as h; "
            "print(Stage is old.Stage, hookimpl is h, 'Stage' in dir(hierarchy))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.splitlines() == ["['hierarchy']", "True True True"]
    import hierarchy

    assert set(hierarchy.__all__) >= {"Stage", "StageConfig", "DatasetConfig", "TrainConfig", "Source",
                                      "Ham10000Source", "CocoSource", "FolderSource", "Prediction", "hookimpl",
                                      "__version__"}
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        hierarchy.Nope  # noqa: B018
