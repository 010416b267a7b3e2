"""The node's rule file (TOML): who may send, the node's limits, which series to process, how, and where results go.

::

    [node]
    allowed_callers = ["ORTHANC"]      # calling AE titles accepted at association ("*": any)
    stable_seconds = 30                # a series is complete when no instance arrived for this long

    [destinations.pacs]                # C-STORE back into the PACS
    host = "10.0.0.5"
    port = 4242
    ae_title = "ORTHANC"

    [[rule]]
    name = "chest"
    min_thickness_mm = 2.5
    series_description = "(?i)chest|thorax"
    spacing = 1.25
    method = "planes"
    send_to = ["pacs"]

The first rule that matches a series decides; a series no rule matches is skipped with the reason recorded. Scouts,
localizers, dose screens and secondary captures never match, whatever the rules say: they are no slice stack.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thinslice.errors import ThinsliceError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# Series descriptions that are never a thin-able slice stack, whatever a rule's own patterns say.
NEVER = re.compile(r"(?i)scout|localizer|localiser|topogram|surview|scanogram|dose|screen ?save|patient protocol")
# SOP classes of screens (dose reports, exam summaries) and structured reports: never volumes.
SCREEN_SOP_PREFIXES = ("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88")
NODE_KEYS = {"allowed_callers", "max_associations", "max_dataset_mb", "max_spool_gb", "min_free_gb",
             "stable_seconds", "max_attempts", "backoff_seconds", "max_backoff_seconds", "workers"}
INTEGER_KEYS = ("max_associations", "max_attempts", "workers")
RULE_KEYS = {"name", "modality", "min_thickness_mm", "max_thickness_mm", "series_description", "body_part",
             "exclude", "spacing", "method", "uncertainty", "options", "send_to"}
DEST_KEYS = {"host", "port", "ae_title", "folder", "associations"}


@dataclass(frozen=True)
class NodeLimits:
    """Who may associate and how much the node takes in before it refuses (with a DICOM status that says why)."""

    allowed_callers: tuple[str, ...] = ()
    max_associations: int = 8
    max_dataset_mb: float = 256.0
    max_spool_gb: float = 50.0
    min_free_gb: float = 1.0
    stable_seconds: float = 30.0
    max_attempts: int = 3
    backoff_seconds: float = 30.0
    max_backoff_seconds: float = 900.0
    workers: int = 2  # series processed or sent at once

    def allows_any(self) -> bool:
        return "*" in self.allowed_callers


@dataclass(frozen=True)
class Destination:
    """Where a derived series goes: a DICOM peer (C-STORE) and/or a folder (one subfolder per derived series)."""

    name: str
    host: str = ""
    port: int = 0
    ae_title: str = ""
    folder: str = ""
    associations: int = 2  # C-STOREs in parallel, one association each

    @property
    def is_dicom(self) -> bool:
        return bool(self.host)


@dataclass(frozen=True)
class Rule:
    """Which series (modality, thickness, description and body-part patterns) and how to process them."""

    name: str
    spacing: float
    method: str = "planes"
    modality: tuple[str, ...] = ("CT",)
    min_thickness_mm: float = 0.0
    max_thickness_mm: float = 1e9
    series_description: str = ""
    body_part: str = ""
    exclude: str = ""
    uncertainty: bool = False
    options: tuple[tuple[str, object], ...] = ()
    send_to: tuple[str, ...] = ()

    def refusal(self, header: dict[str, str]) -> str:
        """Why this rule does not take the series ('' when it does)."""
        modality = header.get("Modality", "")
        if modality.upper() not in {m.upper() for m in self.modality}:
            return f"modality {modality or '?'} is not {'/'.join(self.modality)}"
        thickness = _number(header.get("SliceThickness", ""))
        if thickness is None:
            return "no SliceThickness"
        if not self.min_thickness_mm <= thickness <= self.max_thickness_mm:
            return f"slice thickness {thickness:g} mm outside {self.min_thickness_mm:g}-{self.max_thickness_mm:g} mm"
        description = header.get("SeriesDescription", "")
        if self.series_description and not re.search(self.series_description, description):
            return "series description does not match"
        if self.body_part and not re.search(self.body_part, header.get("BodyPartExamined", "")):
            return "body part does not match"
        if self.exclude and re.search(self.exclude, description):
            return "series description excluded"
        return ""

    def method_options(self) -> tuple[tuple[str, object], ...]:
        """The options handed to the per-case function (as a cohort's: name, value), uncertainty included."""
        return (*self.options, ("uncertainty", True)) if self.uncertainty else self.options


@dataclass(frozen=True)
class Rules:
    """The parsed rule file."""

    limits: NodeLimits = field(default_factory=NodeLimits)
    rules: tuple[Rule, ...] = ()
    destinations: dict[str, Destination] = field(default_factory=dict)
    source: str = ""

    def decide(self, header: dict[str, str], instances: int) -> tuple[Rule | None, str]:
        """The first rule that takes the series, or None and why none does (recorded as the job's reason)."""
        never = never_a_volume(header, instances)
        if never:
            return None, never
        reasons = []
        for rule in self.rules:
            why = rule.refusal(header)
            if not why:
                return rule, ""
            reasons.append(f"{rule.name}: {why}")
        return None, "no rule matches (" + "; ".join(reasons) + ")" if reasons else "the rule file has no [[rule]]"


def never_a_volume(header: dict[str, str], instances: int) -> str:
    """Why a series is no slice stack at all (scout, localizer, dose screen, single image), '' when it may be one."""
    image_type = header.get("ImageType", "").upper()
    if any(word in image_type for word in ("LOCALIZER", "SCOUT", "TOPOGRAM")):
        return "a localizer/scout (ImageType), not a volume"
    if header.get("SOPClassUID", "").startswith(SCREEN_SOP_PREFIXES):
        return "a screen or report (secondary capture / structured report), not a volume"
    if NEVER.search(header.get("SeriesDescription", "")):
        return "a scout, localizer or dose screen (series description), not a volume"
    if instances < 2:
        return "a single image, not a volume"
    return ""


def load_rules(path: str | Path) -> Rules:
    """The rule file at ``path``, checked: unknown keys, missing values and bad patterns are one-line errors."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ThinsliceError(f"rule file {path} cannot be read: {str(exc).splitlines()[0]}") from None
    return parse_rules(data, str(path))


def parse_rules(data: dict[str, Any], where: str = "rules") -> Rules:
    """:class:`Rules` from the TOML's tables (``[node]``, ``[destinations.NAME]``, ``[[rule]]``)."""
    _known(data, {"node", "destinations", "rule"}, where, "at the top level")
    limits = _limits(data.get("node", {}), where)
    destinations = {name: _destination(name, raw, where) for name, raw in data.get("destinations", {}).items()}
    rules = tuple(_rule(raw, i, where, destinations) for i, raw in enumerate(data.get("rule", [])))
    if not limits.allowed_callers:
        raise ThinsliceError(f"{where}: [node] allowed_callers is empty: list the AE titles that may send (e.g. "
                             "[\"ORTHANC\"]), or [\"*\"] to accept any caller")
    return Rules(limits, rules, destinations, where)


def _limits(raw: dict[str, Any], where: str) -> NodeLimits:
    _known(raw, NODE_KEYS, where, "in [node]")
    callers = raw.get("allowed_callers", [])
    if not isinstance(callers, list) or not all(isinstance(c, str) for c in callers):
        raise ThinsliceError(f"{where}: [node] allowed_callers must be a list of AE titles")
    values: dict[str, Any] = {"allowed_callers": tuple(c.strip() for c in callers)}
    for key in NODE_KEYS - {"allowed_callers"}:
        if key in raw:
            values[key] = _positive(raw[key], f"[node] {key}", where, integer=key in INTEGER_KEYS)
    return NodeLimits(**values)


def _destination(name: str, raw: Any, where: str) -> Destination:
    if not isinstance(raw, dict):
        raise ThinsliceError(f"{where}: [destinations.{name}] must be a table")
    _known(raw, DEST_KEYS, where, f"in [destinations.{name}]")
    if not raw.get("host") and not raw.get("folder"):
        raise ThinsliceError(f"{where}: [destinations.{name}] needs host, port and ae_title (C-STORE) or a folder")
    if raw.get("host") and not (raw.get("port") and raw.get("ae_title")):
        raise ThinsliceError(f"{where}: [destinations.{name}] needs port and ae_title beside host")
    port = int(_positive(raw.get("port", 0), f"[destinations.{name}] port", where, integer=True)) if raw.get(
        "host") else 0
    associations = int(_positive(raw.get("associations", 2), f"[destinations.{name}] associations", where,
                                 integer=True))
    return Destination(name, str(raw.get("host", "")), port, str(raw.get("ae_title", "")), str(raw.get("folder", "")),
                       associations)


def _rule(raw: Any, index: int, where: str, destinations: dict[str, Destination]) -> Rule:
    if not isinstance(raw, dict):
        raise ThinsliceError(f"{where}: [[rule]] {index + 1} must be a table")
    name = str(raw.get("name", f"rule {index + 1}"))
    _known(raw, RULE_KEYS, where, f"in rule '{name}'")
    if "spacing" not in raw:
        raise ThinsliceError(f"{where}: rule '{name}' has no spacing: give the output slice spacing in mm")
    send_to = raw.get("send_to", [])
    if isinstance(send_to, str):
        send_to = [send_to]
    missing = [d for d in send_to if d not in destinations]
    if missing or not send_to:
        raise ThinsliceError(f"{where}: rule '{name}' sends to {', '.join(missing) or 'nothing'}: name one or more "
                             f"[destinations.NAME] in send_to (defined: {', '.join(destinations) or 'none'})")
    for key in ("series_description", "body_part", "exclude"):
        try:
            re.compile(str(raw.get(key, "")))
        except re.error as exc:
            raise ThinsliceError(f"{where}: rule '{name}' {key} is not a regular expression: {exc}") from None
    modality = raw.get("modality", ["CT"])
    options = raw.get("options", {})
    if not isinstance(options, dict):
        raise ThinsliceError(f"{where}: rule '{name}' options must be a table, e.g. options = {{ precision = "
                             "\"bf16\" }")
    return Rule(name=name, spacing=_positive(raw["spacing"], f"rule '{name}' spacing", where),
                method=str(raw.get("method", "planes")),
                modality=tuple([modality] if isinstance(modality, str) else modality),
                min_thickness_mm=float(raw.get("min_thickness_mm", 0.0)),
                max_thickness_mm=float(raw.get("max_thickness_mm", 1e9)),
                series_description=str(raw.get("series_description", "")), body_part=str(raw.get("body_part", "")),
                exclude=str(raw.get("exclude", "")), uncertainty=bool(raw.get("uncertainty", False)),
                options=tuple(sorted(options.items())), send_to=tuple(send_to))


def _known(raw: dict[str, Any], keys: set[str], where: str, place: str) -> None:
    unknown = sorted(set(raw) - keys)
    if unknown:
        raise ThinsliceError(f"{where}: unknown key(s) {', '.join(unknown)} {place}; known: {', '.join(sorted(keys))}")


def _positive(value: Any, what: str, where: str, integer: bool = False) -> Any:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
    if not ok or (integer and not isinstance(value, int)):
        kind = "a positive whole number" if integer else "a positive number"
        raise ThinsliceError(f"{where}: {what} must be {kind}, not {value!r}")
    return int(value) if integer else float(value)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
