"""The schema inspection (`inspect`, `verify --schema`) in every report format: text,
markdown, JUnit test cases and the HTML fleet view's section. Pure, like `fanout.formats`,
which calls these; the callers redact.
"""

from __future__ import annotations

import html
import xml.etree.ElementTree as ET

from fanout.schema import LARGEST, Inspection, SchemaGroup, version_label

TARGETS_SHOWN = 8  # per reference group in text and markdown; an outlier group lists more
OUTLIER_TARGETS_SHOWN = 50


def reference_label(inspection: Inspection) -> str:
    if inspection.reference == LARGEST:
        return "the largest group of each version"
    if inspection.reference == "build":
        return "the schema the migration set builds (its version); the largest group of other versions"
    return f"the group of {inspection.reference} (its version); the largest group of other versions"


def verdict(group: SchemaGroup) -> str:
    return "reference" if group.reference else f"differs from {group.compared_with}"


def _names(group: SchemaGroup) -> str:
    limit = TARGETS_SHOWN if group.reference else OUTLIER_TARGETS_SHOWN
    shown = ", ".join(group.targets[:limit])
    return shown + (f" (+{len(group.targets) - limit})" if len(group.targets) > limit else "")


def render_text(inspection: Inspection) -> str:
    lines = [f"schema groups (by applied version and live schema; reference: {reference_label(inspection)}):"]
    for g in inspection.groups:
        lines.append(
            f"  group {g.id:<3} {version_label(g.version):<40} {len(g.targets):>5} shard(s)  {verdict(g):<22}"
            f" fp {g.fingerprint[:12]}  {_names(g)}"
        )
        lines += [f"      - {d.detail}" for d in g.differences]
    lines += [f"note: {note}" for note in inspection.notes]
    outliers = inspection.outliers
    if outliers:
        shown = ", ".join(outliers[:20]) + (" ..." if len(outliers) > 20 else "")
        lines.append(f"schema differs on {len(outliers)} shard(s): {shown}")
    else:
        lines.append("every shard has its version's reference schema")
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(inspection: Inspection) -> list[str]:
    out = [
        f"**Schema** · {len(inspection.groups)} group(s) · {len(inspection.outliers)} shard(s) differ · "
        f"reference: {reference_label(inspection)}",
        "",
        "| group | version | shards | | fingerprint |",
        "|---:|---|---:|---|---|",
    ]
    for g in inspection.groups:
        icon = "✅" if g.reference else "⚠️"
        out.append(
            f"| {g.id} | `{_md(version_label(g.version))}` | {len(g.targets)} | {icon} {_md(verdict(g))} | "
            f"`{g.fingerprint[:12]}` |"
        )
    out.append("")
    for g in inspection.groups:
        if g.reference:
            continue
        out.append(f"**Group {g.id}** ({_md(_names(g))}) differs from {g.compared_with}:")
        out.append("")
        out += [f"- {_md(d.detail)}" for d in g.differences]
        out.append("")
    out += [f"> note: {_md(note)}" for note in inspection.notes]
    return out


def junit_suite(inspection: Inspection, environment: str) -> ET.Element:
    """A test case per inspected shard; a shard whose schema differs from its reference fails."""
    suite = ET.Element("testsuite", name=f"{environment}.schema")
    failures = 0
    tests = 0
    for g in inspection.groups:
        for target in g.targets:
            tests += 1
            case = ET.SubElement(suite, "testcase", classname=f"fanout.{environment}.schema", name=target, time="0")
            summary = f"group {g.id} at {version_label(g.version)}: {verdict(g)}"
            if not g.reference:
                failures += 1
                text = "\n".join(d.detail for d in g.differences)
                first = g.differences[0].detail if g.differences else summary
                failure = ET.SubElement(case, "failure", type="schema", message=first[:500])
                failure.text = f"{summary}\n{text}"
            ET.SubElement(case, "system-out").text = summary
    suite.set("tests", str(tests))
    suite.set("failures", str(failures))
    suite.set("skipped", "0")
    suite.set("errors", "0")
    return suite


CSS = """
section.schema{margin:16px 24px}section.schema h2{font-size:16px;margin:0 0 8px}
table.groups{border-collapse:collapse}table.groups th,table.groups td{border-bottom:1px solid #f1f3f5;padding:4px 8px;
text-align:left;vertical-align:top}table.groups td.n{text-align:right}.groups ul{margin:4px 0 0 16px;padding:0}
.groups .diff{color:var(--drift)}.groups details{max-width:640px}
"""


def render_html(inspection: Inspection) -> str:
    """The fleet view's schema section: every group, its verdict, its shards and each outlier's differences."""
    e = html.escape
    parts = [
        "<section class=schema id=schema>",
        f"<h2>Schema · {len(inspection.groups)} group(s) · {len(inspection.outliers)} shard(s) differ</h2>",
        f"<div class=meta>reference: {e(reference_label(inspection))}</div>",
        "<table class=groups><thead><tr><th>group</th><th>version</th><th>shards</th><th>verdict</th>"
        "<th>fingerprint</th><th>differences</th></tr></thead><tbody>",
    ]
    for g in inspection.groups:
        state = "up-to-date" if g.reference else "drifted"
        targets = "".join(f"<li>{e(t)}</li>" for t in g.targets)
        differences = "".join(f"<li class=diff>{e(d.detail)}</li>" for d in g.differences)
        parts.append(
            f"<tr data-group={g.id} data-reference={'true' if g.reference else 'false'}>"
            f"<td class=n>{g.id}</td><td><code>{e(version_label(g.version))}</code></td>"
            f"<td><details><summary>{len(g.targets)}</summary><ul>{targets}</ul></details></td>"
            f"<td><span class='badge {state}'>{e(verdict(g))}</span></td><td><code>{e(g.fingerprint[:12])}</code></td>"
            f"<td>{'<ul>' + differences + '</ul>' if differences else ''}</td></tr>"
        )
    parts.append("</tbody></table>")
    parts += [f"<p class=meta>note: {e(note)}</p>" for note in inspection.notes]
    parts.append("</section>")
    return "".join(parts)
