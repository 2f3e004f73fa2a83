"""Report formats beyond text and JSON: markdown, JUnit XML, the HTML fleet view; and the
fleet matrix and version skew they (and `status`) are built on.

Pure: a `RunReport` in, a string out, always passed through `redact()` last. Every format
shows the same model; none computes anything the JSON report does not carry.
"""

from __future__ import annotations

import html
import json
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum

from fanout import schema, schema_report
from fanout.report import (
    Mode,
    RunReport,
    Status,
    TargetResult,
    describe,
    exit_code,
    render_json,
    render_text,
    source_notes,
)
from fanout.secret import redact

FORMATS = ("text", "json", "markdown", "junit", "html")
_EXTENSIONS = {".json": "json", ".md": "markdown", ".markdown": "markdown", ".xml": "junit", ".html": "html",
               ".htm": "html", ".txt": "text"}  # fmt: skip
# Past this many rows, markdown lists only what needs attention (a PR comment has a size limit).
MARKDOWN_ROW_LIMIT = 50


def format_for(destination: str, default: str) -> str:
    """The format a file name asks for by its extension; `default` otherwise."""
    for extension, fmt in _EXTENSIONS.items():
        if destination.lower().endswith(extension):
            return fmt
    return default


def render(report: RunReport, fmt: str, *, detailed: bool = False, color: bool = False) -> str:
    if fmt == "json":
        return render_json(report, detailed=detailed)
    if fmt == "markdown":
        return render_markdown(report, detailed=detailed)
    if fmt == "junit":
        return render_junit(report)
    if fmt == "html":
        return render_html(report, detailed=detailed)
    text = render_text(report, color=color)
    if report.command in ("status", "verify"):
        text += render_skew(report)
    if report.inspection is not None:
        text += redact(schema_report.render_text(report.inspection))
    return text


# ---- the matrix: shards x migrations ----------------------------------------------------


class Cell(StrEnum):
    APPLIED = "applied"  # applied before this run
    RAN = "ran"  # applied by this run
    ROLLED_BACK = "rolled-back"  # rolled back by this run
    TO_ROLL_BACK = "to-roll-back"  # applied; a rollback's dry run would roll it back (verify --at: beyond the level)
    PENDING = "pending"
    FAILED = "failed"  # the migration that failed
    DRIFT = "drift"
    UNKNOWN = "unknown"  # the target was never read (unreachable, skipped before it started)


@dataclass(frozen=True, slots=True)
class Column:
    service: str
    migration: str


@dataclass(frozen=True, slots=True)
class Row:
    target: str
    tenants: tuple[str, ...]
    server: str
    status: Status  # the worst of the target's services
    locked_by: str | None
    cells: tuple[Cell, ...]
    errors: tuple[str, ...]


_WORST = [
    Status.FAILED, Status.IN_DOUBT, Status.DRIFTED, Status.SKIPPED, Status.PENDING, Status.APPLIED, Status.ROLLED_BACK,
    Status.UP_TO_DATE,
]  # fmt: skip


def columns(report: RunReport) -> list[Column]:
    """Every migration of the run's sets, per service in the environment's order."""
    out = []
    for source in report.sources:
        ids = [f.name.rsplit(".", 1)[0] for f in source.files if not f.name.endswith(".rollback.sql")]
        out += [Column(source.service, m) for m in ids if not m.startswith("post-apply")]
    return out


def matrix(report: RunReport) -> tuple[list[Column], list[Row]]:
    """One row per target; rows that need attention first."""
    cols = columns(report)
    by_target: dict[str, list[TargetResult]] = {}
    for result in report.results:
        by_target.setdefault(result.target, []).append(result)
    rows = []
    for target, results in by_target.items():
        per_service = {r.service: r for r in results}
        cells = tuple(_cell(per_service.get(c.service), c.migration) for c in cols)
        status = min((r.status for r in results), key=_WORST.index)
        holder = next((r.lock_holder for r in results if r.lock_holder), None)
        errors = tuple(
            f"{r.service}: {r.error.kind.value}: {(r.error.file + ': ') if r.error.file else ''}{r.error.message}"
            for r in results
            if r.error is not None
        )
        first = results[0]
        rows.append(
            Row(target, first.tenants, first.server, status, holder.describe() if holder else None, cells, errors)
        )
    rows.sort(key=lambda r: (_WORST.index(r.status), r.target))
    return cols, rows


def _cell(result: TargetResult | None, migration: str) -> Cell:
    if result is None:
        return Cell.UNKNOWN
    if any(d.migration == migration for d in result.drift):
        return Cell.DRIFT
    if result.error is not None and result.error.migration == migration:
        return Cell.FAILED
    if any(m.id == migration for m in result.ran):
        return Cell.RAN
    if any(m.id == migration for m in result.rolled_back):
        return Cell.ROLLED_BACK
    if migration in result.to_roll_back:
        return Cell.TO_ROLL_BACK
    if migration in result.applied_before:
        return Cell.APPLIED
    if migration in result.pending:
        return Cell.PENDING
    # Nothing was read from the target (it failed or was skipped before reading its state).
    return Cell.UNKNOWN if result.status in (Status.FAILED, Status.SKIPPED) else Cell.PENDING


@dataclass(frozen=True, slots=True)
class Level:
    """How many shards stand at one migration of a service: their last applied one."""

    service: str
    migration: str | None  # None: none of the service's migrations applied
    behind: int  # migrations still to apply from there
    targets: tuple[str, ...]


def skew(report: RunReport) -> list[Level]:
    """Version skew per service: shards grouped by the last migration they have, newest first."""
    cols = columns(report)
    levels = []
    for service in dict.fromkeys(c.service for c in cols):
        order = [c.migration for c in cols if c.service == service]
        at: dict[str | None, list[str]] = {}
        for result in report.results:
            if result.service != service or (result.status is Status.SKIPPED and not result.applied_before):
                continue
            have = (set(result.applied_before) | {m.id for m in result.ran}) - {m.id for m in result.rolled_back}
            last = max((order.index(m) for m in have if m in order), default=-1)
            at.setdefault(order[last] if last >= 0 else None, []).append(result.target)
        for migration, targets in sorted(at.items(), key=lambda kv: -1 if kv[0] is None else order.index(kv[0]),
                                         reverse=True):  # fmt: skip
            behind = len(order) - (order.index(migration) + 1 if migration else 0)
            levels.append(Level(service, migration, behind, tuple(sorted(targets))))
    return levels


def render_skew(report: RunReport) -> str:
    """The status matrix for a terminal: shards per migration level, then who is behind, locked or drifted."""
    lines = []
    for level in skew(report):
        where = level.migration or "(nothing applied)"
        state = "current" if level.behind == 0 else f"behind by {level.behind}"
        shown = ", ".join(level.targets[:8]) + (f" (+{len(level.targets) - 8})" if len(level.targets) > 8 else "")
        lines.append(f"  {level.service:<12} {where:<32} {len(level.targets):>6} shard(s)  {state:<14} {shown}")
    locked = sorted({r.target for r in report.results if r.lock_holder is not None})
    drifted = sorted({r.target for r in report.results if r.drift})
    unreachable = sorted({r.target for r in report.results if r.status is Status.FAILED and not r.initialized})
    out = ["version skew (shards by last applied migration):", *lines]
    for label, targets in (("locked", locked), ("drifted", drifted), ("not read", unreachable)):
        if targets:
            out.append(f"{label}: {len(targets)}: {', '.join(targets[:20])}" + (" ..." if len(targets) > 20 else ""))
    return redact("\n".join(out) + "\n")


# ---- markdown ---------------------------------------------------------------------------

_ICONS = {
    Status.UP_TO_DATE: "✅", Status.APPLIED: "✅", Status.ROLLED_BACK: "↩️", Status.PENDING: "🟡", Status.FAILED: "❌",
    Status.DRIFTED: "⚠️", Status.SKIPPED: "⏭️", Status.IN_DOUBT: "❓",
}  # fmt: skip


def render_markdown(report: RunReport, *, detailed: bool = False) -> str:
    """For a pull-request comment or $GITHUB_STEP_SUMMARY: totals, skew, every problem, then the rows."""
    code = exit_code(report, detailed=detailed)
    counts = Counter(r.status for r in report.results)
    head = "✅" if code == 0 else "🟡" if code == 10 else "❌"
    where = f" · slice {report.slice}" if report.slice else ""
    out = [
        f"### {head} fanout {report.command} · `{report.environment}`{where} · exit {code}",
        "",
        f"Run `{report.run_id}` · {report.target_count} targets × {len(report.services)} services · "
        + " · ".join(f"{_ICONS[s]} {counts[s]} {s.value}" for s in Status if counts[s])
        + f" · {sum(len(r.ran) for r in report.results)} applied, {sum(len(r.pending) for r in report.results)} pending",
        "",
    ]
    levels = skew(report)
    if levels:
        out += ["| service | last applied migration | shards | |", "|---|---|---:|---|"]
        for level in levels:
            state = "current" if level.behind == 0 else f"behind by {level.behind}"
            out.append(f"| {level.service} | `{level.migration or '(none)'}` | {len(level.targets)} | {state} |")
        out.append("")
    if report.inspection is not None:
        out += schema_report.render_markdown(report.inspection)
    problems = [
        r for r in report.results if r.status in (Status.FAILED, Status.IN_DOUBT, Status.DRIFTED, Status.SKIPPED)
    ]
    if problems:
        out += [f"**Needs attention ({len(problems)})**", "", "| target | service | status | detail |",
                "|---|---|---|---|"]  # fmt: skip
        out += [_md_row(r, report.mode) for r in problems]
        out.append("")
    notes = source_notes(report)
    if notes:
        out += [f"**Migration set ({len(notes)})**", ""]
        out += [f"- {_md(note)}" for note in notes]
        out.append("")
    rows = [r for r in report.results if r not in problems]
    if rows:
        shown = rows[:MARKDOWN_ROW_LIMIT]
        out += [f"<details><summary>{len(rows)} other result(s)</summary>", "",
                "| target | service | status | detail |", "|---|---|---|---|"]  # fmt: skip
        out += [_md_row(r, report.mode) for r in shown]
        if len(rows) > len(shown):
            out.append(f"| … | | | {len(rows) - len(shown)} more in the JSON report |")
        out += ["", "</details>", ""]
    return redact("\n".join(out))


def _md_row(result: TargetResult, mode: Mode) -> str:
    return (f"| {_md(result.target)} | {_md(result.service)} | {_ICONS[result.status]} {result.status.value} | "
            f"{_md(describe(result, mode))} |")  # fmt: skip


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# ---- JUnit XML ---------------------------------------------------------------------------


def render_junit(report: RunReport) -> str:
    """One test case per target and service, one suite per service, so CI shows failed shards natively."""
    suites = ET.Element("testsuites", name=f"fanout {report.command} {report.environment}")
    total = Counter[str]()
    for service in report.services:
        results = [r for r in report.results if r.service == service]
        suite = ET.SubElement(suites, "testsuite", name=f"{report.environment}.{service}")
        counts = Counter[str]()
        for result in results:
            case = ET.SubElement(
                suite, "testcase", classname=f"fanout.{report.environment}.{service}", name=result.target,
                time=f"{result.seconds:.3f}",
            )  # fmt: skip
            counts["tests"] += 1
            output = describe(result, report.mode)
            if result.status in (Status.FAILED, Status.IN_DOUBT, Status.DRIFTED):
                counts["failures"] += 1
                kind = result.error.kind.value if result.error else "drift"
                failure = ET.SubElement(case, "failure", type=kind, message=output[:500])
                failure.text = output
            elif result.status is Status.SKIPPED:
                counts["skipped"] += 1
                ET.SubElement(case, "skipped", message=output[:500] or "not attempted")
            if output:
                ET.SubElement(case, "system-out").text = output
        for key in ("tests", "failures", "skipped"):
            suite.set(key, str(counts[key]))
            total[key] += counts[key]
        suite.set("errors", "0")
    if report.inspection is not None:
        schema_suite = schema_report.junit_suite(report.inspection, report.environment)
        suites.append(schema_suite)
        for key in ("tests", "failures", "skipped"):
            total[key] += int(schema_suite.get(key, "0"))
    notes = source_notes(report)
    if notes:
        # Lint errors and left-out unpublished migrations fail the set's own suite; warnings are its output.
        suite = ET.SubElement(suites, "testsuite", name=f"{report.environment}.migration-set")
        case = ET.SubElement(suite, "testcase", classname=f"fanout.{report.environment}", name="migration-set")
        failing = [n for n in notes if n.startswith("error") or n.startswith("unpublished")]
        if failing:
            failure = ET.SubElement(case, "failure", type="migration-set", message=failing[0][:500])
            failure.text = "\n".join(failing)
        ET.SubElement(case, "system-out").text = "\n".join(notes)
        for key, value in (("tests", 1), ("failures", 1 if failing else 0), ("skipped", 0), ("errors", 0)):
            suite.set(key, str(value))
            total[key] += value
    for key in ("tests", "failures", "skipped"):
        suites.set(key, str(total[key]))
    suites.set("errors", "0")
    suites.set("time", f"{(report.finished_at - report.started_at).total_seconds():.3f}")
    ET.indent(suites)
    return redact('<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n")


# ---- HTML: the fleet view ------------------------------------------------------------------

_CELL_MARK = {
    Cell.APPLIED: "●", Cell.RAN: "◆", Cell.ROLLED_BACK: "↺", Cell.TO_ROLL_BACK: "◐", Cell.PENDING: "○",
    Cell.FAILED: "✕", Cell.DRIFT: "!", Cell.UNKNOWN: "·",
}  # fmt: skip

_CSS = """
:root{--back:#f76707;--ok:#2f9e44;--ran:#1c7ed6;--pend:#f59f00;--fail:#e03131;--drift:#ae3ec9;--unk:#adb5bd;--bg:#f8f9fa;--fg:#212529}
*{box-sizing:border-box}body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:var(--fg);background:#fff}
header{padding:16px 24px;background:var(--bg);border-bottom:1px solid #dee2e6}
h1{font-size:20px;margin:0 0 4px}.meta{color:#495057}.verdict{font-weight:600}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin-top:12px}
.card{background:#fff;border:1px solid #dee2e6;border-radius:8px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:22px}.card.failed b{color:var(--fail)}.card.drifted b{color:var(--drift)}
.card.skipped b{color:#868e96}.card.pending b{color:var(--pend)}.card.applied b{color:var(--ran)}.card.up-to-date b{color:var(--ok)}
.tools{padding:12px 24px;display:flex;gap:16px;align-items:center;flex-wrap:wrap;border-bottom:1px solid #dee2e6}
.tools input[type=search]{padding:6px 10px;border:1px solid #ced4da;border-radius:6px;width:260px}
.legend span{margin-right:12px;white-space:nowrap}
main{margin:0 24px 24px;overflow:auto;max-height:78vh;border-bottom:1px solid #dee2e6}
table.matrix{border-collapse:separate;border-spacing:0}
.matrix th,.matrix td{border-bottom:1px solid #f1f3f5;padding:3px 6px;text-align:center;white-space:nowrap}
.matrix thead th{position:sticky;top:0;background:#fff;z-index:2;vertical-align:bottom;border-bottom:1px solid #dee2e6}
.matrix thead tr.services th{top:0}.matrix thead tr.services+tr th{top:24px}
.matrix thead th.mig{writing-mode:vertical-rl;transform:rotate(180deg);font-weight:500;font-size:12px;max-height:180px}
.matrix th.svc{border-left:2px solid #dee2e6;font-size:12px;color:#495057}
.matrix td.t{text-align:left;position:sticky;left:0;background:#fff;z-index:1;font-weight:500}
.matrix thead th.t{left:0;z-index:3;text-align:left}
.matrix td.s{text-align:left}
.c{font-size:13px;width:22px}.c.applied{color:var(--ok)}.c.ran{color:var(--ran)}.c.pending{color:var(--pend)}
.c.rolled-back{color:#fff;background:var(--back);border-radius:4px}.c.to-roll-back{color:var(--back)}
.c.failed{color:#fff;background:var(--fail);border-radius:4px}.c.drift{color:#fff;background:var(--drift);border-radius:4px}.c.unknown{color:var(--unk)}
.badge{display:inline-block;border-radius:10px;padding:0 8px;font-size:12px;color:#fff}
.badge.failed{background:var(--fail)}.badge.drifted{background:var(--drift)}.badge.skipped{background:#868e96}
.badge.rolled-back{background:var(--back)}.card.rolled-back b{color:var(--back)}
.badge.pending{background:var(--pend)}.badge.applied{background:var(--ran)}.badge.up-to-date{background:var(--ok)}
td.err{text-align:left;color:var(--fail);font-size:12px;white-space:normal;min-width:320px;max-width:640px}
tr.hidden{display:none}.count{color:#495057}ul.notes{margin:10px 0 0;padding-left:18px;color:#862e9c}
"""

_JS = """
const q=document.getElementById('q'),boxes=[...document.querySelectorAll('.tools input[type=checkbox]')],
rows=[...document.querySelectorAll('#matrix tbody tr')],count=document.getElementById('count');
function apply(){const t=q.value.trim().toLowerCase(),on=new Set(boxes.filter(b=>b.checked).map(b=>b.value));let n=0;
for(const r of rows){const show=on.has(r.dataset.status)&&(!t||r.dataset.search.includes(t));r.classList.toggle('hidden',!show);if(show)n++}
count.textContent=n+' of '+rows.length+' shards shown'}
q.addEventListener('input',apply);boxes.forEach(b=>b.addEventListener('change',apply));apply();
"""


def render_html(report: RunReport, *, detailed: bool = False) -> str:
    """One self-contained file: totals, then a filterable matrix of shards by migrations."""
    cols, rows = matrix(report)
    code = exit_code(report, detailed=detailed)
    counts = Counter(r.status for r in rows)
    schema_notes = schema.target_notes(report.inspection) if report.inspection is not None else {}
    e = html.escape
    verdict = "success" if code == 0 else f"exit {code}"
    title = f"fanout {report.command} · {report.environment} · {report.run_id}"
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<meta name=viewport content='width=device-width,initial-scale=1'><title>{e(title)}</title>",
        f"<style>{_CSS}{schema_report.CSS if report.inspection is not None else ''}</style></head><body>",
        f"<header><h1>fanout {e(report.command)} · {e(report.environment)}"
        + (f" · slice {e(report.slice)}" if report.slice else "")
        + "</h1>",
        f"<div class=meta>run <code>{e(report.run_id)}</code> · {e(report.started_at.isoformat(timespec='seconds'))}"
        f" · {(report.finished_at - report.started_at).total_seconds():.1f}s · services {e(', '.join(report.services))}"
        f" · <span class=verdict data-exit-code={code}>{e(verdict)}</span></div>",
        "<div class=cards>",
        f"<div class=card><b>{len(rows)}</b>shards</div>",
    ]
    for status in _WORST:
        if counts[status]:
            parts.append(f"<div class='card {status.value}'><b>{counts[status]}</b>{status.value}</div>")
    parts.append("</div>")
    notes = source_notes(report)
    if notes:
        parts.append("<ul class=notes>" + "".join(f"<li>{e(note)}</li>" for note in notes) + "</ul>")
    parts.append("</header>")
    if report.inspection is not None:
        parts.append(schema_report.render_html(report.inspection))
    parts.append("<div class=tools><input id=q type=search placeholder='filter by shard, tenant or server'>")
    for status in _WORST:
        parts.append(f"<label><input type=checkbox value={status.value} checked> {status.value}</label>")
    parts.append("<span id=count class=count></span><span class=legend>")
    parts += [f"<span><span class='c {c.value}'>{_CELL_MARK[c]}</span> {c.value}</span>" for c in Cell]
    parts.append("</span></div><main><table id=matrix class=matrix><thead>")
    services = list(dict.fromkeys(c.service for c in cols))
    if len(services) > 1:  # a row naming each service over its migrations
        parts.append("<tr class=services><th class=t></th><th></th>")
        for service in services:
            span = sum(1 for c in cols if c.service == service)
            parts.append(f"<th class=svc colspan={span}>{e(service)}</th>")
        parts.append("<th></th></tr>")
    parts.append("<tr><th class=t>shard</th><th>status</th>")
    parts += [f"<th class=mig title='{e(c.service)}/{e(c.migration)}'>{e(c.migration)}</th>" for c in cols]
    parts.append("<th>detail</th>")
    parts.append("</tr></thead><tbody>")
    for row in rows:
        search = " ".join([row.target, row.server, *row.tenants]).lower()
        detail = "; ".join(row.errors) or (f"locked by {row.locked_by}" if row.locked_by else "")
        detail = "; ".join(filter(None, [detail, schema_notes.get(row.target, "")]))
        tenants = f" title='tenants: {e(', '.join(row.tenants))}'" if row.tenants else ""
        parts.append(
            f"<tr data-target='{e(row.target)}' data-status={row.status.value} data-search='{e(search)}'>"
            f"<td class=t{tenants}>{e(row.target)}</td>"
            f"<td class=s><span class='badge {row.status.value}'>{row.status.value}</span></td>"
        )
        parts += [
            f"<td class='c {cell.value}' data-migration='{e(col.migration)}' data-state={cell.value} "
            f"title='{e(col.migration)}: {cell.value}'>{_CELL_MARK[cell]}</td>"
            for col, cell in zip(cols, row.cells, strict=True)
        ]
        parts.append(f"<td class=err>{e(detail)}</td></tr>")
    parts.append("</tbody></table></main>")
    data = {"schema": "fanout/report/v1", "run_id": report.run_id, "exit_code": code}
    parts.append(f"<script type=application/json id=summary>{e(json.dumps(data))}</script>")
    parts.append(f"<script>{_JS}</script></body></html>")
    return redact("".join(parts))
