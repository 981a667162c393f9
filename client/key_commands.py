"""``python -m client keys ...``: API keys, for the admin (scope ``admin``).

python -m client keys create alice --scope predict --scope jobs --quota active_jobs=2
python -m client keys list
python -m client keys revoke 3f9a0c1d2e4b
"""

from __future__ import annotations

import argparse
import sys

from client import Client
from client.job_commands import reporting_errors

SCOPES = ("predict", "jobs", "train", "admin")


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser("keys", help="make, list and revoke API keys (admin)")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    create = actions.add_parser("create", help="make a key; it is printed once, never again")
    create.add_argument("name")
    create.add_argument(
        "--scope", action="append", choices=SCOPES, help="repeat for several (default: predict)"
    )
    create.add_argument("--quota", action="append", default=[], metavar="NAME=N", help="e.g. active_jobs=2")
    actions.add_parser("list", help="every key: id, name, scopes, quotas (never a secret)")
    revoke = actions.add_parser("revoke", help="revoke a key by its id (refused everywhere within seconds)")
    revoke.add_argument("id")


def run(client: Client, args: argparse.Namespace) -> int:
    return reporting_errors(client, lambda: COMMANDS[args.keys_command](client, args))


def _create(client: Client, args: argparse.Namespace) -> int:
    quotas = {}
    for pair in args.quota:
        name, _, value = pair.partition("=")
        if not value.isdigit():
            print(f"error: --quota takes NAME=N, got {pair!r}", file=sys.stderr)
            return 2
        quotas[name] = int(value)
    made = client.create_key(args.name, args.scope or ["predict"], quotas)
    print(made["key"])
    print(
        f"id {made['id']}: {made['name']}, scopes {','.join(made['scopes'])} (the key above is shown once)",
        file=sys.stderr,
    )
    return 0


def _list(client: Client, args: argparse.Namespace) -> int:
    for key in client.list_keys():
        quotas = ",".join(f"{k}={v}" for k, v in key["quotas"].items()) or "defaults"
        print(f"{key['id']}  {key['name']:<24}  {','.join(key['scopes']):<22}  quotas {quotas}")
    return 0


def _revoke(client: Client, args: argparse.Namespace) -> int:
    gone = client.revoke_key(args.id)["revoked"]
    print(f"revoked {gone['id']} ({gone['name']})")
    return 0


COMMANDS = {"create": _create, "list": _list, "revoke": _revoke}
