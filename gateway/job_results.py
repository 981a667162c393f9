"""A job's results as clients read them, streamed in input order: JSON (the job's description
and its ``results``), JSON lines, or CSV (one row per image, top-k labels and scores)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

from common.jobs.views import describe
from common.outcomes import Outcome, Predicted

FORMATS = {"json": "application/json", "jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}


def render(job: dict[str, Any], outcomes: Iterator[Outcome], form: str) -> Iterator[str]:
    """``outcomes`` of ``job`` in ``form`` (one of ``FORMATS``)."""
    if form == "jsonl":
        return (json.dumps(outcome.to_json()) + "\n" for outcome in outcomes)
    if form == "csv":
        return _results_csv(job, outcomes)
    return _results_json(job, outcomes)


def _results_json(job: dict[str, Any], outcomes: Iterator[Outcome]) -> Iterator[str]:
    head = {k: v for k, v in describe(job).items() if k != "links"}
    yield json.dumps(head)[:-1] + ', "results": ['
    for n, outcome in enumerate(outcomes):
        yield ("," if n else "") + json.dumps(outcome.to_json())
    yield "]}\n"


def _cell(value: Any) -> Any:
    """A CSV cell a spreadsheet will not run: text starting like a formula (a custom model's class
    names and the images' names come from users) gets a leading apostrophe (OWASP's advice)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _results_csv(job: dict[str, Any], outcomes: Iterator[Outcome]) -> Iterator[str]:
    top_k = int(job.get("top_k") or 1)
    header = ["index", "name", "status"]
    for rank in range(1, top_k + 1):
        header += [f"label_{rank}", f"score_{rank}"]
    header += ["error_code", "error_message"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)

    def row(values: list[Any]) -> str:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow([_cell(value) for value in values])
        return buffer.getvalue()

    yield row(header)
    for outcome in outcomes:
        values: list[Any] = [outcome.index, outcome.name]
        if isinstance(outcome, Predicted):
            values.append("ok")
            for rank in range(top_k):
                found = outcome.labels[rank] if rank < len(outcome.labels) else None
                values += [found.label, found.score] if found else ["", ""]
            values += ["", ""]
        else:
            values += ["error", *[""] * (2 * top_k), outcome.error.code, outcome.error.message]
        yield row(values)
