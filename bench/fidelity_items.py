"""Items for `kvmesh bench fidelity`: invented entities and facts in varied prose, answers checked by match.

Everything here is made up (people, towns, rivers, companies, ships, devices; years, counts, measures),
so no model can answer from memory: the answer has to come from the text in the prompt. Names are built
from syllables and unique across the whole set. Passages mix facts about the entity asked about with the
same kinds of facts about a rival entity (the distractors), in sentence forms drawn at random, with
pronouns and descriptive nouns standing in for names where the previous sentence makes them clear.

Three shapes, `items_per_shape` items each, from one seed (same seed, same items):
- relay: a ~100-word passage (new in every item) and a question about it;
- retrieval: a question whose gold document sits among distractors drawn from a shared pool of documents,
  so every document recurs across questions, each time in another order;
- critique: like relay (a passage and a question), for a solve / critique / revise chain.
Each item is in the `tune` or the `holdout` split (a seeded half each); thresholds are chosen on `tune`.

A reply is correct when the gold answer (a name or a number) appears in it as whole words, after both are
normalised: lowercase, punctuation and the articles a/an/the dropped.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

SHAPES = ("relay", "retrieval", "critique")
SPLITS = ("tune", "holdout")


# -- answers --------------------------------------------------------------------------------------------
def normalize(text: str) -> str:
    """Lowercase, punctuation dropped (so "4,310" is "4310"), articles dropped, single spaces."""
    words = re.sub(r"[^\w\s]", "", text.lower()).split()
    return " ".join(word for word in words if word not in ("a", "an", "the"))


def contains_answer(reply: str, answer: str) -> bool:
    """Whether the normalised answer appears in the normalised reply as whole words."""
    return f" {normalize(answer)} " in f" {normalize(reply)} "


# -- the item set -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ItemConfig:
    seed: int = 0
    items_per_shape: int = 150
    documents: int = 60  # the retrieval pool
    documents_per_question: int = 4  # the gold document and distractors

    def __post_init__(self) -> None:
        if self.items_per_shape < 2:
            raise ValueError(
                f"ItemConfig.items_per_shape must be >= 2 (one item per split), got {self.items_per_shape}"
            )
        if self.documents_per_question < 2:
            raise ValueError(
                f"ItemConfig.documents_per_question must be >= 2 (the gold one and a distractor), "
                f"got {self.documents_per_question}"
            )
        if self.documents < 2 * self.documents_per_question:
            raise ValueError(
                f"ItemConfig.documents={self.documents} is too few for {self.documents_per_question} per question: "
                f"give at least {2 * self.documents_per_question} so documents recur in different company"
            )
        if self.documents * _QUESTIONS_PER_DOCUMENT < self.items_per_shape:
            raise ValueError(
                f"ItemConfig: {self.documents} documents give at most {self.documents * _QUESTIONS_PER_DOCUMENT} "
                f"distinct questions, fewer than items_per_shape={self.items_per_shape}"
            )


@dataclass(frozen=True)
class Item:
    id: str  # "relay-007"
    shape: str
    split: str
    question: str
    answer: str  # a name or a number, verbatim in `passage`
    passage: str  # relay and critique: the passage; retrieval: the gold document's text
    documents: tuple[str, ...] = ()  # retrieval: document ids in the order the tool returns them


@dataclass(frozen=True)
class ItemSet:
    items: dict[str, tuple[Item, ...]]  # shape -> items
    documents: dict[str, str] = field(default_factory=dict)  # retrieval pool: id -> text


_Drawn = tuple[str, str, str, tuple[str, ...]]  # an item before its split: question, answer, passage, documents


def generate_items(config: ItemConfig | None = None) -> ItemSet:
    config = config or ItemConfig()
    names = _Names(random.Random(f"{config.seed}/names"))
    items: dict[str, tuple[Item, ...]] = {}
    for shape in ("relay", "critique"):
        rng = random.Random(f"{config.seed}/{shape}")
        drawn = [_passage_item(rng, names) for _ in range(config.items_per_shape)]
        items[shape] = _with_splits(shape, drawn, config.seed)
    documents, drawn = _retrieval(random.Random(f"{config.seed}/retrieval"), names, config)
    items["retrieval"] = _with_splits("retrieval", drawn, config.seed)
    return ItemSet(items, documents)


def _with_splits(shape: str, drawn: list[_Drawn], seed: int) -> tuple[Item, ...]:
    order = list(range(len(drawn)))
    random.Random(f"{seed}/{shape}/split").shuffle(order)
    tune = set(order[: len(order) // 2])
    return tuple(
        Item(f"{shape}-{index:03d}", shape, "tune" if index in tune else "holdout", question, answer, passage, docs)
        for index, (question, answer, passage, docs) in enumerate(drawn)
    )


# -- invented names ---------------------------------------------------------------------------------------
_ONSETS = (
    "b",
    "br",
    "c",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "h",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "sh",
    "t",
    "th",
    "tr",
    "v",
    "w",
    "z",
    "kl",
    "st",
)
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou", "a", "e", "o")
_CODAS = ("", "", "", "l", "n", "r", "s", "m", "nd", "rk", "st", "v", "ll", "rn")
_ENDINGS = {
    "given": ("a", "o", "en", "ia", "is", "el", "ine", "ar", "ik", "ette", "an", "ys"),
    "family": ("ova", "ski", "mont", "ard", "ling", "wright", "ez", "oni", "berg", "ay", "hurst", "ick", "ane"),
    "town": ("wick", "ford", "holm", "by", "stead", "mere", "haven", "thorpe", "dale", "ton", "gate", "brook"),
    "river": ("a", "en", "ey", "is", "o", "wen", "ire", "ath"),
    "company": ("ex", "ion", "ara", "ell", "ico", "and", "ane", "eth"),
    "ship": ("a", "ine", "ora", "el", "is", "ane", "ette", "ia"),
    "device": ("on", "ex", "ar", "ium", "o", "ix", "ette", "al"),
}


class _Names:
    """Pronounceable invented names, each handed out once."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def __call__(self, kind: str) -> str:
        while True:
            syllables = 1 if self.rng.random() < 0.7 else 2
            root = "".join(
                self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS) for _ in range(syllables)
            )
            name = (root + self.rng.choice(_ENDINGS[kind])).capitalize()
            if 4 <= len(name) <= 9 and name.lower() not in self.used and not re.search(r"(.)\1\1", name):
                self.used.add(name.lower())
                return name


# -- entities -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Entity:
    kind: str
    answer: str  # how a question's answer names it
    mention: str  # its full name in running text ("Orvello Glassworks", "the Selvane")
    short: str  # its name once introduced ("Orvello", "the Selvane")
    noun: str  # a description that refers back to it ("the firm")
    pronoun: str  # "it", "she", "he"
    asked_as: str  # how a question names it


_COMPANY_TRADES = (
    "Glassworks",
    "Ironworks",
    "Mills",
    "Textiles",
    "Instruments",
    "Ferries",
    "Press",
    "Foundry",
    "Ropeworks",
    "Brewery",
    "Potteries",
    "Clockworks",
)
_DEVICE_NOUNS = (
    "loom",
    "lamp",
    "pump",
    "clock",
    "press",
    "lathe",
    "kiln",
    "compass",
    "telescope",
    "barometer",
    "printing frame",
    "water wheel",
)
_PROFESSIONS = (
    "surveyor",
    "schoolteacher",
    "blacksmith",
    "clerk",
    "sailor",
    "carpenter",
    "chemist",
    "weaver",
    "bookbinder",
    "glassblower",
    "baker",
    "engineer",
)
_COLOURS = ("green", "ochre", "crimson", "slate blue", "white", "yellow", "black", "copper red", "grey", "teal")
_MATERIALS = ("oak", "brass", "pine", "copper", "granite", "wrought iron", "limestone", "walnut", "tin", "slate")


def _entity(kind: str, names: _Names, rng: random.Random) -> _Entity:
    if kind == "person":
        given, family = names("given"), names("family")
        pronoun = rng.choice(("she", "he"))
        return _Entity(kind, family, f"{given} {family}", family, family, pronoun, f"{given} {family}")
    if kind == "company":
        root = names("company")
        trade = rng.choice(_COMPANY_TRADES)
        return _Entity(
            kind, root, f"{root} {trade}", root, rng.choice(("the firm", "the company")), "it", f"{root} {trade}"
        )
    if kind == "town":
        name = names("town")
        return _Entity(kind, name, name, name, "the town", "it", name)
    if kind == "ship":
        name = names("ship")
        return _Entity(
            kind, name, f"the {name}", f"the {name}", rng.choice(("the ship", "the vessel")), "she", f"the {name}"
        )
    if kind == "device":
        name, noun = names("device"), rng.choice(_DEVICE_NOUNS)
        return _Entity(kind, name, f"the {name} {noun}", f"the {name}", f"the {noun}", "it", f"the {name} {noun}")
    if kind == "river":
        name = names("river")
        return _Entity(kind, name, f"the {name}", f"the {name}", "the river", "it", f"the {name}")
    raise ValueError(f"no entity kind {kind!r}")


# -- facts --------------------------------------------------------------------------------------------------
# A sentence template: {S} is the subject where it opens the sentence (a name, a pronoun or a description),
# {s} the subject inside the sentence (a name or a description), {v} the value; {job}/{a_job} a profession
# (of the person named), {noun} what the subject is. A relation has several templates and several question
# forms ({q}: the entity as a question names it).
@dataclass(frozen=True)
class _Relation:
    name: str
    value: str  # what kind of value: person, town, river, company, device, year, or a count's name
    sentences: tuple[str, ...]
    questions: tuple[str, ...]


_R = _Relation
_RELATIONS: dict[str, tuple[_Relation, ...]] = {
    "company": (
        _R(
            "founded",
            "year",
            (
                "{S} was founded in {v}.",
                "{S} opened its first workshop in {v}.",
                "It was in {v} that {s} first opened for business.",
                "{S} has been trading since {v}, when it was founded.",
            ),
            ("In what year was {q} founded?", "When was {q} founded? Give the year."),
        ),
        _R(
            "founder",
            "person",
            (
                "{S} was started by {v}, a former {job}.",
                "{v}, who had worked as {a_job}, founded {s}.",
                "The founder of {s} was {v}, once {a_job}.",
                "{S} owes its existence to {v}, who founded it.",
            ),
            ("Who founded {q}?", "Which person started {q}?"),
        ),
        _R(
            "based",
            "town",
            (
                "{S} is based in {v}.",
                "{S} keeps its main workshop in the town of {v}.",
                "The head office of {s} stands in {v}, close to the old market.",
                "From its yard in {v}, {s} ships goods up and down the coast.",
            ),
            ("In which town is {q} based?", "Where does {q} have its head office?"),
        ),
        _R(
            "staff",
            "staff",
            (
                "{S} employs {v} people.",
                "{S} had {v} workers on its books last year.",
                "Around {v} people work for {s}.",
                "These days {s} employs some {v} men and women.",
            ),
            ("How many people work for {q}?", "How many workers does {q} employ?"),
        ),
        _R(
            "product",
            "device",
            (
                "{S} is best known for {v}.",
                "The best-selling product of {s} is {v}.",
                "Most people know {s} for {v}, which it still makes by hand.",
            ),
            ("What product is {q} best known for?", "Which device does {q} make?"),
        ),
    ),
    "town": (
        _R(
            "river",
            "river",
            (
                "{S} lies on {v}.",
                "{v} flows through {s} on its way to the sea.",
                "{S} grew up around a ford across {v}.",
                "Barges on {v} still stop at {s} every morning.",
            ),
            ("Which river flows through {q}?", "On which river does {q} stand?"),
        ),
        _R(
            "founded",
            "year",
            (
                "{S} was founded in {v}.",
                "The first houses in {s} were built in {v}.",
                "{S} dates back to {v}, when the first families settled there.",
            ),
            ("In what year was {q} founded?", "When was {q} founded? Give the year."),
        ),
        _R(
            "population",
            "population",
            (
                "{S} has {v} inhabitants.",
                "About {v} people live in {s}.",
                "The last census counted {v} residents in {s}.",
            ),
            ("How many people live in {q}?", "What is the population of {q}?"),
        ),
        _R(
            "mayor",
            "person",
            (
                "The mayor of {s} is {v}, a former {job}.",
                "{v}, who once worked as {a_job}, is the mayor of {s}.",
                "{S} elected {v} as its mayor.",
            ),
            ("Who is the mayor of {q}?", "Which person serves as mayor of {q}?"),
        ),
        _R(
            "bridges",
            "bridges",
            ("{v} bridges cross the river at {s}.", "{S} has {v} bridges, most of them built of stone."),
            ("How many bridges are there in {q}?", "How many bridges cross the river at {q}?"),
        ),
    ),
    "ship": (
        _R(
            "launched",
            "year",
            (
                "{S} was launched in {v}.",
                "{S} first put to sea in {v}.",
                "It was in {v} that {s} was launched from the slipway.",
            ),
            ("In what year was {q} launched?", "When was {q} launched? Give the year."),
        ),
        _R(
            "captain",
            "person",
            (
                "{S} is commanded by Captain {v}.",
                "Captain {v}, a former {job}, commands {s}.",
                "The master of {s} is Captain {v}.",
            ),
            ("Who is the captain of {q}?", "Who commands {q}?"),
        ),
        _R(
            "built",
            "town",
            (
                "{S} was built in the shipyards of {v}.",
                "{S} came out of a yard in {v}.",
                "Shipwrights in {v} built {s} over two long winters.",
            ),
            ("In which town was {q} built?", "Where was {q} built?"),
        ),
        _R(
            "length",
            "metres",
            (
                "{S} is {v} metres long.",
                "{S} measures {v} metres from bow to stern.",
                "From bow to stern, {s} measures {v} metres.",
            ),
            ("How long is {q}, in metres?", "What is the length of {q} in metres?"),
        ),
        _R(
            "crew",
            "crew",
            ("{S} sails with a crew of {v}.", "{S} carries {v} crew.", "A crew of {v} keeps {s} running."),
            ("How many crew does {q} carry?", "How large is the crew of {q}?"),
        ),
    ),
    "device": (
        _R(
            "inventor",
            "person",
            (
                "{S} was designed by {v}.",
                "{v} invented {s} while working as {a_job}.",
                "The designer of {s} was {v}, {a_job} by training.",
            ),
            ("Who designed {q}?", "Who invented {q}?"),
        ),
        _R(
            "shown",
            "year",
            (
                "{S} was first shown to the public in {v}.",
                "{S} first went on show in {v}.",
                "The public first saw {s} in {v}.",
            ),
            ("In what year was {q} first shown to the public?", "When was {q} first shown? Give the year."),
        ),
        _R(
            "workshop",
            "town",
            (
                "{S} was built in a small workshop in {v}.",
                "The first {noun} of its kind was put together in {v}.",
                "Craftsmen in {v} built {s} by hand.",
            ),
            ("In which town was {q} built?", "Where was {q} first built?"),
        ),
        _R(
            "weight",
            "kilograms",
            (
                "{S} weighs {v} kilograms.",
                "{S} weighs about {v} kilograms, frame included.",
                "Fully assembled, {s} weighs {v} kilograms.",
            ),
            ("How much does {q} weigh, in kilograms?", "What is the weight of {q} in kilograms?"),
        ),
        _R(
            "maker",
            "company",
            ("{S} is manufactured by {v}.", "{v} manufactures {s} under licence.", "These days {v} makes {s}."),
            ("Which company manufactures {q}?", "Who makes {q} today?"),
        ),
    ),
    "river": (
        _R(
            "length",
            "kilometres",
            (
                "{S} is {v} kilometres long.",
                "{S} runs for {v} kilometres.",
                "From source to mouth, {s} covers {v} kilometres.",
            ),
            ("How long is {q}, in kilometres?", "What is the length of {q} in kilometres?"),
        ),
        _R(
            "source",
            "town",
            (
                "{S} rises in the hills above {v}.",
                "The spring that feeds {s} lies just outside {v}.",
                "{S} starts near {v}.",
            ),
            ("Near which town does {q} rise?", "Where is the source of {q}?"),
        ),
        _R(
            "mouth",
            "town",
            ("{S} meets the sea at {v}.", "{S} reaches the coast at {v}.", "At {v}, {s} flows into the sea."),
            ("At which town does {q} reach the sea?", "Where does {q} flow into the sea?"),
        ),
        _R(
            "named",
            "person",
            (
                "{S} is named after {v}, {a_job} who mapped its course.",
                "{S} takes its name from {v}.",
                "Mapmakers named {s} after {v}, {a_job}.",
            ),
            ("After whom is {q} named?", "Who is {q} named after?"),
        ),
        _R(
            "bridges",
            "bridges",
            ("{v} bridges cross {s}.", "{S} is crossed by {v} bridges."),
            ("How many bridges cross {q}?", "By how many bridges is {q} crossed?"),
        ),
    ),
    "person": (
        _R(
            "birthplace",
            "town",
            ("{S} was born in {v}.", "{S} was born and raised in {v}.", "{S} comes from {v}."),
            ("In which town was {q} born?", "Where was {q} born?"),
        ),
        _R(
            "born",
            "year",
            (
                "{S} was born in {v}.",
                "{S} was born in the winter of {v}.",
                "The records give {v} as the birth year of {s}.",
            ),
            ("In what year was {q} born?", "When was {q} born? Give the year."),
        ),
        _R(
            "books",
            "books",
            (
                "{S} has written {v} books.",
                "{S} wrote {v} books over a long career.",
                "By now {s} has published {v} books.",
            ),
            ("How many books has {q} written?", "How many books did {q} write?"),
        ),
        _R(
            "built",
            "device",
            ("{S} built {v}.", "{S} is remembered as the maker of {v}.", "{v} was the work of {s}."),
            ("Which device did {q} build?", "What is {q} remembered for building?"),
        ),
        _R(
            "employer",
            "company",
            (
                "{S} worked for {v} for most of a long career.",
                "{S} spent twenty years at {v}.",
                "For two decades {s} worked at {v}.",
            ),
            ("Which company did {q} work for?", "Which company employed {q}?"),
        ),
    ),
}
_KINDS = tuple(_RELATIONS)
_QUESTIONS_PER_DOCUMENT = 3
# number ranges (inclusive) by value kind
_NUMBERS = {
    "year": (1720, 1989),
    "staff": (12, 950),
    "population": (2100, 96000),
    "bridges": (2, 14),
    "metres": (18, 240),
    "crew": (6, 140),
    "kilograms": (3, 900),
    "kilometres": (40, 1200),
    "books": (2, 31),
}
# sentences that answer no question: colours, materials, later lives of the people named
_DETAILS = {
    "company": (
        "{S} paints its delivery carts {colour}.",
        "The crates of {s} are made of {material}.",
        "Visitors to {s} are shown a counter of {material} older than anyone working there.",
    ),
    "town": (
        "Most roofs in {s} are {colour}.",
        "{S} is known for its {material} quarries.",
        "The market hall of {s} is built of {material}.",
        "{S} holds a market every week in summer.",
    ),
    "ship": (
        "The hull of {s} is painted {colour}.",
        "{S} carries {material} on most voyages.",
        "The figurehead of {s} is carved from {material}.",
    ),
    "device": (
        "The casing of {s} is made of {material}.",
        "Early models of {s} were painted {colour}.",
        "{S} stands on a base of {material}.",
    ),
    "river": (
        "In summer {s} turns {colour} with silt.",
        "Boats on {s} once carried {material} to the coast.",
        "The banks of {s} are lined with {material} walls.",
    ),
    "person": (
        "{S} always wore {colour} coats.",
        "{S} collected objects made of {material}.",
        "Friends remember {s} riding a bicycle painted {colour}.",
        "{S} later moved to {town}.",
        "{S} died in {year}.",
        "{S} had grown up in {town}.",
        "{S} retired in {year}, after a long illness.",
    ),
}
_ASIDE_KINDS = ("person",)  # values whose details make good distractors (other people's towns and years)
_RIVAL_LEADS = {
    "company": ("a rival firm, {m},", "another company, {m},", "its nearest competitor, {m},"),
    "town": ("the neighbouring town of {m}", "{m}, a smaller town downstream,", "the nearby town of {m}"),
    "ship": ("another ship, {m},", "her sister ship, {m},", "a second vessel, {m},"),
    "device": ("a competing design, {m},", "another machine, {m},", "{m}, its main rival,"),
    "river": ("a second river, {m},", "its neighbour, {m},", "{m}, a smaller river to the east,"),
    "person": ("a colleague, {m},", "{m}, a friend from school,", "another local figure, {m},"),
}


@dataclass
class _Sentence:
    about: _Entity
    render: Callable[[str, str], str]  # (subject at the start, subject inside) -> text
    opens_with_subject: bool


@dataclass
class _Fact:
    entity: _Entity
    relation: _Relation
    answer: str  # the value as the answer names it
    sentence: _Sentence
    value_entity: _Entity | None  # the value, where it is a person, town, company...


class _Passage:
    """Values for one passage (or document): every number and name in it distinct."""

    def __init__(self, rng: random.Random, names: _Names) -> None:
        self.rng = rng
        self.names = names
        self.seen: set[str] = set()

    def number(self, kind: str) -> str:
        low, high = _NUMBERS[kind]
        while True:
            value = self.rng.randint(low, high)
            text = str(value) if kind == "year" or value < 1000 else f"{value:,}"
            if normalize(text) not in self.seen:
                self.seen.add(normalize(text))
                return text

    def fact(self, entity: _Entity, relation: _Relation) -> _Fact:
        value = None if relation.value in _NUMBERS else _entity(relation.value, self.names, self.rng)
        written = self.number(relation.value) if value is None else value.mention
        template = self.rng.choice(relation.sentences)
        job, noun = self.rng.choice(_PROFESSIONS), entity.noun.removeprefix("the ")
        a_job = ("an " if job[0] in "aeiou" else "a ") + job

        def render(opening: str, inside: str) -> str:
            return _capitalize(template.format(S=opening, s=inside, v=written, job=job, a_job=a_job, noun=noun))

        sentence = _Sentence(entity, render, template.startswith("{S}"))
        return _Fact(entity, relation, written if value is None else value.answer, sentence, value)

    def detail(self, entity: _Entity) -> _Sentence:
        """A sentence that answers no question (a colour, a material, where someone moved later...)."""
        template = self.rng.choice(_DETAILS[entity.kind])
        fill = {"colour": self.rng.choice(_COLOURS), "material": self.rng.choice(_MATERIALS)}
        for kind in ("year", "population"):
            if "{" + kind + "}" in template:
                fill[kind] = self.number(kind)
        if "{town}" in template:
            fill["town"] = _entity("town", self.names, self.rng).mention

        def render(opening: str, inside: str) -> str:
            return _capitalize(template.format(S=opening, s=inside, **fill))

        return _Sentence(entity, render, template.startswith("{S}"))


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _write(sentences: Sequence[_Sentence], rng: random.Random, rival: _Entity | None = None) -> str:
    """Join sentences, naming each subject in full the first time, then by pronoun (right after a sentence
    about the same entity), description or short name. The rival's first sentence introduces it."""
    introduced: set[str] = set()
    previous: _Entity | None = None
    text: list[str] = []
    for sentence in sentences:
        entity = sentence.about
        if entity.mention not in introduced:
            introduced.add(entity.mention)
            opening = inside = entity.mention
            if entity is rival and sentence.opens_with_subject:
                opening = rng.choice(_RIVAL_LEADS[entity.kind]).format(m=entity.mention)
        elif previous is entity:
            opening = rng.choice((entity.pronoun, entity.noun, entity.short))
            inside = rng.choice((entity.noun, entity.short))
        else:
            opening = inside = entity.short
        text.append(sentence.render(opening, inside).replace(",,", ","))
        previous = entity
    return " ".join(text)


def _with_asides(facts: Sequence[_Fact], values: _Passage, count: int) -> list[_Sentence]:
    """The facts' sentences, `count` of them followed by a detail about their value (a founder, a town)."""
    sentences = []
    candidates = [f for f in facts if f.value_entity is not None and f.value_entity.kind in _ASIDE_KINDS]
    explained = values.rng.sample(candidates, min(count, len(candidates)))
    for fact in facts:
        sentences.append(fact.sentence)
        if fact in explained:
            assert fact.value_entity is not None
            sentences.append(values.detail(fact.value_entity))
    return sentences


def _passage_item(rng: random.Random, names: _Names) -> _Drawn:
    """A ~100-word passage about an entity and a rival of its kind with some of the same relations (the
    distractors), details about both and about the people and places named; a question about one fact."""
    values = _Passage(rng, names)
    kind = rng.choice(_KINDS)
    main, rival = _entity(kind, names, rng), _entity(kind, names, rng)
    relations = list(_RELATIONS[kind])
    rng.shuffle(relations)
    main_facts = [values.fact(main, relation) for relation in relations]
    rival_facts = [values.fact(rival, relation) for relation in rng.sample(relations[:4], 3)]
    asked = rng.choice(main_facts if rng.random() < 0.7 else rival_facts)
    sentences = _with_asides(main_facts[:3], values, 1)
    sentences.insert(rng.randint(1, len(sentences)), values.detail(main))
    sentences += _with_asides(rival_facts, values, rng.randint(0, 1))
    if rng.random() < 0.5:
        sentences.append(values.detail(rival))
    sentences += [f.sentence for f in main_facts[3:]]
    passage = _write(sentences, rng, rival)
    question = _capitalize(rng.choice(asked.relation.questions).format(q=asked.entity.asked_as))
    _check(question, asked.answer, passage)
    return question, asked.answer, passage, ()


def _retrieval(rng: random.Random, names: _Names, config: ItemConfig) -> tuple[dict[str, str], list[_Drawn]]:
    """A pool of documents, each about one entity (5 facts and details); questions about their facts, each
    with its gold document and distractors, half of them about entities of the same kind, shuffled."""
    documents: dict[str, str] = {}
    kinds: dict[str, str] = {}
    askable: list[tuple[str, _Fact]] = []
    for index in range(config.documents):
        values = _Passage(rng, names)
        kind = _KINDS[index % len(_KINDS)]
        entity = _entity(kind, names, rng)
        relations = list(_RELATIONS[kind])
        rng.shuffle(relations)
        facts = [values.fact(entity, relation) for relation in relations]
        sentences = _with_asides(facts, values, 1)
        for _ in range(2):
            sentences.insert(rng.randint(1, len(sentences)), values.detail(entity))
        doc_id = f"doc-{index:02d}"
        documents[doc_id], kinds[doc_id] = _write(sentences, rng), kind
        askable += [(doc_id, fact) for fact in facts[:_QUESTIONS_PER_DOCUMENT]]
    rng.shuffle(askable)
    drawn = []
    for doc_id, fact in askable[: config.items_per_shape]:
        others = [d for d in documents if d != doc_id]
        alike = [d for d in others if kinds[d] == kinds[doc_id]]
        count = config.documents_per_question - 1
        chosen = rng.sample(alike, min(len(alike), count // 2 + count % 2))
        chosen += rng.sample([d for d in others if d not in chosen], count - len(chosen))
        order = [doc_id, *chosen]
        rng.shuffle(order)
        question = _capitalize(rng.choice(fact.relation.questions).format(q=fact.entity.asked_as))
        _check(question, fact.answer, documents[doc_id])
        drawn.append((question, fact.answer, documents[doc_id], tuple(order)))
    return documents, drawn


def _check(question: str, answer: str, passage: str) -> None:
    """The generator's own promises: the answer is in the passage and not in the question."""
    if not contains_answer(passage, answer):
        raise AssertionError(f"answer {answer!r} is not in its passage: {passage}")
    if contains_answer(question, answer):
        raise AssertionError(f"answer {answer!r} is given away by the question {question!r}")
