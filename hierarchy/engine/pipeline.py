"""Pipeline config: a YAML file naming stages, their weights, thresholds and label routes.

Everything here is checked statically, before any weights load: schema (pydantic, extra keys
forbidden), registered stage names, route targets and labels, label coverage, cycles, reachability.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError

from hierarchy.core.errors import ConfigError
from hierarchy.core.phases import phase
from hierarchy.core.yamlio import Loc, load_yaml, parse_yaml, pydantic_errors, with_line

STOP = "stop"
DEFAULT_ROUTE = "default"
DECIDE_RULE = ("an image over its stage's OOD threshold is rejected first; then, among the labels whose "
               "probability reaches their `decide:` threshold, the one with the highest probability wins "
               "(equal probabilities: the label listed first in the stage's labels) and is accepted whatever "
               "`threshold:` says; when no label reaches its threshold, the top-1 label is taken and "
               "`threshold:` still abstains below it")
Threshold = Union[StrictFloat, StrictInt, Literal["auto"]]


class StageNode(BaseModel):
    """One node of the cascade: which stage plugin, which weights, when to abstain, where to go next."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    stage: StrictStr  # a registered stage name (`hierarchy stages`)
    weights: Optional[StrictStr] = None  # checkpoint file or run directory; relative to the YAML file
    threshold: Optional[Threshold] = None  # top-1 probability below this -> abstain; auto = stored value
    ood: Union[Literal["auto", "off"], StrictFloat, StrictInt] = "auto"  # out-of-distribution reject
    # cost-sensitive decisions: label -> probability from which that label wins ahead of argmax
    # (auto = the thresholds `hierarchy calibrate --target-recall` stored); see DECIDE_RULE
    decide: Union[Literal["auto"], dict[StrictStr, Union[StrictFloat, StrictInt]]] = Field(default_factory=dict)
    routes: dict[StrictStr, StrictStr] = Field(default_factory=dict)  # label (or default) -> stage id | stop


class Pipeline(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)

    name: StrictStr  # names the run and the evaluation output folder
    description: Optional[StrictStr] = None
    root: StrictStr  # the stage id every image starts at
    stages: dict[StrictStr, StageNode] = Field(min_length=1)  # stage id -> node
    base_dir: Path = Field(default=Path("."), exclude=True)  # directory of the YAML file

    def route(self, stage_id: str, label: str) -> str:
        routes = self.stages[stage_id].routes
        return routes.get(label, routes.get(DEFAULT_ROUTE, STOP))

    def weights_path(self, stage_id: str) -> Path | None:
        """Resolve ``weights`` against the pipeline file's directory, then the working directory."""
        raw = self.stages[stage_id].weights
        if raw is None:
            return None
        p = Path(os.path.expanduser(raw))
        if p.is_absolute():
            return p
        beside = self.base_dir / p
        return beside if beside.exists() or not p.exists() else p

    def reachable(self) -> list[str]:
        """Stage ids reachable from the root, breadth first."""
        reach, queue = [], [self.root]
        while queue:
            sid = queue.pop(0)
            if sid not in reach and sid in self.stages:
                reach.append(sid)
                queue.extend(t for t in self.stages[sid].routes.values() if t != STOP)
        return reach

    def depth_order(self) -> list[str]:
        """Reachable stage ids, each after every stage that routes to it (topological)."""
        reach = self.reachable()
        indeg = {s: 0 for s in reach}
        for s in reach:
            for t in set(self.stages[s].routes.values()) - {STOP}:
                indeg[t] = indeg.get(t, 0) + 1
        order, ready = [], [s for s in reach if indeg[s] == 0]
        while ready:
            s = ready.pop(0)
            order.append(s)
            for t in dict.fromkeys(self.stages[s].routes.values()):
                if t in indeg and t != STOP:
                    indeg[t] -= 1
                    if indeg[t] == 0:
                        ready.append(t)
        return order or reach  # a cycle (rejected by static checks) leaves order empty


def load_pipeline(path: str | os.PathLike, *, check_stages: bool = True) -> Pipeline:
    """Read, validate and statically check a pipeline YAML file, or a bundle (``hierarchy bundle``: its
    hashes verified, extracted into a temporary directory). Raises ConfigError with every problem."""
    from hierarchy.engine.bundle import is_bundle, open_bundle

    if Path(path).is_file() and is_bundle(path):
        path = open_bundle(path)
    with phase("read YAML"):
        data, lines = load_yaml(path)
    return _build(data, lines, str(path), Path(path).resolve().parent, check_stages)


def parse_pipeline(text: str, *, base_dir: Path = Path("."), check_stages: bool = True) -> Pipeline:
    data, lines = parse_yaml(text)
    return _build(data, lines, "<string>", base_dir, check_stages)


def _build(data: Any, lines: dict[Loc, int], source: str, base_dir: Path, check_stages: bool) -> Pipeline:
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): expected a mapping with name, root and stages"])
    try:
        with phase("validate schema (pydantic)"):
            pipe = Pipeline.model_validate({**data, "base_dir": base_dir}) if "base_dir" not in data else None
    except ValidationError as exc:
        raise ConfigError(source, pydantic_errors(exc, lines)) from None
    if pipe is None:
        raise ConfigError(source, [with_line(("base_dir",), "extra field not permitted", lines)])
    with phase("static checks"):
        errors = static_errors(pipe, lines, check_stages=check_stages)
    if errors:
        raise ConfigError(source, errors)
    return pipe


def static_errors(pipe: Pipeline, lines: dict[Loc, int] | None = None, *, check_stages: bool = True) -> list[str]:
    """Every static problem of a schema-valid pipeline, as 'yaml.path: message (line N)'."""
    lines = lines or {}
    errors: list[str] = []
    if pipe.root not in pipe.stages:
        errors.append(with_line(("root",), f"'{pipe.root}' is not a stage id (stages: {', '.join(pipe.stages)})", lines))
    for sid, node in pipe.stages.items():
        errors += _node_errors(sid, node, pipe, lines, check_stages)
    if check_stages and any("Unknown stage" in e for e in errors):
        from hierarchy.registry import get_registry

        errors += [f"(plugins) {f}" for f in get_registry().failures]
    cycle = find_cycle(pipe)
    if cycle:
        errors.append(with_line(("stages", cycle[0], "routes"), "routes form a cycle: " + " -> ".join(cycle), lines))
    if pipe.root in pipe.stages:
        reachable = set(pipe.reachable())
        for sid in pipe.stages:
            if sid not in reachable:
                errors.append(with_line(("stages", sid), f"stage '{sid}' is not reachable from root '{pipe.root}'", lines))
    return errors


def _node_errors(sid: str, node: StageNode, pipe: Pipeline, lines: dict[Loc, int], check_stages: bool) -> list[str]:
    errors = []
    loc = ("stages", sid)
    if isinstance(node.threshold, (int, float)) and not 0.0 <= node.threshold <= 1.0:
        errors.append(with_line(loc + ("threshold",), f"must be between 0 and 1 or 'auto' (got {node.threshold})", lines))
    if isinstance(node.decide, dict):
        for label, value in node.decide.items():
            if not 0.0 <= value <= 1.0:
                errors.append(with_line(loc + ("decide", label), f"must be between 0 and 1 (got {value})", lines))
    for label, target in node.routes.items():
        if target != STOP and target not in pipe.stages:
            errors.append(with_line(loc + ("routes", label), f"route target '{target}' is not a stage id "
                                    f"(stages: {', '.join(pipe.stages)}; or '{STOP}')", lines))
    if not check_stages:
        return errors
    from hierarchy.registry import get_registry

    from hierarchy.core.errors import HierarchyError, UnknownStageError

    with phase("plugin discovery"):
        reg = get_registry()
    try:
        labels = reg.get(node.stage).labels
    except UnknownStageError:
        return errors + [with_line(loc + ("stage",), reg.unknown_message(node.stage, with_failures=False), lines)]
    except HierarchyError as exc:
        return errors + [with_line(loc + ("stage",), str(exc), lines)]
    for label in node.routes:
        if label != DEFAULT_ROUTE and label not in labels:
            errors.append(with_line(loc + ("routes", label), f"'{label}' is not a label of stage "
                                    f"'{node.stage}' (labels: {', '.join(labels)})", lines))
    for label in node.decide if isinstance(node.decide, dict) else ():
        if label not in labels:
            errors.append(with_line(loc + ("decide", label), f"'{label}' is not a label of stage "
                                    f"'{node.stage}' (labels: {', '.join(labels)})", lines))
    from hierarchy.engine.weights_check import weights_errors

    with phase("weights check (metadata.json)"):
        errors += weights_errors(pipe, sid, reg.get(node.stage), lines)
    uncovered = [lab for lab in labels if lab not in node.routes]
    if uncovered and DEFAULT_ROUTE not in node.routes:
        errors.append(with_line(loc + ("routes",), f"no route for label(s) {', '.join(uncovered)}; "
                                f"add them or a '{DEFAULT_ROUTE}: stop' route", lines))
    return errors


def find_cycle(pipe: Pipeline) -> list[str] | None:
    """Return one cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on stack, 2 = done
    stack: list[str] = []

    def visit(sid: str) -> list[str] | None:
        state[sid] = 1
        stack.append(sid)
        for target in dict.fromkeys(pipe.stages[sid].routes.values()):
            if target == STOP or target not in pipe.stages:
                continue
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[sid] = 2
        return None

    for sid in pipe.stages:
        if sid not in state and (found := visit(sid)):
            return found
    return None
