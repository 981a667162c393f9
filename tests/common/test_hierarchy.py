"""The ImageNet label hierarchy: derived from WordNet 3.0, node probabilities, hedged answers."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest

from common import hierarchy, wordnet
from common.labels import load

SHIPPED = json.loads(wordnet.HIERARCHY.read_text(encoding="utf-8"))
GRAPH = hierarchy.imagenet()
LABELS = load()


def descendants_by_hand(synset: str) -> set[int]:
    """The classes under ``synset``, found by walking up from every class in the shipped file
    (independent of ``Hierarchy``'s matrix)."""
    found = set()
    for index, class_id in enumerate(LABELS.class_ids):
        todo, seen = [class_id], set()
        while todo:
            node = todo.pop()
            if node in seen:
                continue
            seen.add(node)
            todo.extend(SHIPPED["nodes"][node]["parents"])
        if synset in seen:
            found.add(index)
    return found


def distribution(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.full(1000, 0.05)).astype(np.float32)


def test_every_class_is_a_wordnet_synset_with_its_name_and_a_path_to_entity() -> None:
    nodes = SHIPPED["nodes"]
    for class_id, name in zip(LABELS.class_ids, LABELS.names, strict=True):
        assert name.replace("_", " ").lower() in [w.lower() for w in nodes[class_id]["words"]], class_id
        assert GRAPH.ancestors(LABELS.class_ids.index(class_id))[-1].class_id == "n00001740"  # entity
    assert SHIPPED["classes"] == 1000 and "WordNet 3.0" in SHIPPED["version"]
    assert (wordnet.HIERARCHY.parent / "WORDNET-LICENSE").read_text().count("Princeton University") >= 2


def test_tabby_is_a_cat_a_carnivore_a_mammal_and_an_animal_nearest_first() -> None:
    ancestors = [n.class_id for n in GRAPH.ancestors(LABELS.class_ids.index("n02123045"))]
    for synset in ("n02121620", "n02075296", "n01861778", "n00015388"):
        assert synset in ancestors
    assert ancestors.index("n02121620") < ancestors.index("n02075296") < ancestors.index("n01861778")
    assert ancestors.index("n01861778") < ancestors.index("n00015388")
    assert GRAPH.categories(LABELS.class_ids.index("n02123045")) == ("animal",)


def test_a_synset_with_two_hypernyms_keeps_both() -> None:
    assert SHIPPED["nodes"]["n02084071"]["parents"] == [
        "n02083346",
        "n01317541",
    ]  # dog: canine, domestic animal
    beagle = [n.class_id for n in GRAPH.ancestors(LABELS.class_ids.index("n02088364"))]
    assert {"n02083346", "n01317541"} <= set(beagle) and len(beagle) == len(set(beagle))


@pytest.mark.skipif(
    not (wordnet.WORDNET / "data.noun").is_file() and not os.environ.get("CI"),
    reason="WordNet 3.0 is not installed (make wordnet); CI always has it",
)
def test_the_shipped_graph_is_what_wordnet_gives_and_a_dropped_edge_is_caught() -> None:
    derived = wordnet.derive()
    assert wordnet.differences(SHIPPED, derived) == []
    assert len(derived["nodes"]) == len(SHIPPED["nodes"]) == 1860
    dropped = copy.deepcopy(SHIPPED)
    dropped["nodes"]["n02084071"]["parents"].remove("n01317541")
    assert wordnet.differences(dropped, derived) == ["missing edge n02084071 -> n01317541"]
    renamed = copy.deepcopy(SHIPPED)
    renamed["nodes"]["n02123045"]["words"] = ["tabby"]
    assert wordnet.differences(renamed, derived)[0].startswith("n02123045: words")
    assert wordnet.main(["--check"]) == 0


def test_the_generator_reads_a_data_noun_line_as_wndb_describes_it(tmp_path: Path) -> None:
    line = "02123045 05 n 02 tabby 1 tabby_cat 0 001 @ 02121808 n 0000 | a cat with a grey or tawny coat  \n"
    assert wordnet.read_synset(line) == ("n02123045", ["tabby", "tabby cat"], ["n02121808"])
    many = (
        "09999999 05 n 0b "
        + " ".join(f"w{i} 0" for i in range(11))
        + " 002 @i 01111111 n 0000 ~ 02222222 n 0000 | x\n"
    )
    synset, words, parents = wordnet.read_synset(many)
    assert len(words) == 11 and parents == ["n01111111"]  # hex word count; an instance hypernym; no hyponym
    (tmp_path / "data.noun").write_text(
        "  1 licence text\n" + line + "02121808 05 n 01 domestic_cat 0 000 | x\n"
    )
    graph = wordnet.derive(tmp_path, classes=("n02123045",))
    assert graph["nodes"] == {
        "n02121808": {"words": ["domestic cat"], "parents": []},
        "n02123045": {"words": ["tabby", "tabby cat"], "parents": ["n02121808"]},
    }
    with pytest.raises(KeyError, match="n09999998"):
        wordnet.derive(tmp_path, classes=("n09999998",))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_nodes_probability_is_the_sum_of_its_classes_once_each_on_every_path(seed: int) -> None:
    p = distribution(seed)
    for index in (int(p.argmax()), LABELS.class_ids.index("n02088364")):  # the top class; a beagle
        for node in GRAPH.ancestors(index, p):
            expected = float(p[sorted(descendants_by_hand(node.class_id))].astype(np.float64).sum())
            assert node.score == pytest.approx(expected, abs=1e-6), node


@pytest.mark.parametrize("confidence", [0.05, 0.3, 0.5, 0.8, 0.95, 1.0])
def test_the_hedged_answer_is_the_most_informative_node_that_meets_the_confidence(confidence: float) -> None:
    p = distribution(7)
    hedged = GRAPH.hedge(p, confidence)
    scores = GRAPH.node_probabilities(p)
    assert hedged.node.score >= confidence - 1e-5
    assert hedged.classes == len(descendants_by_hand(hedged.node.class_id))
    assert hedged.bits == pytest.approx(np.log2(1000) - np.log2(hedged.classes), abs=1e-9)
    better = [
        s
        for s, bits, score in zip(GRAPH.ids, GRAPH.bits, scores, strict=True)
        if bits > hedged.bits and score >= confidence
    ]
    assert better == []


def test_a_sure_model_is_answered_with_its_class_and_an_unsure_one_higher_up() -> None:
    p = np.full(1000, 0.0001, np.float32)
    cats = {"n02123045": 0.3, "n02123159": 0.25, "n02124075": 0.2}  # tabby, tiger cat, Egyptian cat
    for class_id, share in cats.items():
        p[LABELS.class_ids.index(class_id)] = share
    p /= p.sum()
    assert GRAPH.hedge(p, 0.25).node.class_id == "n02123045"
    assert GRAPH.hedge(p, 0.7).node.class_id == "n02121808"  # domestic cat
    assert GRAPH.hedge(p, 1.0).node.class_id == "n00001740"  # entity: always there


def test_filters_by_ancestor() -> None:
    animals = GRAPH.allowed(["n00015388"], [])
    dogs = GRAPH.allowed(["n02084071"], [])
    assert animals.sum() == len(descendants_by_hand("n00015388")) == 398
    assert (animals & ~GRAPH.allowed(["n00015388"], ["n02084071"])).sum() == dogs.sum() == 118
    with pytest.raises(KeyError):
        GRAPH.allowed(["n99999999"], [])


def test_a_class_is_answered_before_the_parents_that_hold_only_it() -> None:
    p = np.full(1000, 0.0001, np.float32)
    p[LABELS.class_ids.index("n02356798")] = 0.9  # fox squirrel: tree squirrel and squirrel hold only it
    p /= p.sum()
    assert GRAPH.hedge(p, 0.5).node.class_id == "n02356798"
