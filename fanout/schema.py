"""A shard's live schema as data: a normalized description, its fingerprint, the readable
differences between two descriptions, and the fleet grouped by (applied version, fingerprint).

Pure: the catalog rows come from `fanout.engines.postgres.catalog`, which alone talks to the database.
Names are relative to the shard's home schema (the target's schema for schema-per-tenant
targets, else `public`), so tenant schemas with different names compare equal; objects in
other schemas keep their schema name.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

# The order objects are listed and diffed in: containers before what they contain.
KINDS = (
    "extension", "enum", "table", "column", "constraint", "index", "view", "materialized view", "sequence",
    "function", "trigger",
)  # fmt: skip
_TABLE_CHILDREN = ("column", "constraint", "index", "trigger")
LARGEST = "largest"
BUILD = "build"
DETAIL_LIMIT = 160  # characters of a definition quoted in a difference

Value = str | bool | None


@dataclass(frozen=True, slots=True)
class SchemaObject:
    kind: str  # one of KINDS
    name: str  # "person", "person.address" (columns, constraints, triggers: table.name), "other_schema.t"
    table: str | None  # the table a column, constraint, index or trigger belongs to
    attributes: tuple[tuple[str, Value], ...]

    @property
    def key(self) -> tuple[int, str]:
        return (KINDS.index(self.kind), self.name)

    def get(self, attribute: str) -> Value:
        return dict(self.attributes).get(attribute)


@dataclass(frozen=True, slots=True)
class SchemaDescription:
    objects: tuple[SchemaObject, ...]  # sorted by key
    fingerprint: str  # sha256 of the canonical JSON of `objects`


def describe(rows: Sequence[Mapping[str, Any]], home: str) -> SchemaDescription:
    """The normalized description of catalog rows (`{"kind", "schema", "name", "table", "attrs"}`).

    `home` is the schema whose name is dropped from names and definitions.
    """
    strip = _qualifier(home)
    objects = []
    for row in rows:
        schema = row["schema"]
        prefix = "" if schema == home else f"{schema}."
        table = f"{prefix}{row['table']}" if row.get("table") else None
        name = f"{table}.{row['name']}" if table and row["kind"] in ("column", "constraint", "trigger") else (
            f"{prefix}{row['name']}"
        )  # fmt: skip
        attributes = tuple(sorted((k, _value(v, strip)) for k, v in (row.get("attrs") or {}).items()))
        objects.append(SchemaObject(row["kind"], name, table, attributes))
    objects.sort(key=lambda o: o.key)
    canonical = json.dumps([[o.kind, o.name, o.table, o.attributes] for o in objects], separators=(",", ":"))
    return SchemaDescription(tuple(objects), hashlib.sha256(canonical.encode()).hexdigest())


def _qualifier(schema: str) -> re.Pattern[str]:
    """`schema.` or `"schema".` where it qualifies a name (not inside another identifier)."""
    quoted = re.escape('"' + schema.replace('"', '""') + '"')
    return re.compile(rf'(?<![\w".$]){quoted}\.' + (rf'|(?<![\w".$]){re.escape(schema)}\.(?=["\w])'))


def _value(value: Any, strip: re.Pattern[str]) -> Value:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    if isinstance(value, str):
        return strip.sub("", value)
    if value is None or isinstance(value, bool):
        return value
    return str(value)


# ---- differences ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Difference:
    """One object-level difference of a schema from its reference."""

    change: str  # "extra" | "missing" | "changed"
    kind: str
    name: str
    detail: str  # the line a person reads


def diff(reference: SchemaDescription, other: SchemaDescription) -> tuple[Difference, ...]:
    """How `other` differs from `reference`; an extra or missing table hides its own columns, indexes, ..."""
    ours = {o.key: o for o in other.objects}
    theirs = {o.key: o for o in reference.objects}
    extra_tables = {o.name for k, o in ours.items() if o.kind == "table" and k not in theirs}
    missing_tables = {o.name for k, o in theirs.items() if o.kind == "table" and k not in ours}
    out: list[Difference] = []
    for key in sorted(ours.keys() | theirs.keys()):
        mine, ref = ours.get(key), theirs.get(key)
        if ref is None:
            assert mine is not None
            if not (mine.kind in _TABLE_CHILDREN and mine.table in extra_tables):
                out.append(Difference("extra", mine.kind, mine.name, f"extra {_phrase(mine)}"))
        elif mine is None:
            if not (ref.kind in _TABLE_CHILDREN and ref.table in missing_tables):
                out.append(Difference("missing", ref.kind, ref.name, f"missing {_phrase(ref)}"))
        elif mine.attributes != ref.attributes:
            out += [Difference("changed", mine.kind, mine.name, line) for line in _changes(mine, ref)]
    return tuple(out)


def _short(text: Value) -> str:
    shown = " ".join(str(text).split())
    return shown if len(shown) <= DETAIL_LIMIT else shown[: DETAIL_LIMIT - 1] + "…"


def _local(obj: SchemaObject) -> str:
    return obj.name.removeprefix(f"{obj.table}.") if obj.table else obj.name


def _index_target(obj: SchemaObject) -> str:
    """`person (email)` from `CREATE INDEX person_email_idx ON person USING btree (email)`."""
    definition = str(obj.get("definition") or "")
    _, _, on = definition.partition(" ON ")
    on = on.removeprefix("ONLY ").replace(" USING btree ", " ")
    return _short(on or definition)


def _phrase(obj: SchemaObject) -> str:
    """An object named the way a person would say it."""
    if obj.kind == "index":
        unique = "unique " if obj.get("unique") else ""
        invalid = " (INVALID)" if obj.get("valid") is False else ""
        return f"{unique}index {obj.name} on {_index_target(obj)}{invalid}"
    if obj.kind == "column":
        return f"column {obj.name} ({_column_type(obj)})"
    if obj.kind == "constraint":
        return f"constraint {_local(obj)} on {obj.table} ({_short(obj.get('definition'))})"
    if obj.kind == "trigger":
        # `CREATE TRIGGER t BEFORE INSERT ON person FOR EACH ROW ...`: the part after the name says what it does.
        definition = str(obj.get("definition") or "")
        when = definition.split(f" {_local(obj)} ", 1)[-1] if f" {_local(obj)} " in definition else definition
        return f"trigger {_local(obj)} on {obj.table} ({_short(when)})"
    if obj.kind == "function":
        return f"function {obj.name} returning {obj.get('returns')}"
    if obj.kind == "enum":
        return f"enum type {obj.name} ({obj.get('labels')})"
    if obj.kind == "extension":
        return f"extension {obj.name} {obj.get('version')}"
    return f"{obj.kind} {obj.name}"


def _column_type(obj: SchemaObject) -> str:
    text = str(obj.get("type"))
    if obj.get("not_null"):
        text += " NOT NULL"
    if obj.get("default") is not None:
        text += f" DEFAULT {obj.get('default')}"
    return text


def _changes(mine: SchemaObject, ref: SchemaObject) -> list[str]:
    lines = []
    ours, theirs = dict(mine.attributes), dict(ref.attributes)
    for attribute in sorted(ours.keys() | theirs.keys()):
        a, b = ours.get(attribute), theirs.get(attribute)
        if a != b:
            lines.append(_change(mine, attribute, a, b))
    return lines


def _change(obj: SchemaObject, attribute: str, value: Value, reference: Value) -> str:
    """One changed attribute, said plainly: `column person.address is text, the reference has varchar(200)`."""
    what = f"{obj.kind} {obj.name}"
    if obj.kind == "column":
        if attribute == "type":
            return f"column {obj.name} is {value}, the reference has {reference}"
        if attribute == "not_null":
            said = {True: "NOT NULL", False: "nullable", None: "nullable"}
            return f"column {obj.name} is {said[bool(value)]}, the reference is {said[bool(reference)]}"
        if attribute == "default":
            return f"column {obj.name} has default {value or 'none'}, the reference has {reference or 'none'}"
    if obj.kind == "index":
        if attribute == "valid":
            return (
                f"index {obj.name} is INVALID"
                if value is False
                else f"index {obj.name} is valid, the reference's is INVALID"
            )
        if attribute == "definition":
            return f"index {obj.name} is on {_index_target(obj)}, the reference's is on {_short(_on(reference))}"
    if obj.kind == "function" and attribute == "body":
        return f"function {obj.name} has another body than the reference"
    if attribute == "definition":
        return f"{what} is {_short(value)}, the reference has {_short(reference)}"
    return f"{what}: {attribute} is {_short(value)}, the reference has {_short(reference)}"


def _on(definition: Value) -> str:
    _, _, on = str(definition or "").partition(" ON ")
    return on.removeprefix("ONLY ").replace(" USING btree ", " ")


# ---- the fleet, grouped ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VersionPart:
    """Where one service stands on a shard: its last applied migration, in the set's order."""

    service: str
    migration: str | None  # None: none of the service's migrations applied
    position: int  # index of `migration` in the set's order; -1 for None


Version = tuple[VersionPart, ...]


def version_label(version: Version) -> str:
    return ", ".join(f"{p.service}@{p.migration or '(none)'}" for p in version)


@dataclass(frozen=True, slots=True)
class ShardSchema:
    """One inspected shard: where its services stand and what its schema is."""

    target: str
    version: Version
    schema: SchemaDescription


@dataclass(frozen=True, slots=True)
class SchemaGroup:
    id: int  # 1.. in report order: newest version first, its reference first
    version: Version
    fingerprint: str
    objects: int
    targets: tuple[str, ...]
    reference: bool  # this group is its version's reference
    compared_with: str | None  # "group N" or "build"; None for a reference group
    differences: tuple[Difference, ...] = ()


@dataclass(frozen=True, slots=True)
class Inspection:
    """The fleet's schemas: groups per version, and how each group differs from its version's reference."""

    reference: str  # "largest", "build", or a target id (--reference)
    groups: tuple[SchemaGroup, ...]
    notes: tuple[str, ...] = ()
    build_fingerprint: str | None = None

    @property
    def outliers(self) -> tuple[str, ...]:
        """Targets whose schema differs from their version's reference."""
        return tuple(t for g in self.groups if not g.reference for t in g.targets)

    @property
    def differs(self) -> bool:
        return any(not g.reference for g in self.groups)


def group(shards: Sequence[ShardSchema], reference: str = LARGEST, build: ShardSchema | None = None) -> Inspection:
    """Group shards by (version, fingerprint); per version pick the reference and diff every other group.

    The reference of a version is the group of the `reference` target when it is at that
    version; with `build`, the built schema for the version it was built at; otherwise the
    largest group (on a tie, the one whose first shard comes first in the directory).
    Shards at another version are never compared with it.
    """
    buckets: dict[tuple[Version, str], list[ShardSchema]] = {}
    for shard in shards:
        buckets.setdefault((shard.version, shard.schema.fingerprint), []).append(shard)
    versions: dict[Version, list[tuple[Version, str]]] = {}
    for key in buckets:
        versions.setdefault(key[0], []).append(key)
    notes = []
    if reference not in (LARGEST, BUILD) and not any(s.target == reference for s in shards):
        notes.append(f"reference target {reference} could not be read; each version's largest group is its reference")
    if build is not None and build.version not in versions:
        notes.append(f"no shard is at the version the migration set builds ({version_label(build.version)})")
    groups: list[SchemaGroup] = []
    for version in sorted(versions, key=lambda v: tuple(p.position for p in v), reverse=True):
        keys = versions[version]
        against_build = build is not None and build.version == version
        chosen: tuple[Version, str] | None
        if against_build:
            assert build is not None
            chosen = next((k for k in keys if k[1] == build.schema.fingerprint), None)
            base = build.schema
        else:
            named = [k for k in keys if any(s.target == reference for s in buckets[k])]
            chosen = named[0] if named else max(keys, key=lambda k: len(buckets[k]))
            base = buckets[chosen][0].schema
        ordered = sorted(keys, key=lambda k: (k != chosen, -len(buckets[k])))
        reference_id = len(groups) + 1
        for key in ordered:
            members = buckets[key]
            is_reference = key == chosen
            compared = None if is_reference else BUILD if against_build else f"group {reference_id}"
            groups.append(
                SchemaGroup(
                    id=len(groups) + 1,
                    version=version,
                    fingerprint=key[1],
                    objects=len(members[0].schema.objects),
                    targets=tuple(s.target for s in members),
                    reference=is_reference,
                    compared_with=compared,
                    differences=() if is_reference else diff(base, members[0].schema),
                )
            )
    return Inspection(
        reference=reference,
        groups=tuple(groups),
        notes=tuple(notes),
        build_fingerprint=build.schema.fingerprint if build else None,
    )


def combine(inspections: Sequence[Inspection]) -> Inspection | None:
    """One inspection from those of the slices of one run (`report merge`): their groups, renumbered.

    Each slice chose its references among its own shards, so equal fingerprints may appear in
    several groups; a note says so. Every outlier of every slice stays an outlier.
    """
    if not inspections:
        return None
    groups: list[SchemaGroup] = []
    for inspection in inspections:
        offset = len(groups)
        for g in inspection.groups:
            compared = g.compared_with
            if compared is not None and compared.startswith("group "):
                compared = f"group {int(compared.removeprefix('group ')) + offset}"
            groups.append(replace(g, id=g.id + offset, compared_with=compared))
    notes = [n for i in inspections for n in i.notes]
    if len(inspections) > 1:
        notes.append(f"merged from {len(inspections)} slices, each compared with references among its own shards")
    first = inspections[0]
    return Inspection(first.reference, tuple(groups), tuple(dict.fromkeys(notes)), first.build_fingerprint)


def target_notes(inspection: Inspection) -> dict[str, str]:
    """For each outlier target, one line: how its schema differs (for a row of the fleet view)."""
    notes = {}
    for g in inspection.groups:
        if g.reference:
            continue
        first = g.differences[0].detail if g.differences else "differs"
        more = f" (+{len(g.differences) - 1} more)" if len(g.differences) > 1 else ""
        for target in g.targets:
            notes[target] = f"schema differs from {g.compared_with}: {first}{more}"
    return notes


# ---- JSON ---------------------------------------------------------------------------------


def to_dict(inspection: Inspection) -> dict[str, Any]:
    return {
        "reference": inspection.reference,
        "build_fingerprint": inspection.build_fingerprint,
        "outliers": list(inspection.outliers),
        "notes": list(inspection.notes),
        "groups": [
            {
                "group": g.id,
                "version": {p.service: p.migration for p in g.version},
                "positions": {p.service: p.position for p in g.version},
                "fingerprint": g.fingerprint,
                "objects": g.objects,
                "targets": list(g.targets),
                "reference": g.reference,
                "compared_with": g.compared_with,
                "differences": [
                    {"change": d.change, "kind": d.kind, "name": d.name, "detail": d.detail} for d in g.differences
                ],
            }
            for g in inspection.groups
        ],
    }


def from_dict(data: Mapping[str, Any]) -> Inspection:
    return Inspection(
        reference=data["reference"],
        build_fingerprint=data.get("build_fingerprint"),
        notes=tuple(data.get("notes", ())),
        groups=tuple(
            SchemaGroup(
                id=g["group"],
                version=tuple(VersionPart(s, m, g["positions"][s]) for s, m in g["version"].items()),
                fingerprint=g["fingerprint"],
                objects=g["objects"],
                targets=tuple(g["targets"]),
                reference=g["reference"],
                compared_with=g["compared_with"],
                differences=tuple(Difference(d["change"], d["kind"], d["name"], d["detail"]) for d in g["differences"]),
            )
            for g in data["groups"]
        ),
    )
