"""Lint of a migration folder (local before publish, the S3 snapshot before a run). Pure: names and bytes in.

Errors stop publish and every run before any shard is touched; warnings are shown.
Each problem names its file. The rules catch what yoyo would silently get wrong:

- a file that looks like a migration but that yoyo ignores (`.SQL`, `.sql.bak`, a nested folder);
- an empty migration (nothing but comments and blanks);
- a directive yoyo cannot use: `-- transactional:` other than true/false, `-- depends:` on an
  id that is not in the set;
- a `NAME.rollback.sql` without `NAME.sql`;
- two migrations with the same id or the same number (`002-a.sql`, `002-b.sql`): their order is a coin toss;
- a new migration that sorts before one already published: shards that have the later one
  would run it out of order.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import StrEnum

SQL_SUFFIX = ".sql"
ROLLBACK_SUFFIX = ".rollback.sql"
HOOK_PREFIX = "post-apply"
# Names fanout itself keeps beside the migrations.
OWN_FILES = frozenset({"_manifest.json"})

_DIRECTIVE = re.compile(r"^\s*--\s*([A-Za-z_-]+)\s*:\s*(.*)$")
_COMMENT_OR_BLANK = re.compile(r"^\s*(--.*)?$")
_NUMBER = re.compile(r"^(\d+)")
# Misspelt directives yoyo would silently take for comments.
_NEAR_MISSES = frozenset({"depend", "depends-on", "dependencies", "requires", "transaction", "transactions"})


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    message: str
    severity: Severity = Severity.ERROR

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


def lint(
    files: Mapping[str, bytes],
    *,
    folders: Collection[str] = (),
    published: Collection[str] = (),
) -> list[Problem]:
    """Problems of one service's folder: `files` maps names to content, `folders` are nested
    folder names, `published` the migration ids already published (for the order rule)."""
    problems: list[Problem] = []
    for folder in sorted(folders):
        problems.append(Problem(folder.rstrip("/") + "/", "nested folder: yoyo ignores what is inside"))
    migrations: dict[str, str] = {}  # id -> text
    for name in sorted(files):
        if name in OWN_FILES:
            continue
        if not name.endswith(SQL_SUFFIX):
            if ".sql" in name.lower():
                problems.append(Problem(name, "not a .sql file: yoyo ignores it (rename it to end in .sql)"))
            else:
                problems.append(Problem(name, "not a migration: ignored", Severity.WARNING))
            continue
        try:
            text = files[name].decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(Problem(name, f"not UTF-8 text ({e.reason} at byte {e.start})"))
            continue
        if all(_COMMENT_OR_BLANK.match(line) for line in text.splitlines()):
            problems.append(Problem(name, "empty: no SQL statement"))
        if not name.endswith(ROLLBACK_SUFFIX):
            migrations[name[: -len(SQL_SUFFIX)]] = text
    for name in sorted(files):
        if name.endswith(ROLLBACK_SUFFIX) and name[: -len(ROLLBACK_SUFFIX)] not in migrations:
            problems.append(Problem(name, f"rollback without its migration {name[: -len(ROLLBACK_SUFFIX)]}.sql"))
        elif (
            name.endswith(ROLLBACK_SUFFIX)
            and _non_transactional(files[name].decode("utf-8", "replace"))
            and not _non_transactional(migrations[name[: -len(ROLLBACK_SUFFIX)]])
        ):
            problems.append(Problem(
                name,
                "'-- transactional: false' is read from the migration, not its rollback file (as yoyo does): "
                "this rollback runs inside a transaction",
                Severity.WARNING,
            ))  # fmt: skip
    known = set(migrations) | set(published)
    for migration_id, text in migrations.items():
        problems += _directives(f"{migration_id}.sql", text, known)
    problems += _identity(migrations, published)
    problems += _cycles(migrations)
    return problems


def _depends(text: str) -> list[str]:
    found: list[str] = []
    for line in text.splitlines():
        match = _DIRECTIVE.match(line)
        if match is None:
            if _COMMENT_OR_BLANK.match(line):
                continue
            break
        if match.group(1).lower() == "depends":
            found += match.group(2).split()
    return found


def _cycles(migrations: Mapping[str, str]) -> list[Problem]:
    """A `-- depends:` cycle has no order to apply in: name the first one found."""
    graph = {m: [d for d in _depends(text) if d in migrations] for m, text in migrations.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                found = visit(nxt, [*path, nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return [Problem(f"{cycle[0]}.sql", f"'-- depends:' lines form a cycle: {' -> '.join(cycle)}")]
    return []


def errors(problems: Collection[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity is Severity.ERROR]


def _non_transactional(text: str) -> bool:
    for line in text.splitlines():
        match = _DIRECTIVE.match(line)
        if match is None:
            if _COMMENT_OR_BLANK.match(line):
                continue
            return False
        if match.group(1).lower() == "transactional" and match.group(2).strip().lower() == "false":
            return True
    return False


def _directives(file: str, text: str, known: set[str]) -> list[Problem]:
    """yoyo reads `-- key: value` lines until the first SQL line."""
    problems = []
    for line in text.splitlines():
        match = _DIRECTIVE.match(line)
        if match is None:
            if _COMMENT_OR_BLANK.match(line):
                continue
            break
        key, value = match.group(1).lower(), match.group(2).strip()
        if key == "transactional" and value.lower() not in ("true", "false"):
            problems.append(Problem(file, f"'-- transactional: {value}': must be true or false"))
        elif key == "depends":
            for dependency in value.split():
                if dependency not in known:
                    problems.append(Problem(file, f"'-- depends: {dependency}': no such migration"))
        elif key in _NEAR_MISSES:
            problems.append(Problem(file, f"'-- {key}:' is not a directive: yoyo reads only depends and transactional"))
    return problems


def _identity(migrations: Mapping[str, str], published: Collection[str]) -> list[Problem]:
    problems = []
    ordered = sorted(m for m in migrations if not m.startswith(HOOK_PREFIX))
    seen: dict[str, str] = {}
    numbers: dict[str, str] = {}
    for migration_id in ordered:
        folded = migration_id.lower()
        if folded in seen:
            problems.append(Problem(f"{migration_id}.sql", f"same id as {seen[folded]}.sql but for case"))
        seen[folded] = migration_id
        number = _NUMBER.match(migration_id)
        if number:
            value = str(int(number.group(1)))
            if value in numbers:
                problems.append(
                    Problem(f"{migration_id}.sql", f"same number as {numbers[value]}.sql: their order is undefined")
                )
            numbers.setdefault(value, migration_id)
    already = sorted(p for p in published if not p.startswith(HOOK_PREFIX))
    if already:
        last = already[-1]
        for migration_id in ordered:
            if migration_id not in published and migration_id < last:
                problems.append(
                    Problem(
                        f"{migration_id}.sql",
                        f"new, but sorts before {last}, which is already published: shards that have it "
                        "would run this one out of order (give it a later number)",
                    )
                )
    return problems
