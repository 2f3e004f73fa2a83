"""Lint of a migration folder (local before publish, the S3 snapshot before a run). Pure: names and bytes in.

The rules follow what yoyo 9 itself does with a folder, checked against the real `yoyo`
CLI on PostgreSQL:

- **Errors** are what yoyo rejects or would apply wrongly. They stop `publish` and `apply`
  (exit 3, each file named) before any shard is touched; `plan`, `status` and `verify`
  report them and still show the fleet. So a set that passes fanout also passes yoyo.
- **Warnings** are fanout's advice on sets yoyo applies correctly. Each has a stable rule
  name, shown in every report; an environment can raise chosen ones to errors
  (`[lint] errors = [...]`).

yoyo reads the files directly in a folder whose suffix is exactly `.py` or `.sql`
(`NAME.rollback.sql` being the rollback of `NAME.sql`) and ignores everything else: a
`.SQL` or `.sql.bak` file, a nested folder. fanout reads the same files.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import PurePosixPath

import sqlparse

SQL_SUFFIX = ".sql"
PY_SUFFIX = ".py"
ROLLBACK_SUFFIX = ".rollback.sql"
HOOK_PREFIX = "post-apply"
# `yoyo new` writes its editor's file with this prefix into the folder; yoyo skips such files.
YOYO_TEMP_PREFIX = "_tmp_yoyonew"
# Names fanout itself keeps beside the migrations.
OWN_FILES = frozenset({"_manifest.json"})
OWN_FOLDERS = frozenset({"_runs/", "_releases/"})  # run records and release history, under the prefix


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


class Rule(StrEnum):
    """Stable rule names (public: reports and `[lint] errors` use them)."""

    # Errors: yoyo fails on the set, or applies it differently from what it says.
    NOT_UTF8 = "not-utf8"  # yoyo reads files as UTF-8 and crashes
    BAD_TRANSACTIONAL = "bad-transactional"  # '-- transactional: maybe': yoyo crashes (KeyError)
    UNKNOWN_DEPENDENCY = "unknown-dependency"  # '-- depends:' on an id not in the set: yoyo refuses
    EMPTY_STATEMENT = "empty-statement"  # a statement that is only a comment: "can't execute an empty query"
    DUPLICATE_ID = "duplicate-id"  # NAME.sql and NAME.py, or one name in two merged paths: yoyo refuses
    DEPENDENCY_CYCLE = "dependency-cycle"  # '-- depends:' lines that form a cycle: yoyo refuses
    PYTHON_DISABLED = "python-disabled"  # a .py migration in an environment that does not allow them
    BAD_MIGRATION = "bad-migration"  # yoyo cannot load it (a Python error, a dependency cycle)
    # Warnings: yoyo applies the set correctly; fanout's advice.
    IGNORED_FILE = "ignored-file"  # yoyo does not read it (.SQL, .sql.bak, README.md)
    NESTED_FOLDER = "nested-folder"  # yoyo does not read what is inside
    EMPTY_MIGRATION = "empty-migration"  # nothing but comments: recorded as applied, runs nothing
    MISSPELT_DIRECTIVE = "misspelt-directive"  # '-- Depends:', '-- depend:': a comment to yoyo
    ORPHAN_ROLLBACK = "orphan-rollback"  # NAME.rollback.sql without NAME.sql: never used
    SAME_NUMBER = "same-number"  # 003-a and 003-b: applied in name order
    CASE_COLLISION = "case-collision"  # ids equal but for case: clash on a case-insensitive checkout
    OUT_OF_ORDER = "out-of-order"  # new, sorts before a published one (publish only)
    # a rollback file says '-- transactional: false' and its migration does not: yoyo reads the migration's
    ROLLBACK_TRANSACTIONAL = "rollback-transactional"


ERROR_RULES = frozenset(
    {
        Rule.NOT_UTF8,
        Rule.BAD_TRANSACTIONAL,
        Rule.UNKNOWN_DEPENDENCY,
        Rule.EMPTY_STATEMENT,
        Rule.DUPLICATE_ID,
        Rule.DEPENDENCY_CYCLE,
        Rule.PYTHON_DISABLED,
        Rule.BAD_MIGRATION,
    }
)
WARNING_RULES = frozenset(set(Rule) - ERROR_RULES)

# yoyo's own directive syntax: lower-case names only (checked against yoyo 9).
_YOYO_DIRECTIVE = re.compile(r"^\s*--\s*(transactional|depends)\s*:\s*(.*)$")
_ANY_DIRECTIVE = re.compile(r"^\s*--\s*([A-Za-z_-]+)\s*:\s*(.*)$")
_COMMENT_OR_BLANK = re.compile(r"^(\s*|\s*--.*)$")
# The leading number of a migration id: `003-x` -> 003, `yoyo new`'s `20240101_01_abcde-x` -> 20240101_01.
_NUMBER = re.compile(r"^\d+(?:[_.]\d+)*")
# Spellings of a directive that yoyo takes for a plain comment.
_NEAR_MISSES = frozenset({"depends", "depend", "depends-on", "dependencies", "transactional", "transaction"})


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    message: str
    rule: Rule
    severity: Severity

    def __str__(self) -> str:
        return f"{self.file}: {self.message} [{self.rule.value}]"


def is_migration_file(name: str) -> bool:
    """What yoyo's `read_migrations` reads from a folder (rollbacks included; they are paired by name)."""
    suffix = PurePosixPath(name).suffix
    return suffix in (SQL_SUFFIX, PY_SUFFIX) and not name.startswith(YOYO_TEMP_PREFIX)


def migration_id(name: str) -> str:
    """yoyo's id: the file name without its extension."""
    return name.rsplit(".", 1)[0]


def is_python(name: str) -> bool:
    return name.endswith(PY_SUFFIX)


def lint(
    files: Mapping[str, bytes],
    *,
    folders: Collection[str] = (),
    published: Collection[str] = (),
    python: bool = False,
    errors: Collection[str] = (),
) -> list[Problem]:
    """Problems of one service's set.

    `files` maps each file to its content; a key may carry a folder (`path/NAME.sql`) when a
    service merges several paths. `folders` are nested folder names, `published` the
    migration ids already published (for the order rule), `python` whether the environment
    allows Python migrations, `errors` the warning rules the environment raises to errors.
    """
    found: list[tuple[str, str, Rule]] = []

    def add(file: str, message: str, rule: Rule) -> None:
        found.append((file, message, rule))

    for folder in sorted(folders):
        if folder not in OWN_FOLDERS:
            add(folder.rstrip("/") + "/", "nested folder: yoyo does not read what is inside", Rule.NESTED_FOLDER)
    texts: dict[str, str] = {}  # file -> text, of migrations that decode
    rollbacks: list[str] = []  # rollback files whose migration is there
    owners: dict[str, str] = {}  # migration id -> its first file
    for key in sorted(files):
        name = PurePosixPath(key).name
        if name in OWN_FILES:
            continue
        if not is_migration_file(name):
            looks = ".sql" in name.lower() or name.lower().endswith(".py")
            hint = " (only NAME.sql and NAME.py are migrations)" if looks else ""
            add(key, f"not a migration: yoyo does not read it{hint}", Rule.IGNORED_FILE)
            continue
        if name.endswith(ROLLBACK_SUFFIX):
            if key[: -len(ROLLBACK_SUFFIX)] + SQL_SUFFIX in files:
                rollbacks.append(key)
            else:
                add(
                    key,
                    f"rollback without {name[: -len(ROLLBACK_SUFFIX)]}{SQL_SUFFIX}: never used",
                    Rule.ORPHAN_ROLLBACK,
                )
            continue
        ident = migration_id(name)
        if ident in owners:
            add(key, f"same id {ident!r} as {owners[ident]}: yoyo refuses the set", Rule.DUPLICATE_ID)
        owners.setdefault(ident, key)
        if is_python(name):
            if not python:
                add(
                    key,
                    "Python migration: it would run code inside the runner, which holds every shard's "
                    "credentials; allow it with [source] python_migrations = true",
                    Rule.PYTHON_DISABLED,
                )
            continue
        try:
            texts[key] = files[key].decode("utf-8")
        except UnicodeDecodeError as e:
            add(key, f"not UTF-8 text ({e.reason} at byte {e.start}): yoyo cannot read it", Rule.NOT_UTF8)
    known = set(owners) | set(published)
    for key, text in texts.items():
        for message, rule in _sql_problems(text, known):
            add(key, message, rule)
    for key, message, rule in [*_identity(owners, published), *_cycles(owners, texts)]:
        add(key, message, rule)
    for key in rollbacks:
        migration = texts.get(key[: -len(ROLLBACK_SUFFIX)] + SQL_SUFFIX)
        rollback_only = (
            migration is not None
            and _non_transactional(files[key].decode("utf-8", "replace"))
            and not _non_transactional(migration)
        )
        if rollback_only:
            add(
                key,
                "'-- transactional: false' is read from the migration, not its rollback file (as yoyo does): "
                "this rollback runs inside a transaction",
                Rule.ROLLBACK_TRANSACTIONAL,
            )
    raised = set(errors)
    return [
        Problem(file, message, rule, Severity.ERROR if rule in ERROR_RULES or rule in raised else Severity.WARNING)
        for file, message, rule in found
    ]


def _cycles(owners: Mapping[str, str], texts: Mapping[str, str]) -> list[tuple[str, str, Rule]]:
    """A `-- depends:` cycle has no order to apply in (yoyo refuses it): name the first one found."""
    graph: dict[str, list[str]] = {}
    for ident, key in owners.items():
        depends = statements(texts[key])[0].get("depends", "").split() if key in texts else []
        graph[ident] = [d for d in depends if d in owners]
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
                message = f"'-- depends:' lines form a cycle: {' -> '.join(cycle)}"
                return [(owners[cycle[0]], message, Rule.DEPENDENCY_CYCLE)]
    return []


def errors(problems: Collection[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity is Severity.ERROR]


def _non_transactional(text: str) -> bool:
    return statements(text)[0].get("transactional", "").lower() == "false"


@functools.lru_cache(maxsize=64)  # lint reads a file's statements for several rules; splitting is the slow part
def statements(text: str) -> tuple[dict[str, str], tuple[str, ...]]:
    """yoyo's reading of a .sql file: its directives, and the statements it executes one by one (read-only)."""
    chunks = [str(c) for c in sqlparse.split(text)]
    directives: dict[str, str] = {}
    if chunks:
        lines = chunks[0].splitlines()
        for index, line in enumerate(lines):
            match = _YOYO_DIRECTIVE.match(line)
            if match:
                key, value = match.groups()
                directives[key] = f"{directives[key]} {value}" if key in directives else value
            elif not _COMMENT_OR_BLANK.match(line):
                chunks[0] = "\n".join(lines[index:])
                break
        else:
            chunks[0] = ""
    return directives, tuple(c for c in chunks if c.strip())


def _sql_problems(text: str, known: set[str]) -> list[tuple[str, Rule]]:
    problems: list[tuple[str, Rule]] = []
    directives, executed = statements(text)
    transactional = directives.get("transactional")
    # yoyo compares the raw value: even a trailing space makes it crash.
    if transactional is not None and transactional.lower() not in ("true", "false"):
        problems.append(
            (f"'-- transactional: {transactional!r}': must be exactly true or false", Rule.BAD_TRANSACTIONAL)
        )
    for dependency in directives.get("depends", "").split():
        if dependency not in known:
            problems.append((f"'-- depends: {dependency}': no such migration", Rule.UNKNOWN_DEPENDENCY))
    for index, statement in enumerate(executed, 1):
        if _empty_query(statement):
            where = "the last statement" if index == len(executed) else f"statement {index}"
            problems.append(
                (
                    f"{where} is only a comment ({_excerpt(statement)}): yoyo executes it alone and PostgreSQL "
                    'answers "can\'t execute an empty query"; remove it or move it before a statement',
                    Rule.EMPTY_STATEMENT,
                )
            )
    if not executed:
        problems.append(("empty: no SQL statement (yoyo records it as applied and runs nothing)", Rule.EMPTY_MIGRATION))
    in_header = True
    for line in text.splitlines():
        if in_header and not _COMMENT_OR_BLANK.match(line):
            in_header = False
        match = _ANY_DIRECTIVE.match(line)
        if match is None:
            continue
        key = match.group(1)
        if in_header and key.lower() in _NEAR_MISSES and not _YOYO_DIRECTIVE.match(line):
            problems.append(
                (f"'-- {key}:' is a comment to yoyo, which reads only '-- depends:' and '-- transactional:' "
                 "(lower case)", Rule.MISSPELT_DIRECTIVE)
            )  # fmt: skip
        elif not in_header and _YOYO_DIRECTIVE.match(line):
            problems.append(
                (
                    f"'-- {key}:' after the first statement: yoyo reads directives only before it",
                    Rule.MISSPELT_DIRECTIVE,
                )
            )
    return problems


def _empty_query(statement: str) -> bool:
    """What PostgreSQL answers with EmptyQueryResponse: nothing but comments, blanks and semicolons."""
    rest = statement
    while True:
        rest = rest.lstrip()
        if not rest:
            return True
        if rest.startswith(";"):
            rest = rest[1:]
        elif rest.startswith("--"):
            end = rest.find("\n")
            rest = "" if end < 0 else rest[end + 1 :]
        elif rest.startswith("/*"):
            depth, index = 0, 0  # PostgreSQL's block comments nest
            while index < len(rest):
                if rest.startswith("/*", index):
                    depth, index = depth + 1, index + 2
                elif rest.startswith("*/", index):
                    depth, index = depth - 1, index + 2
                    if depth == 0:
                        break
                else:
                    index += 1
            rest = rest[index:]
        else:
            return False


def _excerpt(statement: str) -> str:
    line = statement.strip().splitlines()[0]
    return repr(line if len(line) <= 40 else line[:37] + "...")


def _number(ident: str) -> tuple[int, ...] | None:
    match = _NUMBER.match(ident)
    return tuple(int(part) for part in re.split(r"[_.]", match.group(0))) if match else None


def _identity(owners: Mapping[str, str], published: Collection[str]) -> list[tuple[str, str, Rule]]:
    problems = []
    ordered = sorted(m for m in owners if not m.startswith(HOOK_PREFIX))
    seen: dict[str, str] = {}
    numbers: dict[tuple[int, ...], str] = {}
    for ident in ordered:
        file = owners[ident]
        folded = ident.lower()
        if folded in seen:
            problems.append((file, f"same id as {seen[folded]} but for case", Rule.CASE_COLLISION))
        seen.setdefault(folded, ident)
        number = _number(ident)
        if number is not None:
            if number in numbers:
                problems.append(
                    (file, f"same number as {numbers[number]}: yoyo applies them in name order "
                     f"({numbers[number]} first)", Rule.SAME_NUMBER)
                )  # fmt: skip
            numbers.setdefault(number, ident)
    already = sorted(p for p in published if not p.startswith(HOOK_PREFIX))
    if already:
        last = already[-1]
        for ident in ordered:
            if ident not in published and ident < last:
                problems.append(
                    (
                        owners[ident],
                        f"new, but sorts before {last}, which is already published: shards that have it "
                        "run this one after it (give it a later name if the order matters)",
                        Rule.OUT_OF_ORDER,
                    )
                )
    return problems
