"""Article text of the synthetic world: an entity's facts, distractor facts and flavour in 2-3 paragraphs.

`render_article(world, entity)` is a pure function of the world seed and the entity: it states every
attribute of the entity verbatim (each is an answer string), plus `distractor_facts` true facts about
the entities its attributes point at, phrased like its own facts ("Her mentor, Isel Tarkon, was born in
1820."), so that reading, not just finding the article, matters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from data_prep.records import Document
from data_prep.synthetic_names import rng
from data_prep.synthetic_templates import TYPE_INDEX, TYPES

if TYPE_CHECKING:
    from data_prep.synthetic import Entity, World


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _possessive(name: str) -> str:
    return f"{name}'" if name.endswith("s") else f"{name}'s"


def _with_article(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


_POSSESSIVE = {"he": "his", "she": "her", "it": "its"}


def _forms(e: Entity, mode: str, r=None, apposition: str = "") -> dict[str, str]:
    """Placeholder values naming entity e: by `name`, `anaphor` (pronoun / `the city`) or an apposition."""
    poss = _POSSESSIVE[e.pronoun]
    if mode == "name" or (
        mode == "anaphor" and e.type != "person" and not TYPES[TYPE_INDEX[e.type]].anaphors
    ):
        s, possessive = e.subject, _possessive(cap(e.subject))
    elif mode == "anaphor" and e.type == "person":
        s, possessive = e.pronoun, cap(poss)
    elif mode == "anaphor":
        s = r.choice(TYPES[TYPE_INDEX[e.type]].anaphors).format(noun=e.noun)
        possessive = _possessive(cap(s))
    else:  # apposition: "Her mentor, Isel Tarkon," (only used with subject-first templates)
        s = f"{apposition}, {e.subject}," if apposition else e.subject
        possessive = _possessive(cap(s))
    return {"S": cap(s), "s": s, "P": possessive, "pr": e.pronoun, "noun": e.noun}


def _fill(template: str, forms: dict[str, str], value: str) -> str:
    return template.format(v=value, a_v=_with_article(value), **forms)


def render_article(world: World, e: Entity) -> Document:
    """Opening sentence, then the other facts, distractor facts and 1-2 flavour sentences in shuffled
    order, in 2-3 paragraphs. Every attribute value of e appears verbatim (it is the answer string)."""
    spec = TYPES[TYPE_INDEX[e.type]]
    r = rng(world.seed, world.n, e.index, "article")
    rels = spec.relations
    intro = _fill(r.choice(rels[0].facts), _forms(e, "name"), e.attrs[rels[0].name].text)
    body: list[tuple[str, object]] = [("own", rel) for rel in rels[1:]]
    body += [("flavor", f) for f in r.sample(spec.flavor, r.choice((1, 2)))]
    body += [("distractor", sentence) for sentence in _distractors(world, e, r)]
    r.shuffle(body)

    sentences = [intro]
    about_e = True  # was the previous sentence about e? (only then may a pronoun or anaphor refer to e)
    for kind, item in body:
        if kind == "distractor":
            sentences.append(item)
            about_e = False
            continue
        mode = "anaphor" if about_e and r.random() < 0.4 else "name"
        forms = _forms(e, mode, r)
        if kind == "flavor":
            sentences.append(item.format(**forms))
        else:
            sentences.append(_fill(r.choice(item.facts), forms, e.attrs[item.name].text))
        about_e = True

    n_par = 3 if len(sentences) >= 7 and r.random() < 0.5 else 2
    size = -(-len(sentences) // n_par)
    paragraphs = [" ".join(sentences[k : k + size]) for k in range(0, len(sentences), size)]
    return Document(id=e.doc_id, title=e.title, text="\n\n".join(paragraphs))


def _distractors(world: World, e: Entity, r) -> list[str]:
    """`distractor_facts` true facts about entities e's attributes point at, e.g. `Its rival, Velmara Works,
    was founded in 1873.`: cycling over e's entity-valued attributes, never repeating a fact."""
    linked = [rel for rel in TYPES[TYPE_INDEX[e.type]].relations if rel.kind == "entity"]
    order = r.sample(linked, len(linked))
    others = {rel.name: world.entity(e.attrs[rel.name].ref) for rel in linked}
    used: set[tuple[str, str]] = set()
    out = []
    for d in range(world.cfg.distractor_facts):
        rel = order[d % len(order)]
        other = others[rel.name]
        choices = [
            x
            for x in TYPES[TYPE_INDEX[other.type]].relations
            if x.distractor_facts and other.attrs[x.name].ref != e.index and (rel.name, x.name) not in used
        ]
        if not choices:
            continue
        fact = r.choice(choices)
        used.add((rel.name, fact.name))
        role = rel.role.format(Poss=cap(_POSSESSIVE[e.pronoun])) if rel.role and r.random() < 0.7 else ""
        forms = _forms(other, "apposition", apposition=role)
        out.append(_fill(r.choice(fact.distractor_facts), forms, other.attrs[fact.name].text))
    return out
