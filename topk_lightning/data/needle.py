"""``needle``: a built-in, generated long-document QA set (SQuAD v2 JSON; seeded, offline).

Each document is a few thousand words of plausible filler sentences with one *fact* that answers the question and
``num_distractors`` facts of the same form about other entities scattered around it::

    ... The survey team catalogued the river maps before the autumn fair. The access code for the north vault
    is 4417. Several clerks discussed the old ledgers near the harbour. ... The access code for the west vault is
    9034. ...                                                   question: "What is the access code for the north vault?"

Entities are also mentioned in filler sentences that state no fact, so finding the answer means matching the
question's entity to the right fact sentence anywhere in the document: a long-range attention task. With
``unanswerable_fraction > 0`` that share of questions asks about an entity with no fact in the document
(SQuAD v2 style: no answer; the distractors are still there).

Documents are deterministic per (split, seed, parameters): ``random.Random(f"needle:{split}:{seed}")``, so train,
validation and test come from different streams. Filler sentences contain no digits and no person names, so an
answer value never appears outside its fact.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

from topk_lightning.atomic import atomic_output
from topk_lightning.errors import InputError

_DIRECTIONS = ["north", "south", "east", "west", "upper", "lower", "inner", "outer", "old", "new", "central",
               "eastern", "western", "northern", "southern", "hidden", "royal", "main", "rear", "harbour"]
_STRUCTURES = ["vault", "archive", "gate", "tower", "cellar", "warehouse", "library", "depot", "laboratory",
               "chapel", "granary", "workshop", "observatory", "armoury", "greenhouse", "stable"]
_FIRST_NAMES = ["Alice", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hector", "Ingrid", "Jonas",
                "Kira", "Lionel", "Mira", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Stefan", "Tamsin"]
_LAST_NAMES = ["Abbott", "Barlow", "Castell", "Dunmore", "Everly", "Fairbanks", "Garrick", "Holloway", "Irving",
               "Jarrow", "Kessler", "Lindqvist", "Morrow", "Norcott", "Oakley", "Pemberton", "Quayle", "Radley"]
_COLOURS = ["crimson", "amber", "teal", "violet", "ochre", "ivory", "indigo", "scarlet", "olive", "silver",
            "cobalt", "maroon", "turquoise", "saffron", "charcoal", "lavender"]

# kind -> (fact template, question template, value generator)
_FACTS = {
    "code": ("The access code for the {entity} is {value}.", "What is the access code for the {entity}?",
             lambda rng: str(rng.randint(1000, 9999))),
    "keeper": ("The keeper of the {entity} is {value}.", "Who is the keeper of the {entity}?",
               lambda rng: f"{rng.choice(_FIRST_NAMES)} {rng.choice(_LAST_NAMES)}"),
    "year": ("The {entity} was built in {value}.", "In what year was the {entity} built?",
             lambda rng: str(rng.randint(1400, 1999))),
    "colour": ("The door of the {entity} is painted {value}.", "What colour is the door of the {entity} painted?",
               lambda rng: rng.choice(_COLOURS)),
}

_SUBJECTS = ["The survey team", "Several clerks", "The council", "A group of students", "The night watch",
             "The merchants", "Most visitors", "The gardeners", "The old librarian", "A travelling painter",
             "The villagers", "The harbour master", "The committee", "Two carpenters", "The schoolteacher"]
_VERBS = ["catalogued", "discussed", "repaired", "inspected", "described", "photographed", "measured",
          "cleaned", "copied", "ignored", "praised", "studied", "moved", "counted", "admired"]
_OBJECTS = ["the river maps", "the old ledgers", "the broken lanterns", "the winter supplies", "the market stalls",
            "the stone bridge", "the fishing boats", "the weather reports", "the orchard fences", "the tax rolls",
            "the parish records", "the iron railings", "the grain sacks", "the wool bales", "the clock tower"]
_ADVERBIALS = ["before the autumn fair", "near the harbour", "during the long rains", "after the evening bell",
               "with great care", "without much interest", "at the end of the season", "on a quiet morning",
               "for the third time", "in the presence of the mayor", "despite the cold wind", "by lamplight",
               "while the bells rang", "as the tide came in", "under a grey sky"]
_MENTIONS = ["Visitors often walk past the {entity} in the evening.", "Few people remember who designed the {entity}.",
             "The road to the {entity} was widened last spring.", "Children like to play near the {entity}.",
             "A painting of the {entity} hangs in the town hall.", "Nobody has complained about the {entity} lately."]


def _filler(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ADVERBIALS)}."


def _document(rng: random.Random, *, document_words: int, num_distractors: int, answerable: bool) -> dict:
    kind = rng.choice(sorted(_FACTS))
    fact_template, question_template, make_value = _FACTS[kind]
    entities = [f"{d} {s}" for d in _DIRECTIONS for s in _STRUCTURES]
    chosen = rng.sample(entities, num_distractors + 1)
    target = chosen[0]
    stated = chosen[1:] + ([target] if answerable else [])
    values: dict[str, str] = {}
    for entity in stated:
        value = make_value(rng)
        while value in values.values():
            value = make_value(rng)
        values[entity] = value

    sentences: list[str] = []
    words = 0
    while words < document_words:
        if rng.random() < 0.08:
            sentence = rng.choice(_MENTIONS).format(entity=rng.choice(chosen))
        else:
            sentence = _filler(rng)
        sentences.append(sentence)
        words += len(sentence.split())
    facts = {entity: fact_template.format(entity=entity, value=value) for entity, value in values.items()}
    for entity in stated:
        sentences.insert(rng.randint(0, len(sentences)), "\0" + entity)

    # paragraphs of 4-9 sentences; record where the target fact lands
    context, answers, remaining = "", [], rng.randint(4, 9)
    for sentence in sentences:
        if context:
            if remaining == 0:
                context, remaining = context + "\n\n", rng.randint(4, 9)
            else:
                context += " "
        if sentence.startswith("\0"):
            entity = sentence[1:]
            sentence = facts[entity]
            if entity == target:
                start = len(context) + sentence.rindex(values[entity])
                answers = [{"text": values[entity], "answer_start": start}]
        context += sentence
        remaining -= 1
    question = question_template.format(entity=target)
    return {"context": context, "question": question, "answers": answers, "kind": kind}


def generate_needle_squad(
    *,
    num_examples: int,
    document_words: int = 2000,
    num_distractors: int = 8,
    unanswerable_fraction: float = 0.0,
    seed: int = 0,
    split: str = "train",
) -> dict:
    """Generate ``num_examples`` documents (one question each) as SQuAD v2.0 JSON (a dict).

    Args:
        num_examples: documents (= questions) to generate.
        document_words: approximate words per document (BERT word-pieces are about 1.25 per word here).
        num_distractors: facts of the same form about other entities in each document (0-300).
        unanswerable_fraction: share of questions whose entity has no fact in the document, in [0, 1].
        seed / split: the stream; the same pair always gives the same documents.
    """
    if not 0.0 <= unanswerable_fraction <= 1.0:
        raise InputError(f"unanswerable_fraction must be in [0, 1], got {unanswerable_fraction}")
    if not 0 <= num_distractors < len(_DIRECTIONS) * len(_STRUCTURES):
        raise InputError(f"num_distractors must be in [0, {len(_DIRECTIONS) * len(_STRUCTURES) - 1}]")
    rng = random.Random(f"needle:{split}:{seed}")
    articles = []
    for i in range(num_examples):
        answerable = rng.random() >= unanswerable_fraction
        doc = _document(rng, document_words=document_words, num_distractors=num_distractors, answerable=answerable)
        qa = {"id": f"needle-{split}-{seed}-{i:06d}", "question": doc["question"], "answers": doc["answers"],
              "is_impossible": not doc["answers"]}
        articles.append({"title": f"needle-{split}-{seed}-{i:06d}",
                         "paragraphs": [{"context": doc["context"], "qas": [qa]}]})
    return {"version": "v2.0", "data": articles}


def needle_file(
    cache_dir: str | os.PathLike,
    *,
    split: str,
    num_examples: int,
    document_words: int = 2000,
    num_distractors: int = 8,
    unanswerable_fraction: float = 0.0,
    seed: int = 0,
) -> Path:
    """Path of the needle JSON for these parameters under ``cache_dir/needle/``, written on first use.

    The file is written with `~topk_lightning.atomic.atomic_output`, so a crash or a concurrent writer never leaves
    a half-written file under the final name.
    """
    params = dict(split=split, num_examples=num_examples, document_words=document_words,
                  num_distractors=num_distractors, unanswerable_fraction=unanswerable_fraction, seed=seed, version=1)
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir).expanduser() / "needle" / f"needle-{split}-{key}.json"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    data = generate_needle_squad(num_examples=num_examples, document_words=document_words,
                                 num_distractors=num_distractors, unanswerable_fraction=unanswerable_fraction,
                                 seed=seed, split=split)
    with atomic_output(path) as partial:
        partial.write_text(json.dumps(data), encoding="utf-8")
    return path
