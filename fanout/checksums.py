"""Content checksums per shard: what exactly was applied, so an edited migration cannot hide.

yoyo identifies a migration by a hash of its id, not of its content: a file edited after
it was applied goes unnoticed. fanout records the sha256 of every migration it applies
in `fanout_checksums`, next to yoyo's tables and in the same transaction as yoyo's own
record, together with the service and environment it came from. Comparing those rows
with the migration set of a run finds drift:

- changed: applied with other content than the set now has;
- missing: fanout applied it for this service and environment, and the set no longer has it;
- foreign: applied from another environment's set.

`accept` adopts the current content of a drifted migration (logged in
`fanout_checksum_log` with who and why); `baseline` adopts a fleet migrated before
fanout by recording the current content of what is applied, without running anything.
This module holds what the engines share: the tables' names, the kinds of row, and the
comparison; each engine reads and writes the rows (`fanout/engines/postgres/checksums.py`,
the MySQL engine). It knows nothing of yoyo.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from fanout.locking import WHO as WHO
from fanout.report import Drift, DriftKind

TABLE = "fanout_checksums"
LOG_TABLE = "fanout_checksum_log"


class How(StrEnum):
    APPLIED = "applied"  # fanout ran it
    ACCEPTED = "accepted"  # an operator adopted new content for it (fanout accept)
    BASELINED = "baselined"  # applied before fanout, adopted as it is now (fanout baseline)
    RETIRED = "retired"  # accepted although no longer in the set: never reported as missing again
    ROLLED_BACK = "rolled-back"  # fanout rolled it back: the checksum row is gone, the log keeps it
    MARKED = "marked"  # recorded as applied by an operator (fanout mark), not run by fanout
    UNMARKED = "unmarked"  # log only: an operator removed the record (fanout unmark) so that it runs again
    # Log only: a post-apply hook failed (due again on every apply until it runs), or ran after failing.
    HOOK_FAILED = "hook-failed"
    HOOK_RAN = "hook-ran"


@dataclass(frozen=True, slots=True)
class Recorded:
    migration_id: str
    sha256: str
    service: str
    environment: str
    how: str


def compare(
    recorded: dict[str, Recorded],
    *,
    service: str,
    environment: str,
    applied_ids: set[str],
    current: dict[str, str],
) -> tuple[list[Drift], list[str]]:
    """Drift of one service on one shard, and the applied migrations with no checksum (unverified).

    `current` maps the set's migration ids to their sha256; `applied_ids` are those of them
    yoyo has recorded as applied on the shard.
    """
    findings: list[Drift] = []
    for row in recorded.values():
        if row.service != service or row.how == How.RETIRED:
            continue
        if row.environment != environment:
            findings.append(
                Drift(row.migration_id, DriftKind.FOREIGN, row.sha256, current.get(row.migration_id),
                        f"applied from environment {row.environment!r}")
            )  # fmt: skip
        elif row.migration_id not in current:
            findings.append(
                Drift(row.migration_id, DriftKind.MISSING, row.sha256, None, "applied, no longer in the migration set")
            )
        elif row.migration_id in applied_ids and row.sha256 != current[row.migration_id]:
            findings.append(
                Drift(row.migration_id, DriftKind.CHANGED, row.sha256, current[row.migration_id],
                        f"applied as {row.sha256[:12]}, the set now has {current[row.migration_id][:12]}")
            )  # fmt: skip
    unverified = sorted(m for m in applied_ids if m not in recorded)
    return findings, unverified
