"""``needle``: a built-in, generated long-document QA set (SQuAD v2 JSON; seeded, offline).

Each document is filler text with one *fact* that answers the question and ``num_distractors`` facts of the same
form about other entities scattered around it::

    ... The survey team catalogued the river maps before the autumn fair. The access code for the north vault
    is 4417. Several clerks discussed the old ledgers near the harbour. ... The access code for the west tower is
    9034. ...                                                   question: "What is the access code for the north vault?"

Within a document no two entities share a word ("north vault", "west tower", never "north tower") and no two
values share a word (for names: neither the first nor the last name), so the question's entity matches exactly one
fact, and picking a fact at random scores F1 = 100 / (num_distractors + 1) exactly. Every entity is also named
in ``mentions`` filler sentences that state no fact (at any document length), so finding the answer means matching
the question's entity to the right fact sentence anywhere in the document: a long-range attention task. With ``unanswerable_fraction > 0`` that share of
questions asks about an entity with no fact in the document (SQuAD v2 style: no answer; the distractors are still
there).

Every question also carries a ``needle`` record (``kind``, ``entity``, ``facts``: entity -> value) that SQuAD
readers ignore; :func:`swap_questions` uses it to build the control set in which each document is asked another
document's question, and benchmarks use it to compute the guessing level.

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

_DIRECTIONS = ["north", "south", "east", "west", "upper", "lower", "inner", "outer", "little", "new", "central",
               "eastern", "western", "northern", "southern", "hidden", "royal", "main", "rear", "coastal"]
_STRUCTURES = ["vault", "archive", "gate", "tower", "cellar", "warehouse", "library", "depot", "laboratory",
               "chapel", "granary", "workshop", "observatory", "armoury", "greenhouse", "stable"]
_FIRST_NAMES = ["Alice", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hector", "Ingrid", "Jonas",
                "Kira", "Lionel", "Mira", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Stefan", "Tamsin"]
_LAST_NAMES = ["Abbott", "Barlow", "Castell", "Dunmore", "Everly", "Fairbanks", "Garrick", "Holloway", "Irving",
               "Jarrow", "Kessler", "Lindqvist", "Morrow", "Norcott", "Oakley", "Pemberton", "Quayle", "Radley"]
_COLOURS = ["crimson", "amber", "teal", "violet", "ochre", "ivory", "indigo", "scarlet", "olive", "silver",
            "cobalt", "maroon", "turquoise", "saffron", "charcoal", "lavender"]

# kind -> (fact template, question template, generator of n values of which no two share a word)
_FACTS = {
    "code": ("The access code for the {entity} is {value}.", "What is the access code for the {entity}?",
             lambda rng, n: [str(v) for v in rng.sample(range(1000, 10000), n)]),
    "keeper": ("The keeper of the {entity} is {value}.", "Who is the keeper of the {entity}?",
               lambda rng, n: [f"{first} {last}" for first, last in
                               zip(rng.sample(_FIRST_NAMES, n), rng.sample(_LAST_NAMES, n))]),
    "year": ("The {entity} was built in {value}.", "In what year was the {entity} built?",
             lambda rng, n: [str(v) for v in rng.sample(range(1400, 2000), n)]),
    "colour": ("The door of the {entity} is painted {value}.", "What colour is the door of the {entity} painted?",
               lambda rng, n: rng.sample(_COLOURS, n)),
}
#: Most facts one document can hold with no word shared between its entities or between its values.
MAX_FACTS = min(len(_DIRECTIONS), len(_STRUCTURES), len(_FIRST_NAMES), len(_LAST_NAMES), len(_COLOURS))

_SUBJECTS = ["The survey team", "Several clerks", "The council", "A group of students", "The night watch",
             "The merchants", "Most visitors", "The gardeners", "The old librarian", "A travelling painter",
             "The villagers", "The harbour master", "The committee", "Two carpenters", "The schoolteacher"]
_VERBS = ["catalogued", "discussed", "repaired", "inspected", "described", "photographed", "measured",
          "cleaned", "copied", "ignored", "praised", "studied", "moved", "counted", "admired"]
_OBJECTS = ["the river maps", "the old ledgers", "the broken lanterns", "the winter supplies", "the market stalls",
            "the stone bridge", "the fishing boats", "the weather reports", "the orchard fences", "the tax rolls",
            "the parish records", "the iron railings", "the grain sacks", "the wool bales", "the town clock"]
_ADVERBIALS = ["before the autumn fair", "near the harbour", "during the long rains", "after the evening bell",
               "with great care", "without much interest", "at the end of the season", "on a quiet morning",
               "for the third time", "in the presence of the mayor", "despite the cold wind", "by lamplight",
               "while the bells rang", "as the tide came in", "under a grey sky"]
_MENTIONS = ["Visitors often walk past the {entity} in the evening.", "Few people remember who designed the {entity}.",
             "The road to the {entity} was widened last spring.", "Children like to play near the {entity}.",
             "A painting of the {entity} hangs in the town hall.", "Nobody has complained about the {entity} lately."]


def _filler(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ADVERBIALS)}."


def _document(rng: random.Random, *, document_words: int, num_distractors: int, mentions: int,
              answerable: bool) -> dict:
    kind = rng.choice(sorted(_FACTS))
    fact_template, question_template, make_values = _FACTS[kind]
    # Entities of one document share no word, so one word of the question's entity already picks its fact.
    directions = rng.sample(_DIRECTIONS, num_distractors + 1)
    structures = rng.sample(_STRUCTURES, num_distractors + 1)
    chosen = [f"{d} {s}" for d, s in zip(directions, structures)]
    target = chosen[0]
    stated = chosen[1:] + ([target] if answerable else [])
    values = dict(zip(stated, make_values(rng, len(stated))))

    sentences: list[str] = []
    words = 0
    while words < document_words:
        sentence = _filler(rng)
        sentences.append(sentence)
        words += len(sentence.split())
    # Every entity, the asked one included, is also named in `mentions` filler sentences that state no fact, at
    # any length: the answer is not "the fact whose entity appears elsewhere" but "the fact whose entity the
    # question names", in short documents as in long ones.
    for entity in chosen:
        for _ in range(mentions):
            sentences.insert(rng.randint(0, len(sentences)), rng.choice(_MENTIONS).format(entity=entity))
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
    return {"context": context, "question": question, "answers": answers, "kind": kind, "entity": target,
            "facts": values}


def generate_needle_squad(
    *,
    num_examples: int,
    document_words: int = 2000,
    num_distractors: int = 8,
    mentions: int = 1,
    unanswerable_fraction: float = 0.0,
    seed: int = 0,
    split: str = "train",
) -> dict:
    """Generate ``num_examples`` documents (one question each) as SQuAD v2.0 JSON (a dict).

    Args:
        num_examples: documents (= questions) to generate.
        document_words: approximate words per document (BERT word-pieces are about 1.25 per word here).
        num_distractors: facts of the same form about other entities in each document, 0 to ``MAX_FACTS - 1``.
        mentions: filler sentences naming each entity (the asked one too) without stating a fact, >= 0.
        unanswerable_fraction: share of questions whose entity has no fact in the document, in [0, 1].
        seed / split: the stream; the same pair always gives the same documents.
    """
    if not 0.0 <= unanswerable_fraction <= 1.0:
        raise InputError(f"unanswerable_fraction must be in [0, 1], got {unanswerable_fraction}")
    if not 0 <= num_distractors < MAX_FACTS:
        raise InputError(f"num_distractors must be in [0, {MAX_FACTS - 1}] (entities of a document share no word), "
                         f"got {num_distractors}")
    if mentions < 0:
        raise InputError(f"mentions must be >= 0, got {mentions}")
    rng = random.Random(f"needle:{split}:{seed}")
    articles = []
    for i in range(num_examples):
        answerable = rng.random() >= unanswerable_fraction
        doc = _document(rng, document_words=document_words, num_distractors=num_distractors, mentions=mentions,
                        answerable=answerable)
        qa = {"id": f"needle-{split}-{seed}-{i:06d}", "question": doc["question"], "answers": doc["answers"],
              "is_impossible": not doc["answers"],
              "needle": {"kind": doc["kind"], "entity": doc["entity"], "facts": doc["facts"]}}
        articles.append({"title": f"needle-{split}-{seed}-{i:06d}",
                         "paragraphs": [{"context": doc["context"], "qas": [qa]}]})
    return {"version": "v2.0", "data": articles}


def swap_questions(data: dict) -> dict:
    """The control set: each document keeps its context and answer but is asked another document's question.

    The new question is one of the same kind (so its form still matches the document's facts) about an entity that
    shares no word with any entity of this document, taken from the next such document in the set (cyclically);
    when there is none, the next one of the same kind whose entity merely has no fact here. The question then says
    nothing about which fact is the answer: a model that reads the question scores about the guessing level
    (100 / number of facts), one that found a shortcut in the document alone keeps its score.

    Args:
        data: SQuAD JSON from :func:`generate_needle_squad` (its questions carry the ``needle`` record).

    Raises:
        ValueError: a question without its ``needle`` record, or a document with no usable question to swap in.
    """
    records = [(article, qa) for article in data["data"] for paragraph in article["paragraphs"]
               for qa in paragraph["qas"]]
    for _, qa in records:
        if "needle" not in qa:
            raise ValueError(f"swap_questions: question {qa.get('id')!r} has no 'needle' record; "
                             "expected data from generate_needle_squad")
    swapped = json.loads(json.dumps(data))  # a deep copy; the input stays as it was
    questions = [qa for article in swapped["data"] for paragraph in article["paragraphs"] for qa in paragraph["qas"]]
    for i, qa in enumerate(questions):
        own = qa["needle"]
        own_words = {word for entity in [own["entity"], *own["facts"]] for word in entity.split()}
        others = [records[(i + j) % len(records)][1] for j in range(1, len(records))]
        others = [o for o in others if o["needle"]["kind"] == own["kind"] and o["needle"]["entity"] not in own["facts"]]
        disjoint = [o for o in others if not own_words & set(o["needle"]["entity"].split())]
        if not others:
            raise ValueError(f"swap_questions: no other question of kind {own['kind']!r} to ask of {qa['id']!r}")
        chosen = (disjoint or others)[0]
        qa["question"] = chosen["question"]
        qa["needle"] = {**own, "asked": chosen["needle"]["entity"]}
    return swapped


def needle_file(
    cache_dir: str | os.PathLike,
    *,
    split: str,
    num_examples: int,
    document_words: int = 2000,
    num_distractors: int = 8,
    mentions: int = 1,
    unanswerable_fraction: float = 0.0,
    seed: int = 0,
) -> Path:
    """Path of the needle JSON for these parameters under ``cache_dir/needle/``, written on first use.

    The file is written with `~topk_lightning.atomic.atomic_output`, so a crash or a concurrent writer never leaves
    a half-written file under the final name.
    """
    params = dict(split=split, num_examples=num_examples, document_words=document_words,
                  num_distractors=num_distractors, mentions=mentions, unanswerable_fraction=unanswerable_fraction, seed=seed,
                  version=3)
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir).expanduser() / "needle" / f"needle-{split}-{key}.json"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    data = generate_needle_squad(num_examples=num_examples, document_words=document_words,
                                 num_distractors=num_distractors, mentions=mentions,
                                 unanswerable_fraction=unanswerable_fraction, seed=seed, split=split)
    with atomic_output(path) as partial:
        partial.write_text(json.dumps(data), encoding="utf-8")
    return path
