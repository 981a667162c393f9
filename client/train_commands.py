"""``python -m client train ...``: custom models trained on your photos, from a terminal.

python -m client train pets/ --name pets --wait     # one folder per class, zipped on the fly
python -m client train pets.tar.gz --name pets --base vgg16 --epochs 30 --validation-split 0.25 --augment
python -m client models delete pets                 # a custom model, every version
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tqdm import tqdm

from client import Client
from client.job_commands import reporting_errors, stopped_watching

BASES = ("vgg16", "resnet50", "inceptionv3")
SHOWN_SKIPPED = 10  # skipped files listed by name; the rest are counted
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} {postfix}"
NOTES = {"queued": "waiting for a training worker", "evaluating": "evaluating", "publishing": "publishing"}


def add_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], models: argparse.ArgumentParser
) -> None:
    """``train``, and ``delete`` under ``models`` (which still lists the models without it)."""
    train = commands.add_parser("train", help="train a custom model on one folder of photos per class")
    train.add_argument("source", help="a folder of class folders (zipped on the fly) or a .zip/.tar/.tar.gz")
    train.add_argument("--name", required=True, help="the new model's name (predict --model NAME)")
    train.add_argument("--base", choices=BASES, default="resnet50", help="the network it learns on top of")
    train.add_argument("--epochs", type=int, help="the fleet's default unless given")
    train.add_argument("--validation-split", type=float, help="share of each class held out (0 to 0.5)")
    train.add_argument("--augment", action="store_true", help="train on flipped and cropped views too")
    train.add_argument(
        "--fine-tune-layers",
        type=int,
        default=0,
        metavar="N",
        help="train the base's last N layers too (a model with a backbone of its own; default 0: a head)",
    )
    train.add_argument("--public", action="store_true", help="every caller may use it (default: you alone)")
    train.add_argument("--wait", action="store_true", help="show progress until the model is served")
    train.add_argument("--interval", type=float, default=1.0, help="seconds between polls with --wait")
    train.add_argument("--quiet", action="store_true", help="no progress bars with --wait")

    actions = models.add_subparsers(dest="models_command", metavar="{delete,share}")
    delete = actions.add_parser("delete", help="remove a custom model, every version")
    delete.add_argument("name")
    share = actions.add_parser("share", help="make a custom model of yours public (--private: yours alone)")
    share.add_argument("name")
    share.add_argument("--private", action="store_true")


def run(client: Client, args: argparse.Namespace) -> int:
    actions = {"delete": _delete, "share": _share}
    action = _train if args.command == "train" else actions[args.models_command]
    return reporting_errors(client, lambda: action(client, args))


def _share(client: Client, args: argparse.Namespace) -> int:
    shared = client.share_model(args.name, public=not args.private)
    print(f"{shared['name']} is now {'public' if shared['public'] else 'private'}")
    return 0


def _train(client: Client, args: argparse.Namespace) -> int:
    job = client.train(
        args.source,
        name=args.name,
        base=args.base,
        epochs=args.epochs,
        validation_split=args.validation_split,
        augment=args.augment,
        fine_tune_layers=args.fine_tune_layers,
        public=args.public,
    )
    print(job["job_id"], flush=True)
    counts = ", ".join(f"{label} {count}" for label, count in (job.get("counts") or {}).items())
    print(
        f"training {job['model']} on {job['base']}: {len(job.get('classes') or [])} classes, "
        f"{job['total']} images ({counts})",
        file=sys.stderr,
    )
    _print_skipped(job.get("skipped") or [])
    if not args.wait:
        return 0
    accepted = job
    try:
        with Progress(quiet=args.quiet) as progress:
            job = client.wait_for_job(job["job_id"], interval_s=args.interval, on_update=progress.show)
    except KeyboardInterrupt:
        return stopped_watching(job["job_id"])
    _print_skipped((job.get("skipped") or [])[len(accepted.get("skipped") or []) :], when="while training")
    if job["status"] != "completed":
        reason = f": {job['error']}" if job.get("error") else ""
        print(f"job {job['job_id']} {job['status']}{reason}", file=sys.stderr)
        return 1
    if job.get("evaluation"):
        print_evaluation(job["evaluation"])
    served = job.get("served") or {}
    if served:
        name, version = served.get("name", job["model"]), served.get("version")
        if served.get("serving"):
            print(f"served: {name} version {version} (python -m client predict PHOTO --model {name})")
        else:
            print(f"published: {name} version {version}; the model services have not picked it up yet")
    return 0


def _delete(client: Client, args: argparse.Namespace) -> int:
    print(f"deleted {client.delete_model(args.name)['deleted']}")
    return 0


class Progress:
    """Progress on stderr as a training job moves: a bar over images while features are computed,
    a bar over epochs (loss and validation accuracy alongside) while the head is trained, and a
    line for each other phase. Polls may miss a phase: a bar is opened for the phase first seen."""

    def __init__(self, *, quiet: bool = False) -> None:
        self.quiet = quiet
        self.phase: str | None = None
        self.bar: tqdm[Any] | None = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    def show(self, job: dict[str, Any]) -> None:
        phase = job.get("phase") or "queued"
        if phase != self.phase:
            self._advance(job)  # what the bar's phase ended at, as the new state tells it
            self._close()
            self.phase = phase
            if self.quiet:
                return
            if phase == "features":
                self.bar = tqdm(total=job["total"], unit="img", desc="features", bar_format=BAR_FORMAT)
            elif phase == "training":
                epochs = int(job.get("epochs_total") or (job.get("options") or {}).get("epochs") or 0)
                self.bar = tqdm(total=epochs, unit="epoch", desc="training", bar_format=BAR_FORMAT)
            elif phase in NOTES:
                print(NOTES[phase], file=sys.stderr)
        self._advance(job)

    def _advance(self, job: dict[str, Any]) -> None:
        if self.bar is None:
            return
        if self.phase == "features":
            self.bar.n = job["features_done"] + job["features_failed"]
            failed = job["features_failed"]
            self.bar.set_postfix_str(f"{failed} unreadable" if failed else "")
        elif self.phase == "training":
            history = job.get("history") or []
            self.bar.n = len(history)
            last = history[-1] if history else {}
            figures = [
                f"{key}={last[key]:.4f}" for key in ("loss", "val_accuracy") if last.get(key) is not None
            ]
            if last.get("stage"):  # fine-tuning: the head's epochs, then the layers' with it
                figures.insert(0, str(last["stage"]))
            if last.get("val_accuracy") is None and last.get("accuracy") is not None:  # nothing held out
                figures.append(f"accuracy={last['accuracy']:.4f}")
            self.bar.set_postfix_str(", ".join(figures))
        self.bar.refresh()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def print_evaluation(evaluation: dict[str, Any]) -> None:
    """Accuracy, precision and recall per class, and the confusion matrix (rows: the true class)."""
    accuracy = evaluation.get("accuracy")
    shown = "-" if accuracy is None else f"{accuracy:.2%}"
    on = evaluation.get("evaluated_on", "")
    print(f"accuracy {shown} on {evaluation.get('images', 0)} {on} images")
    if on == "training":
        print("  (nothing was held out: this is how well it fits what it learned from, not new photos)")
    per_class: dict[str, dict[str, Any]] = evaluation.get("per_class") or {}
    if per_class:
        width = max(len("class"), *(len(label) for label in per_class))
        print(f"{'class':<{width}}  {'precision':>9}  {'recall':>7}  {'support':>7}")
        for label, figures in per_class.items():
            precision, recall = (
                "-" if figures.get(key) is None else f"{figures[key]:.2%}" for key in ("precision", "recall")
            )
            print(f"{label:<{width}}  {precision:>9}  {recall:>7}  {figures.get('support', 0):>7}")
    confusion = evaluation.get("confusion_matrix") or {}
    labels, matrix = confusion.get("labels") or [], confusion.get("matrix") or []
    if labels and matrix:
        print("confusion matrix (rows: true class, columns: predicted)")
        first = max(len(label) for label in labels)
        widths = [max(len(label), *(len(str(row[i])) for row in matrix)) for i, label in enumerate(labels)]
        print(" " * first + "".join(f"  {label:>{w}}" for label, w in zip(labels, widths, strict=True)))
        for label, row in zip(labels, matrix, strict=True):
            print(f"{label:<{first}}" + "".join(f"  {n:>{w}}" for n, w in zip(row, widths, strict=True)))


def _print_skipped(skipped: list[dict[str, Any]], when: str = "") -> None:
    if not skipped:
        return
    print(f"skipped {len(skipped)} file(s){' ' + when if when else ''}:", file=sys.stderr)
    for item in skipped[:SHOWN_SKIPPED]:
        print(f"  {item.get('name')}: {item.get('reason')}", file=sys.stderr)
    if len(skipped) > SHOWN_SKIPPED:
        print(f"  and {len(skipped) - SHOWN_SKIPPED} more", file=sys.stderr)
