"""Derive the ImageNet classes' hypernym graph from WordNet 3.0 (``make hierarchy``).

ImageNet's class ids are WordNet 3.0 noun synsets: ``n02123045`` is the synset at byte offset
02123045 of ``data.noun``. This module reads that file (Debian's ``wordnet-base`` installs it
in ``/usr/share/wordnet``), follows every hypernym pointer (``@``, and ``@i`` for instances) from
each of the 1,000 classes up to ``entity``, and writes each synset met with its words and its
hypernyms into ``common/data/imagenet_hierarchy.json``. A synset with several hypernyms keeps them
all: the graph is a DAG, not a tree.

    python -m common.wordnet [--wordnet /usr/share/wordnet] [--check]

``--check`` compares the shipped file with what WordNet gives and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from common.labels import IMAGENET_INDEX, load

WORDNET = Path("/usr/share/wordnet")
HIERARCHY = Path(__file__).parent / "data" / "imagenet_hierarchy.json"
HYPERNYMS = frozenset({"@", "@i"})
SOURCE = "WordNet 3.0 noun database (data.noun), Princeton University"
LICENCE = "WordNet 3.0 licence (Princeton University): common/data/WORDNET-LICENSE"


def read_synset(line: str) -> tuple[str, list[str], list[str]]:
    """One ``data.noun`` line: its id (``n`` + offset), its words (underscores as spaces) and the
    ids of its hypernyms, in the file's order (wndb(5WN): offset lex_filenum ss_type w_cnt
    [word lex_id]... p_cnt [ptr_symbol offset pos source/target]... | gloss)."""
    fields = line.split(" | ", 1)[0].split()
    offset, words_count = fields[0], int(fields[3], 16)
    words = [fields[4 + 2 * i].replace("_", " ") for i in range(words_count)]
    at = 4 + 2 * words_count
    pointers = int(fields[at])
    hypernyms = []
    for i in range(pointers):
        symbol, target, pos = fields[at + 1 + 4 * i : at + 4 + 4 * i]
        if symbol in HYPERNYMS and pos == "n":
            hypernyms.append(f"n{target}")
    return f"n{offset}", words, hypernyms


def synsets(data_noun: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Every noun synset of ``data.noun``: id -> (words, hypernym ids)."""
    found = {}
    with open(data_noun, encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("  "):  # the licence header
                continue
            synset, words, hypernyms = read_synset(line)
            found[synset] = (words, hypernyms)
    return found


def derive(wordnet: Path = WORDNET, classes: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The graph over ``classes`` (ImageNet's, by default) and every ancestor, as the data file holds it.

    Raises:
        KeyError: a class that is not a WordNet 3.0 noun synset.
    """
    every = synsets(wordnet / "data.noun")
    classes = classes or load(IMAGENET_INDEX).class_ids
    nodes: dict[str, dict[str, Any]] = {}
    todo = list(classes)
    while todo:
        synset = todo.pop()
        if synset in nodes:
            continue
        if synset not in every:
            raise KeyError(f"{synset} is not a noun synset of WordNet 3.0")
        words, hypernyms = every[synset]
        nodes[synset] = {"words": words, "parents": hypernyms}
        todo.extend(hypernyms)
    return {
        "source": SOURCE,
        "version": f"WordNet 3.0; Debian wordnet-base {package_version()}",
        "licence": LICENCE,
        "generator": "python -m common.wordnet",
        "classes": len(classes),
        "nodes": dict(sorted(nodes.items())),
    }


def package_version() -> str:
    """Debian's version of ``wordnet-base`` ("unknown" where dpkg does not know it)."""
    try:
        found = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "wordnet-base"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return found.stdout.strip() or "unknown"


def differences(shipped: dict[str, Any], derived: dict[str, Any]) -> list[str]:
    """What the shipped graph lacks or adds against WordNet's: nodes, words, every edge."""
    found = []
    ours, theirs = shipped["nodes"], derived["nodes"]
    for synset in sorted(theirs.keys() - ours.keys()):
        found.append(f"missing node {synset} ({theirs[synset]['words'][0]})")
    for synset in sorted(ours.keys() - theirs.keys()):
        found.append(f"extra node {synset}")
    for synset in sorted(ours.keys() & theirs.keys()):
        if ours[synset]["words"] != theirs[synset]["words"]:
            found.append(f"{synset}: words {ours[synset]['words']} against {theirs[synset]['words']}")
        for parent in theirs[synset]["parents"]:
            if parent not in ours[synset]["parents"]:
                found.append(f"missing edge {synset} -> {parent}")
        for parent in ours[synset]["parents"]:
            if parent not in theirs[synset]["parents"]:
                found.append(f"extra edge {synset} -> {parent}")
    return found


def write(graph: dict[str, Any], path: Path = HIERARCHY) -> None:
    """The graph as JSON, one synset a line (diffs stay readable)."""
    head = {key: value for key, value in graph.items() if key != "nodes"}
    lines = [f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}," for key, value in head.items()]
    nodes = [f"    {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in graph["nodes"].items()]
    text = "{\n" + "\n".join(lines) + '\n  "nodes": {\n' + ",\n".join(nodes) + "\n  }\n}\n"
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wordnet", type=Path, default=WORDNET, help="folder holding data.noun")
    parser.add_argument("--check", action="store_true", help="compare the shipped file, write nothing")
    args = parser.parse_args(argv)
    if not (args.wordnet / "data.noun").is_file():
        print(f"no WordNet 3.0 at {args.wordnet}: apt-get install wordnet-base", file=sys.stderr)
        return 2
    graph = derive(args.wordnet)
    if args.check:
        found = differences(json.loads(HIERARCHY.read_text(encoding="utf-8")), graph)
        print("\n".join(found) or f"{HIERARCHY.name} matches WordNet ({len(graph['nodes'])} synsets)")
        return 1 if found else 0
    write(graph)
    print(f"wrote {HIERARCHY} ({len(graph['nodes'])} synsets over {graph['classes']} classes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
