"""Plans and status rows as text tables, JSON and Markdown. Pure string building."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from reconciler.model import (
    Accept,
    Action,
    ActionKind,
    Held,
    NewCertificate,
    Noop,
    Plan,
    Request,
    RetireGeneration,
    Revoke,
    Waiting,
    format_serial,
    format_time,
)

_PLAN_WORDS = {
    ActionKind.CA: "CA to create",
    ActionKind.ISSUE: "to issue",
    ActionKind.REISSUE: "to re-issue",
    ActionKind.RENEW: "to renew",
    ActionKind.REVOKE: "to revoke",
    ActionKind.CRL: "CRL to sign",
    ActionKind.REPAIR: "to repair",
    ActionKind.REQUEST: "CSR to make",
    ActionKind.ACCEPT: "to accept",
    ActionKind.WAITING: "waiting for a signed certificate",
    ActionKind.TRUST: "trust root to review",
}
_DONE_WORDS = {
    ActionKind.CA: "CA created",
    ActionKind.ISSUE: "issued",
    ActionKind.REISSUE: "re-issued",
    ActionKind.RENEW: "renewed",
    ActionKind.REVOKE: "revoked",
    ActionKind.CRL: "CRL refreshed",
    ActionKind.REPAIR: "repaired",
    ActionKind.REQUEST: "CSR made",
    ActionKind.ACCEPT: "accepted",
}


def _count_words(plan: Plan, words: dict[ActionKind, str]) -> list[str]:
    counts = plan.counts()
    parts = []
    for kind, word in words.items():
        if counts.get(kind):
            single = kind in (ActionKind.CA, ActionKind.CRL)
            parts.append(word if single else f"{counts[kind]} {word}")
    return parts


def summary(plan: Plan) -> str:
    """'2 to issue, 1 to renew, CRL to sign (5 unchanged)' or 'no changes (7 unchanged)'."""
    parts = _count_words(plan, _PLAN_WORDS)
    unchanged = plan.counts().get(ActionKind.NOOP, 0)
    return f"{', '.join(parts) or 'no changes'} ({unchanged} unchanged)"


def done_summary(plan: Plan) -> str:
    """'2 issued, 1 renewed, 1 revoked, CRL refreshed', as a commit's summary line says it."""
    return ", ".join(_count_words(plan, _DONE_WORDS)) or "no changes"


def _serial(serial: int | None, *, short: bool = True) -> str:
    if serial is None:
        return "-"
    return format_serial(serial)[:12] if short else format_serial(serial)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def _in_place(action: Action) -> int | None:
    """The serial of the certificate an action is about (the one in place now)."""
    match action:
        case NewCertificate(replaces=serial) | Revoke(replaces=serial) | Request(replaces=serial):
            return serial
        case Accept(entry=entry):
            return entry.serial
        case RetireGeneration(replaces=serial) | Noop(replaces=serial):
            return serial
    return None


def housekeeping(plan: Plan) -> str | None:
    """What every apply does without counting it as a change: restore file modes."""
    if not plan.modes:
        return None
    shown = [f"{path} is {mode:04o}, should be {want:04o}" for path, mode, want in plan.modes[:5]]
    if len(plan.modes) > 5:
        shown.append(f"and {len(plan.modes) - 5} more")
    count = len(plan.modes)
    return "; ".join(
        [f"{count} file mode{'s' if count > 1 else ''} to restore (git keeps no modes)", *shown]
    )


def plan_text(plan: Plan) -> str:
    rows = [
        (a.kind.value, a.subject, _serial(_in_place(a)), "; ".join(a.reasons)) for a in plan.actions
    ]
    text = f"Plan at {format_time(plan.now)}: {summary(plan)}\n\n"
    if plan.rotation is not None:
        text += f"{plan.rotation}.\n\n"
    text += _table(("ACTION", "SUBJECT", "SERIAL", "REASONS"), rows)
    chore = housekeeping(plan)
    if chore is not None:
        text += f"\n\nHousekeeping (every apply does it): {chore}"
    for blocker in plan.blockers:
        text += f"\n\nBLOCKED: {blocker}"
    return text + "\n"


def _action_json(action: Action) -> dict[str, Any]:
    serial = _in_place(action)
    data: dict[str, Any] = {
        "kind": action.kind.value,
        "subject": action.subject,
        "serial": _serial(serial, short=False) if serial is not None else None,
        "reasons": list(action.reasons),
    }
    if isinstance(action, NewCertificate):
        data["not_after"] = format_time(action.issuance.not_after)
        if action.supersede:
            data["supersede"] = [format_serial(s) for s in action.supersede]
    if isinstance(action, NewCertificate | Revoke | RetireGeneration) and action.revoke:
        data["revoke"] = [format_serial(r.serial) for r in action.revoke]
    return data


def plan_json(plan: Plan) -> str:
    data = {
        "now": format_time(plan.now),
        "changes": len(plan.changes),
        "summary": summary(plan),
        "blockers": list(plan.blockers),
        "rotation": plan.rotation,
        "housekeeping": [chore] if (chore := housekeeping(plan)) else [],
        "actions": [_action_json(action) for action in plan.actions],
    }
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


_MARKDOWN = str.maketrans(
    {
        **{char: f"\\{char}" for char in "\\`*_{}[]()#+!|~"},
        "<": "&lt;",
        ">": "&gt;",
        "&": "&amp;",
        "\n": " ",
    }
)


def _md(text: str) -> str:
    """Text a pull request wrote (names, addresses) as Markdown that shows it and does nothing
    else: no HTML, no link, no image, no table cell break, no code span to break out of."""
    return text.translate(_MARKDOWN)


def plan_markdown(plan: Plan) -> str:
    lines = [f"### Certificate plan: {summary(plan)}", ""]
    if plan.rotation is not None:
        lines += [f"**{_md(plan.rotation)}.**", ""]
    for blocker in plan.blockers:
        lines += [f"> **Blocked:** {_md(blocker)}", ""]
    changes = [a for a in plan.actions if not isinstance(a, Noop) or isinstance(a, Waiting)]
    unchanged = [a for a in plan.actions if isinstance(a, Noop) and a not in changes]
    if changes:
        lines += ["| Action | Subject | Serial | Reasons |", "|---|---|---|---|"]
        lines += [
            f"| **{a.kind.value}** | {_md(a.subject)} | `{_serial(_in_place(a))}` | "
            f"{_md('; '.join(a.reasons))} |"
            for a in changes
        ]
    else:
        lines.append("No changes: every certificate matches users.yaml.")
    if unchanged:
        lines += [
            "",
            f"<details><summary>{len(unchanged)} unchanged</summary>",
            "",
            "| Subject | Serial | State |",
            "|---|---|---|",
        ]
        lines += [
            f"| {_md(a.subject)} | `{_serial(a.replaces)}` | {_md('; '.join(a.reasons))} |"
            for a in unchanged
        ]
        lines += ["", "</details>"]
    chore = housekeeping(plan)
    if chore is not None:
        lines += ["", f"Housekeeping: {_md(chore)}"]
    lines += ["", f"_Planned at {format_time(plan.now)}._"]
    return "\n".join(lines) + "\n"


def days_left(row: Held, now: datetime) -> int | None:
    if row.not_after is None:
        return None
    return math.floor((row.not_after - now) / timedelta(days=1))


def status_text(rows: Sequence[Held], now: datetime) -> str:
    table = [
        (
            r.kind,
            r.name,
            f"#{r.serial}" if r.kind == "crl" and r.serial is not None else _serial(r.serial),
            format_time(r.not_after) if r.not_after else "-",
            str(days) if (days := days_left(r, now)) is not None else "-",
            r.standing.value,
            r.detail,
        )
        for r in rows
    ]
    return _table(("KIND", "NAME", "SERIAL", "NOT AFTER", "DAYS", "STATE", "DETAIL"), table) + "\n"


def status_json(rows: Sequence[Held], now: datetime) -> str:
    data = [
        {
            "kind": r.kind,
            "name": r.name,
            "serial": (str(r.serial) if r.kind == "crl" else format_serial(r.serial))
            if r.serial is not None
            else None,
            "not_after": format_time(r.not_after) if r.not_after else None,
            "days_left": days_left(r, now),
            "state": r.standing.value,
            "detail": r.detail,
        }
        for r in rows
    ]
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


_PROMETHEUS_HELP = {
    "reconciler_certificate_expiry_timestamp_seconds": (
        "notAfter of the CA and of each certificate on disk, as a Unix time."
    ),
    "reconciler_crl_next_update_timestamp_seconds": (
        "nextUpdate of the CRL: PostgreSQL refuses every client certificate after it."
    ),
    "reconciler_last_success_timestamp_seconds": "When apply last finished without error.",
}


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus(rows: Sequence[Held], last_success: float | None, environment: str) -> str:
    """node_exporter textfile: expiry per current certificate, CRL next update, last success.
    Every sample carries the environment (the state directory's name): environments may hold
    the same names, and node_exporter refuses the same series twice."""
    env = f'environment="{_label(environment)}"'
    samples: dict[str, list[str]] = {name: [] for name in _PROMETHEUS_HELP}
    for row in rows:
        if row.not_after is None or row.standing.value in ("superseded", "revoked"):
            continue
        value = f"{row.not_after.timestamp():.0f}"
        if row.kind == "crl":
            labels = f'{env},name="{_label(row.name)}"'  # a CA rotation has two CRLs
            samples["reconciler_crl_next_update_timestamp_seconds"].append(f"{{{labels}}} {value}")
            continue
        labels = (
            f'{env},kind="{row.kind}",name="{_label(row.name)}",'
            f'serial="{_serial(row.serial, short=False)}",state="{row.standing.value}"'
        )
        samples["reconciler_certificate_expiry_timestamp_seconds"].append(f"{{{labels}}} {value}")
    if last_success is not None:
        samples["reconciler_last_success_timestamp_seconds"].append(f"{{{env}}} {last_success:.0f}")
    lines = []
    for name, values in samples.items():
        if not values:
            continue
        lines += [f"# HELP {name} {_PROMETHEUS_HELP[name]}", f"# TYPE {name} gauge"]
        lines += [f"{name}{v}" for v in values]
    return "\n".join(lines) + "\n"


def last_success_in(textfile: str) -> float | None:
    """The last-success value an earlier textfile holds, so status keeps it."""
    for line in textfile.splitlines():
        if line.startswith("reconciler_last_success_timestamp_seconds"):
            try:
                return float(line.split()[-1])
            except (IndexError, ValueError):
                return None
    return None
