"""``python -m client job ...``: asynchronous batch jobs from a terminal.

python -m client job submit photos/ --model resnet50 --wait     # a folder, zipped on the fly
python -m client job submit photos.tar.gz --models vgg16,resnet50 --vote soft
python -m client job status JOB_ID
python -m client job results JOB_ID --format csv --output results.csv
python -m client job cancel JOB_ID
python -m client job list
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests
from tqdm import tqdm

from client import Client, ImagerecError


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    job = commands.add_parser("job", help="asynchronous batch jobs: submit, status, results, cancel, list")
    actions = job.add_subparsers(dest="job_command", required=True)

    submit = actions.add_parser("submit", help="start a job on a folder or a zip/tar archive")
    submit.add_argument("source", help="a folder (zipped on the fly) or a .zip/.tar/.tar.gz file")
    submit.add_argument("--model", default="resnet50", help="a model name or 'ensemble'")
    submit.add_argument("--models", help="an ensemble of these members, e.g. vgg16,resnet50")
    submit.add_argument("--vote", choices=("soft", "hard", "weighted"))
    submit.add_argument("--top-k", type=int)
    submit.add_argument("--callback-url", help="the fleet POSTs the finished job here")
    submit.add_argument("--wait", action="store_true", help="show progress until the job finishes")
    submit.add_argument("--interval", type=float, default=1.0, help="seconds between polls with --wait")
    submit.add_argument("--quiet", action="store_true", help="no progress bar with --wait")

    status = actions.add_parser("status", help="print a job's state and progress (JSON)")
    status.add_argument("job_id")

    results = actions.add_parser("results", help="stream a job's results to stdout or a file")
    results.add_argument("job_id")
    results.add_argument("--format", choices=("json", "jsonl", "csv"), default="json")
    results.add_argument("--output", type=Path, help="write here instead of stdout")

    cancel = actions.add_parser("cancel", help="cancel a pending or running job")
    cancel.add_argument("job_id")

    listing = actions.add_parser("list", help="recent jobs, newest first")
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--before", help="the cursor printed at the end of the previous page")
    listing.add_argument("--json", action="store_true", help="print the whole answer")


def run(client: Client, args: argparse.Namespace) -> int:
    command = {"submit": _submit, "status": _status, "results": _results, "cancel": _cancel, "list": _list}
    return reporting_errors(client, lambda: command[args.job_command](client, args))


def stopped_watching(job_id: str) -> int:
    """Ctrl-C while waiting: the job carries on; say how to stop it. The exit status (130)."""
    print(
        f"\nstopped watching; job {job_id} carries on (python -m client job cancel {job_id} stops it)",
        file=sys.stderr,
    )
    return 130


def reporting_errors(client: Client, action: Callable[[], int]) -> int:
    """``action``'s exit status; a refusal (with each problem it names), an unreadable path or an
    unreachable fleet printed on stderr instead, and 1."""
    try:
        return action()
    except ImagerecError as exc:
        print(f"error: {exc.message or exc}", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
    except (OSError, ValueError) as exc:  # an unreadable path, an empty folder, an unreachable fleet
        reason = f"cannot reach {client.url}" if isinstance(exc, requests.ConnectionError) else exc
        print(f"error: {reason}", file=sys.stderr)
    return 1


def _submit(client: Client, args: argparse.Namespace) -> int:
    members = [m.strip() for m in (args.models or "").split(",") if m.strip()]
    job = client.submit_job(
        args.source,
        model=args.model,
        models=members,
        vote=args.vote,
        top_k=args.top_k,
        callback_url=args.callback_url,
    )
    print(job["job_id"], flush=True)
    if not args.wait:
        return 0
    try:
        with tqdm(
            total=job["total"],
            unit="img",
            disable=args.quiet,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} {postfix}",
        ) as progress:

            def show(seen: dict[str, Any]) -> None:
                progress.total = seen["total"]
                progress.n = seen["done"] + seen["failed"]
                eta = f", ETA {seen['eta_s']:.0f} s" if seen.get("eta_s") is not None else ""
                progress.set_postfix_str(f"{seen['status']}, {seen['images_per_s']} img/s{eta}")

            job = client.wait_for_job(job["job_id"], interval_s=args.interval, on_update=show)
    except KeyboardInterrupt:
        return stopped_watching(job["job_id"])
    print(
        f"job {job['job_id']} {job['status']}: {job['done']} done, {job['failed']} failed of {job['total']}",
        file=sys.stderr,
    )
    return 0 if job["status"] == "completed" else 1


def _status(client: Client, args: argparse.Namespace) -> int:
    print(json.dumps(client.job_status(args.job_id), indent=2))
    return 0


def _results(client: Client, args: argparse.Namespace) -> int:
    if args.output is None:
        status = client.job_results(args.job_id, sys.stdout.buffer, format=args.format)
        sys.stdout.buffer.flush()
    else:
        # Written beside the file and renamed when complete: an error leaves no half file behind.
        partial = args.output.with_name(args.output.name + ".part")
        try:
            with partial.open("wb") as out:
                status = client.job_results(args.job_id, out, format=args.format)
            partial.replace(args.output)
        finally:
            partial.unlink(missing_ok=True)
    if status != "completed":
        print(f"note: the job is {status}; these results are not final", file=sys.stderr)
    return 0


def _cancel(client: Client, args: argparse.Namespace) -> int:
    job = client.cancel_job(args.job_id)
    print(
        f"job {job['job_id']} {job['status']}: {job['done']} done, {job['failed']} failed of {job['total']}"
    )
    return 0


def _list(client: Client, args: argparse.Namespace) -> int:
    page = client.list_jobs(limit=args.limit, before=args.before)
    if args.json:
        print(json.dumps(page, indent=2))
        return 0
    for job in page["jobs"]:
        progress = f"{job['done'] + job['failed']}/{job['total']}"
        print(f"{job['job_id']}  {job['status']:<9}  {job['model']:<12}  {progress:>11}  {job['created_at']}")
    if page.get("next"):
        cursor = parse_qs(urlsplit(page["next"]).query).get("before", [""])[0]
        print(f"more: python -m client job list --before {cursor}", file=sys.stderr)
    return 0
