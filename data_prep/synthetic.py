"""The synthetic knowledge world: a seeded, streaming generator of a fictional encyclopedia.

Entity `i` of a world of `n` entities has type `TYPES[i % 6]` (person, city, company, invention, species,
mountain), a unique title, 5-6 typed attributes, and a short article (2-3 paragraphs, ~60-130 words)
stating every attribute plus `distractor_facts` true facts about related entities ("Her mentor, Isel
Tarkon, was born in 1820."). Attributes point at other entities of the world (a person's birthplace is
a city entity, a company's founder a person entity), so names recur across articles.

Everything about entity `i` is a pure function of (world seed, n, i): no state, no materialised world,
so 1,000,000 articles stream in constant memory and `World(cfg).document(999_999)` is instant.

Retrieval is hard on purpose (see `synthetic_names`): entities `6k .. 6k+5` share one name stem across
the six types (`Old Velmora`, `Tovan Velmora`, `Velmora Works`, `Velmora loom`, `Velmora heron`,
`Velmora Peak`), and `name_variants` consecutive `k` (a cluster) differ only in the last syllable of the
stem (`Velmora Works`, `Velmoras Works`, `Velmorith Works`...): with the default 12, off-the-shelf MiniLM
finds the right article in its top 5 for ~85% of test questions. Every question still names its entity
by its full, unique title, so it stays answerable.

Questions: `questions_per_entity` attributes per entity, each asked with a paraphrase template; the
entity's split is `data_prep.split.split_of(title, seed, dev_fraction, test_fraction)` (the one split rule)
and test questions use templates that train and dev questions never use.

    python -m data_prep.synthetic --config configs/default.yaml [--out DIR]   # write corpus.jsonl + qa.jsonl
    python -m data_prep.synthetic --config configs/default.yaml --show 2      # print two articles
    python -m data_prep.synthetic --config configs/default.yaml --stats [--json FILE]

(`--stats` is `data_prep.synthetic_stats`: sizes, lengths, majority baseline. Off-the-shelf retrieval over
the articles, once `--stats --retrieval`, is `python -m retriever.synthetic_eval`: it needs the retriever.)
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from common.atomic import atomic_write_json, fingerprint
from common.errors import UserError
from configs.schema import SyntheticConfig
from data_prep.records import Document, QAExample
from data_prep.split import split_of
from data_prep.synthetic_articles import cap, render_article
from data_prep.synthetic_names import (
    CLUSTER_SPACE,
    MAX_VARIANTS,
    MEDIALS,
    NUCLEI,
    ONSETS,
    StemSpace,
    mix,
    rng,
    short_word,
    word_pool,
)
from data_prep.synthetic_templates import (
    LANDFORMS,
    MATERIAL_SUFFIXES,
    NAME_WORDS,
    OCCUPATIONS,
    TYPE_INDEX,
    TYPES,
    RelationSpec,
)

# Bump when the generated text or questions change, so `write_world` regenerates cached files.
GENERATOR_VERSION = 1
N_TYPES = len(TYPES)
MIN_ENTITIES = 2 * N_TYPES  # every type needs two members (a person's mentor is another person)
# Invented regions / rivers / materials per world: a majority answer is right ~1/48 of the time.
POOL_SIZE = 48
GIVEN_NAMES = 64


@dataclass(frozen=True)
class Value:
    """An attribute value: `text` is the answer string as written in articles; `ref` the entity it names."""

    text: str
    ref: int | None = None


@dataclass(frozen=True)
class Entity:
    index: int
    type: str
    title: str  # unique in the world; also the split key
    subject: str  # how text names it inside a sentence (`the Velmora loom`)
    noun: str  # its kind (`loom`, `heron`, `city`)
    pronoun: str  # he / she / it
    attrs: dict[str, Value]  # relation name -> value, in the type's relation order

    @property
    def doc_id(self) -> str:
        return doc_id(self.index)


def doc_id(index: int) -> str:
    return f"syn-{index:07d}"


class World:
    """One synthetic world (a `SyntheticConfig`); every method is O(1) in the world size."""

    def __init__(self, cfg: SyntheticConfig):
        n, v = cfg.n_entities, cfg.name_variants
        if not 1 <= v <= MAX_VARIANTS:
            raise UserError(f"data.synthetic.name_variants must be in 1..{MAX_VARIANTS}, got {v}")
        capacity = CLUSTER_SPACE * v * N_TYPES
        if not MIN_ENTITIES <= n <= capacity:
            raise UserError(f"data.synthetic.n_entities must be in {MIN_ENTITIES}..{capacity:,}, got {n}")
        if cfg.questions_per_entity < 1:
            raise UserError(
                f"data.synthetic.questions_per_entity must be >= 1, got {cfg.questions_per_entity}"
            )
        if cfg.distractor_facts < 0:
            raise UserError(f"data.synthetic.distractor_facts must be >= 0, got {cfg.distractor_facts}")
        self.cfg = cfg
        self.seed = cfg.seed
        self.n = n
        self.stems = StemSpace(cfg.seed)
        # Names are asked for again and again (each article names ~10 related entities): memoise them.
        self.naming = lru_cache(maxsize=1 << 16)(self._naming)
        # Vocabulary pools shared by several types (regions are city, species and mountain answers).
        s = cfg.seed
        self.pools = {
            "occupations": OCCUPATIONS,
            "regions": word_pool(
                s, "regions", POOL_SIZE, lambda r: f"{short_word(r, False)} {r.choice(LANDFORMS)}"
            ),
            "rivers": word_pool(s, "rivers", POOL_SIZE, short_word),
            "materials": word_pool(
                s,
                "materials",
                POOL_SIZE,
                lambda r: (
                    r.choice(ONSETS[1:]) + r.choice(NUCLEI) + r.choice(MEDIALS) + r.choice(MATERIAL_SUFFIXES)
                ),
            ),
        }
        self.given_names = word_pool(s, "given", GIVEN_NAMES, lambda r: short_word(r, r.random() < 0.5))

    def __len__(self) -> int:
        return self.n

    # ------------------------------------------------------------------ names (no attributes needed)

    def type_of(self, i: int) -> str:
        return TYPES[i % N_TYPES].name

    def count_of_type(self, type_name: str) -> int:
        t = TYPE_INDEX[type_name]
        return (self.n - t + N_TYPES - 1) // N_TYPES

    def _check(self, i: int) -> None:
        if not 0 <= i < self.n:
            raise IndexError(f"entity {i} outside a world of {self.n}")

    def _naming(self, i: int) -> tuple[str, str, str, str]:
        """(title, subject, noun, pronoun) of entity i, computed from (seed, i) alone.

        Entities 6k..6k+5 (one per type) share stem k; the `name_variants` consecutive k of one cluster
        share the stem but its last vowel and coda (`Velmora`, `Velmoras`...) and, per type, the other
        word of the title (`Works`, `loom`, a given name...). Distinct (cluster, variant) give distinct
        stems, so titles are unique within a type, and the types' title shapes differ, so titles are unique.
        """
        self._check(i)
        cluster, variant = divmod(i // N_TYPES, self.cfg.name_variants)
        stem = self.stems.stem(cluster, variant)
        kind = self.type_of(i)
        words = NAME_WORDS[kind] if kind != "person" else self.given_names
        word = words[mix(self.seed, cluster, kind) % len(words)]
        if kind == "person":
            pronoun = "she" if mix(self.seed, i, "gender") & 1 else "he"
            return f"{word} {stem}", f"{word} {stem}", "person", pronoun
        if kind in ("city", "mountain"):
            title = word.format(stem)
            return title, title, kind, "it"
        if kind == "company":
            title = f"{stem} {word}"
            return title, title, "company", "it"
        return f"{stem} {word}", f"the {stem} {word}", word, "it"  # invention, species

    def title(self, i: int) -> str:
        return self.naming(i)[0]

    # ------------------------------------------------------------------ attributes

    def _related(self, r, i: int, type_name: str) -> int:
        """A uniformly drawn entity of `type_name` other than i."""
        count, t = self.count_of_type(type_name), TYPE_INDEX[type_name]
        k = r.randrange(count)
        j = k * N_TYPES + t
        if j == i:
            j = ((k + 1) % count) * N_TYPES + t
        return j

    def _value(self, r, i: int, rel: RelationSpec) -> Value:
        if rel.kind == "entity":
            j = self._related(r, i, rel.target)
            return Value(self.title(j), j)
        if rel.kind == "year":
            return Value(str(r.randint(rel.lo, rel.hi)))
        if rel.kind == "number":
            return Value(f"{r.randint(rel.lo, rel.hi)} {rel.target}")
        return Value(r.choice(self.pools[rel.target]))

    def entity(self, i: int) -> Entity:
        title, subject, noun, pronoun = self.naming(i)
        spec = TYPES[i % N_TYPES]
        r = rng(self.seed, self.n, i, "attrs")
        attrs = {rel.name: self._value(r, i, rel) for rel in spec.relations}
        return Entity(i, spec.name, title, subject, noun, pronoun, attrs)

    def __iter__(self) -> Iterator[Entity]:
        return (self.entity(i) for i in range(self.n))

    # ------------------------------------------------------------------ articles

    def document(self, i: int) -> Document:
        return render_article(self, self.entity(i))

    # ------------------------------------------------------------------ questions

    def question_plan(self, e: Entity) -> list[RelationSpec]:
        """The relations asked about entity e (independent of the split, so ids are stable)."""
        relations = TYPES[TYPE_INDEX[e.type]].relations
        r = rng(self.seed, e.index, "questions")
        picked = sorted(r.sample(range(len(relations)), min(self.cfg.questions_per_entity, len(relations))))
        return [relations[k] for k in picked]

    def questions(self, e: Entity, split: str) -> Iterator[tuple[QAExample, str]]:
        """(example, template) pairs; test entities draw from the held-out templates."""
        for rel in self.question_plan(e):
            pool = rel.test_questions if split == "test" else rel.train_questions
            template = pool[mix(self.seed, e.index, rel.name, "template") % len(pool)]
            question = template.format(S=cap(e.subject), s=e.subject)
            ex = QAExample(
                id=f"{e.doc_id}-{rel.name}",
                question=question,
                answers=[e.attrs[rel.name].text],
                gold_doc_id=e.doc_id,
                title=e.title,
                split=split,
                relation=rel.name,
            )
            yield ex, template


# ---------------------------------------------------------------------------------------------- public API


def iter_documents(cfg: SyntheticConfig) -> Iterator[Document]:
    """Every article of the world, in entity order (streaming)."""
    world = World(cfg)
    return (world.document(i) for i in range(world.n))


def iter_question_templates(
    cfg: SyntheticConfig, seed: int = 0, dev_fraction: float = 0.1, test_fraction: float = 0.2
) -> Iterator[tuple[QAExample, str]]:
    """(question, the template that produced it) for every question of the world (streaming)."""
    world = World(cfg)
    for e in world:
        yield from world.questions(e, split_of(e.title, seed, dev_fraction, test_fraction))


def iter_questions(
    cfg: SyntheticConfig, seed: int = 0, dev_fraction: float = 0.1, test_fraction: float = 0.2
) -> Iterator[QAExample]:
    """Every question (with `split` set by the one split rule on its article's title), in entity order."""
    return (ex for ex, _ in iter_question_templates(cfg, seed, dev_fraction, test_fraction))


def majority_answers(train: Iterable[QAExample]) -> dict[str, str]:
    """relation -> its most frequent first answer (ties broken by the answer string, for determinism)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for ex in train:
        if ex.relation and ex.answers:
            counts[ex.relation][ex.answers[0]] += 1
    return {rel: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for rel, c in counts.items()}


@contextlib.contextmanager
def _atomic_lines(path: Path):
    """A text file handle whose content replaces `path` only when the block succeeds (streamed writes)."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def world_params(cfg: SyntheticConfig, seed: int, dev_fraction: float, test_fraction: float) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "n_entities": cfg.n_entities,
        "world_seed": cfg.seed,
        "questions_per_entity": cfg.questions_per_entity,
        "name_variants": cfg.name_variants,
        "distractor_facts": cfg.distractor_facts,
        "split_seed": seed,
        "dev_fraction": dev_fraction,
        "test_fraction": test_fraction,
    }


def write_world(
    cfg: SyntheticConfig, out_dir: Path, seed: int = 0, dev_fraction: float = 0.1, test_fraction: float = 0.2
) -> tuple[Path, Path]:
    """Write out_dir/corpus.jsonl ({"id","title","text"}) and out_dir/qa.jsonl ({"id","question","answers",
    "gold_doc_id","relation"}), each atomically, then the sidecar out_dir/synthetic.json (parameters and
    counts) last. Skips the work when both files and a sidecar with the same parameters exist."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    corpus, qa, sidecar = out_dir / "corpus.jsonl", out_dir / "qa.jsonl", out_dir / "synthetic.json"
    params = world_params(cfg, seed, dev_fraction, test_fraction)
    if corpus.is_file() and qa.is_file() and sidecar.is_file():
        try:
            if json.loads(sidecar.read_text(encoding="utf-8")).get("params") == params:
                return corpus, qa
        except (OSError, json.JSONDecodeError):
            pass  # unreadable sidecar: regenerate
    world = World(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    sidecar.unlink(missing_ok=True)  # a crash below must not leave a sidecar vouching for stale files
    with _atomic_lines(corpus) as f:
        for i in tqdm(range(world.n), desc="synthetic corpus", unit="doc", disable=world.n < 20_000):
            d = world.document(i)
            f.write(json.dumps({"id": d.id, "title": d.title, "text": d.text}, ensure_ascii=False) + "\n")
    per_split: Counter = Counter()
    with _atomic_lines(qa) as f:
        for ex in tqdm(
            iter_questions(cfg, seed, dev_fraction, test_fraction),
            desc="synthetic QA",
            unit="q",
            disable=world.n < 20_000,
        ):
            per_split[ex.split] += 1
            f.write(
                json.dumps(
                    {
                        "id": ex.id,
                        "question": ex.question,
                        "answers": ex.answers,
                        "gold_doc_id": ex.gold_doc_id,
                        "relation": ex.relation,
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
    atomic_write_json(
        sidecar,
        {
            "params": params,
            "fingerprint": fingerprint(params),
            "counts": {"documents": world.n, "questions": dict(per_split)},
        },
    )
    return corpus, qa


# ---------------------------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    from configs.cli import build_parser, parse

    parser = build_parser("python -m data_prep.synthetic", __doc__)
    parser.add_argument(
        "--out", default=None, help="output directory (default: RUN_DIR/data, where data_prep.build puts it)"
    )
    parser.add_argument(
        "--show", type=int, default=0, metavar="N", help="print the first N articles and questions"
    )
    parser.add_argument(
        "--stats", action="store_true", help="measure sizes, lengths and the majority baseline"
    )
    parser.add_argument(
        "--retrieval", action="store_true", help="moved: use `python -m retriever.synthetic_eval` (same options)"
    )
    parser.add_argument("--json", default=None, help="with --stats: also write the numbers to this JSON file")
    cfg, ns = parse(parser, argv)
    if ns.retrieval:
        # The retriever is a floor above data_prep; its measurement lives there (docs/ARCHITECTURE.md).
        raise UserError("--retrieval has moved: run `python -m retriever.synthetic_eval --config C [--json FILE]` "
                        "(the same statistics plus off-the-shelf retrieval)")
    syn, d = cfg.data.synthetic, cfg.data
    if ns.show:
        world = World(syn)
        for i in range(min(ns.show, world.n)):
            e = world.entity(i)
            doc = world.document(i)
            split = split_of(e.title, cfg.seed, d.dev_fraction, d.test_fraction)
            print(f"### {doc.title}  [{doc.id}, {e.type}, {split}]")
            print(doc.text)
            for ex, _ in world.questions(e, split):
                print(f"  Q: {ex.question}  A: {ex.answers[0]}")
            print()
        return 0
    if ns.stats:
        from data_prep.synthetic_stats import print_stats, world_stats

        stats = world_stats(cfg)
        print_stats(stats)
        if ns.json:
            atomic_write_json(ns.json, stats)
        return 0
    out = Path(ns.out) if ns.out else Path(cfg.run_dir) / "data"
    corpus, qa = write_world(syn, out, cfg.seed, d.dev_fraction, d.test_fraction)
    print(f"{corpus}\n{qa}")
    return 0


if __name__ == "__main__":
    from configs.cli import run_main

    run_main(main)
