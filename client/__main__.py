"""``python -m client``: classify photos with the imagerec fleet from a terminal.

python -m client predict photo.jpg --model ensemble
python -m client predict photo.jpg --parents --confidence 0.8 --include animal
python -m client explain photo.jpg --model resnet50 --grid 7 --out heatmap.png
python -m client classify-dir photos/ --out results.csv --model resnet50 --concurrency 8
python -m client models
python -m client job submit photos/ --model resnet50 --wait   # a batch job (see client/job_commands.py)
python -m client train pets/ --name pets --wait               # a custom model (see client/train_commands.py)
python -m client models delete pets
python -m client keys create alice --scope jobs                # API keys (admin): client/key_commands.py
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

from client import Client, ImagerecError, find_key, job_commands, key_commands, train_commands

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def _predict(client: Client, args: argparse.Namespace) -> int:
    try:
        body = client.predict(
            args.image,
            model=args.model,
            top_k=args.top_k,
            vote=args.vote,
            parents=args.parents,
            confidence=args.confidence,
            include=[e for e in (args.include or "").split(",") if e],
            exclude=[e for e in (args.exclude or "").split(",") if e],
        )
    except ImagerecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    weights = body.get("weights")
    note = "  (RANDOM weights: labels are meaningless)" if "random" in json.dumps(weights) else ""
    print(f"{args.image}  model={body['model']}{note}")
    if "hedged" in body:
        hedged = body["hedged"]
        print(f"  at least {hedged['confidence']:.0%} sure: {hedged['name']} ({hedged['score']:.2%})")
    for prediction in body["predictions"]:
        print(f"  {prediction['score']:7.2%}  {prediction['label']}")
        if "parents" in prediction:
            print("           " + " > ".join(parent["name"] for parent in prediction["parents"]))
    return 0


def _explain(client: Client, args: argparse.Namespace) -> int:
    try:
        body = client.explain(args.image, model=args.model, grid=args.grid, class_id=args.class_id)
    except ImagerecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    Path(args.out).write_bytes(base64.b64decode(body["overlay_png"]))
    chosen = body["class"]
    print(f"{args.image}  model={body['model']}  class={chosen['label']} ({chosen['score']:.2%})")
    print(f"  {body['passes']} forward passes; score drop per cell (hiding it):")
    for row in body["drops"]:
        print("  " + " ".join(f"{value:+.3f}" for value in row))
    if "note" in body:
        print(f"  note: {body['note']}")
    print(f"  overlay -> {args.out}")
    return 0


def _classify_dir(client: Client, args: argparse.Namespace) -> int:
    paths = sorted(p for p in Path(args.folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        print(f"no images under {args.folder}", file=sys.stderr)
        return 1
    failed = 0
    with (
        open(args.out, "w", newline="") as out,
        tqdm(total=len(paths), unit="img", disable=args.quiet) as progress,
    ):
        writer = csv.writer(out)
        writer.writerow(["path", "label", "score", "class_id", "model", "error"])
        answers = client.predict_many(
            paths,
            concurrency=args.concurrency,
            on_done=lambda: progress.update(1),
            model=args.model,
            top_k=1,
        )
        for path, answer in answers:
            if isinstance(answer, ImagerecError):
                failed += 1
                writer.writerow([path, "", "", "", args.model, f"{answer.code}: {answer.message}"])
            else:
                best = answer["predictions"][0]
                writer.writerow(
                    [path, best["label"], f"{best['score']:.6f}", best["class_id"], answer["model"], ""]
                )
    print(f"{len(paths) - failed} classified, {failed} failed -> {args.out}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=os.environ.get("IMAGEREC_URL", "http://localhost:8080"))
    parser.add_argument(
        "--key",
        default=None,
        help="API key (default: IMAGEREC_API_KEY, else run/admin.key of a fleet started here)",
    )
    parser.add_argument("--retries", type=int, default=5, help="retries on 429/503 (after Retry-After)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    commands = parser.add_subparsers(dest="command", required=True)

    predict = commands.add_parser("predict", help="classify one image")
    predict.add_argument("image")
    predict.add_argument("--model", default="resnet50", help="a model name or 'ensemble'")
    predict.add_argument("--top-k", type=int, default=5)
    predict.add_argument("--vote", choices=("soft", "hard", "weighted"))
    predict.add_argument("--json", action="store_true", help="print the whole answer")
    predict.add_argument("--parents", action="store_true", help="each label's ancestors (ImageNet)")
    predict.add_argument("--confidence", type=float, help="add the most specific answer this sure")
    predict.add_argument("--include", help="only classes under these (ids, names, categories: animal,...)")
    predict.add_argument("--exclude", help="no classes under these")

    explain = commands.add_parser("explain", help="where in a photo a class's score comes from")
    explain.add_argument("image")
    explain.add_argument("--model", default="resnet50")
    explain.add_argument("--grid", type=int, help="cells per side (the service's default: 7)")
    explain.add_argument("--class-id", help="the class to explain (default: the top one)")
    explain.add_argument("--out", default="explanation.png", help="where the PNG overlay goes")

    folder = commands.add_parser("classify-dir", help="classify every image under a folder into a CSV")
    folder.add_argument("folder")
    folder.add_argument("--out", default="results.csv")
    folder.add_argument("--model", default="resnet50")
    folder.add_argument("--concurrency", type=int, default=4)
    folder.add_argument("--quiet", action="store_true", help="no progress bar")

    models = commands.add_parser("models", help="list the models and their weights; delete a custom one")
    job_commands.add_parser(commands)
    train_commands.add_parser(commands, models)
    key_commands.add_parser(commands)
    args = parser.parse_args(argv)
    client = Client(args.url, timeout_s=args.timeout, retries=args.retries, api_key=args.key or find_key())
    if args.command == "predict":
        return _predict(client, args)
    if args.command == "explain":
        return _explain(client, args)
    if args.command == "classify-dir":
        return _classify_dir(client, args)
    if args.command == "job":
        return job_commands.run(client, args)
    if args.command == "keys":
        return key_commands.run(client, args)
    if args.command == "train" or getattr(args, "models_command", None):
        return train_commands.run(client, args)
    print(json.dumps(client.models(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
