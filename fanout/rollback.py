"""What a fleet rollback undoes: per service, then per shard, and the checks made before any shard is touched.

Pure: migration ids, dependencies and file names in, ids out. The runner reads each
shard's applied set under its lock and asks `on_shard` what to roll back there.

The order is yoyo's (`yoyo rollback -r ID`): newest first in the set's order, which is a
topological order, so a migration is always rolled back after every migration that
depends on it. `--to ID` leaves a shard at ID whatever its version (a skewed fleet
converges); `--migration ID` undoes ID and, as yoyo does, every migration that depends
on it (`-- depends:`, transitively); `--release R` undoes what release R added.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from fanout.errors import ConfigError, SourceError
from fanout.report import RollbackRequest

ROLLBACK_SUFFIX = ".rollback.sql"


@dataclass(frozen=True, slots=True)
class Graph:
    """One service's migrations as the rollback sees them."""

    service: str
    order: tuple[str, ...]  # yoyo's apply order (topological)
    depends: Mapping[str, frozenset[str]]  # migration id -> ids it depends on
    rollback_files: frozenset[str]  # ids that have a NAME.rollback.sql in the pinned set
    release: str | None = None  # the release the set was published as (its manifest)
    added: frozenset[str] | None = None  # ids the set's release added (None: its manifest does not say)


def dependents(graph: Graph, migration: str) -> set[str]:
    """Every migration that depends on `migration`, directly or not (yoyo's `descendants`)."""
    found = {migration}
    grew = True
    while grew:
        grew = False
        for m in graph.order:
            if m not in found and graph.depends.get(m, frozenset()) & found:
                found.add(m)
                grew = True
    found.discard(migration)
    return found


def owner(graphs: Sequence[Graph], migration: str) -> Graph | None:
    return next((g for g in graphs if migration in g.order), None)


def candidates(request: RollbackRequest, graphs: Sequence[Graph]) -> dict[str, tuple[str, ...]]:
    """Per service, every migration the request may roll back on some shard, newest first.

    Raises ConfigError (before any shard is touched) when the request names a migration
    no service of the run has, or two `--to` ids of one service.
    """
    wanted: dict[str, set[str]] = {g.service: set() for g in graphs}
    for migration in request.to:
        graph = _owner_or_fail(graphs, migration, "--to")
        if any(other in graph.order for other in request.to if other != migration):
            raise ConfigError(f"--to: give one migration per service; service {graph.service!r} has several")
        wanted[graph.service] |= set(graph.order[graph.order.index(migration) + 1 :])
    for migration in request.migrations:
        graph = _owner_or_fail(graphs, migration, "--migration")
        wanted[graph.service] |= {migration, *dependents(graph, migration)}
    if request.release is not None:
        matching = [g for g in graphs if g.release == request.release]
        if not matching:
            known = sorted({g.release for g in graphs if g.release})
            shown = ", ".join(known) if known else "none: the sets were not published with fanout publish"
            raise ConfigError(
                f"--release {request.release}: no service of the run published that release (current: {shown})"
            )
        for graph in matching:
            if graph.added is None:
                raise ConfigError(
                    f"--release {request.release}: the manifest of service {graph.service!r} does not list what the "
                    "release added (published by an older fanout); use --to or --migration"
                )
            # What depends on the release's migrations goes too, or they could not be undone.
            wanted[graph.service] |= {d for m in graph.added if m in graph.order for d in (m, *dependents(graph, m))}
    return {g.service: tuple(m for m in reversed(g.order) if m in wanted[g.service]) for g in graphs}


def _owner_or_fail(graphs: Sequence[Graph], migration: str, option: str) -> Graph:
    graph = owner(graphs, migration)
    if graph is None:
        services = ", ".join(g.service for g in graphs)
        raise ConfigError(f"{option} {migration}: no such migration in the migration set of {services}")
    return graph


def refuse_missing_rollback_files(graphs: Sequence[Graph], selected: Mapping[str, Sequence[str]]) -> None:
    """SourceError naming every migration of the selection that has no rollback file.

    Checked against the whole selection rather than what each shard has applied: the
    run refuses before it touches (or even reads) any shard.
    """
    missing = [
        f"{g.service}/{m}{ROLLBACK_SUFFIX}"
        for g in graphs
        for m in selected.get(g.service, ())
        if m not in g.rollback_files
    ]
    if missing:
        raise SourceError(
            f"refusing to roll back: {len(missing)} migration(s) have no rollback file: {', '.join(missing)}; "
            "publish the missing rollback files first"
        )


def on_shard(selected: Iterable[str], applied: Iterable[str]) -> tuple[str, ...]:
    """What to roll back on one shard: the selected migrations it has applied, newest first."""
    have = set(applied)
    return tuple(m for m in selected if m in have)


def target_level(graph: Graph, to: Sequence[str]) -> tuple[str, ...] | None:
    """The migrations a shard at the `--to`/`verify --at` version has, for the service named; None if none is."""
    for migration in to:
        if migration in graph.order:
            return graph.order[: graph.order.index(migration) + 1]
    return None
