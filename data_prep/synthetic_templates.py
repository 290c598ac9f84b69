"""Entity types, relations and every sentence / question template of the synthetic world.

Placeholders (filled by `data_prep.synthetic_articles` and `data_prep.synthetic`):

- `{S}` / `{s}`: the subject at the start of a sentence / inside it (`The Velmora loom` / `the Velmora loom`,
  a pronoun such as `She`, an anaphor such as `the city`, or in a distractor fact an appositive such as
  `Her mentor, Isel Tarkon,`).
- `{P}`: the subject's possessive at the start of a sentence (`Tovan Velmora's`, `Her`, `Its`).
- `{pr}`: the subject's pronoun inside a sentence (`he`, `she`, `it`).
- `{v}`: the value (the answer string, verbatim); `{a_v}`: the value with its indefinite article.
- `{noun}`: the subject's kind (`loom`, `heron`, `city`...).

Question templates are split once and for all: `train_questions` are used by train and dev questions,
`test_questions` only by test questions, so a test question's wording was never trained on.
Facts whose template starts with `{S} ` and has no `{P}` can describe a *related* entity inside another
article (a distractor fact); the others are only used for an article's own entity.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class RelationSpec:
    """One attribute of an entity type: how its value is drawn, stated in an article and asked about.

    kind: `entity` (target = an entity type; the value is that entity's title), `year` (lo..hi),
    `number` (lo..hi, rendered `f"{n} {target}"`, e.g. `14 years`) or `pool` (target = a vocabulary pool).
    """

    name: str
    kind: str
    target: str
    facts: tuple[str, ...]
    train_questions: tuple[str, ...]
    test_questions: tuple[str, ...]
    role: str = ""  # appositive naming the value entity in a distractor fact, e.g. `{Poss} mentor`
    lo: int = 0
    hi: int = 0

    @cached_property  # (writes the instance __dict__ directly, so it works on a frozen dataclass)
    def distractor_facts(self) -> tuple[str, ...]:
        return tuple(f for f in self.facts if f.startswith("{S} ") and "{P}" not in f)


@dataclass(frozen=True)
class TypeSpec:
    """An entity type; `relations[0]` is stated first, in the article's opening sentence."""

    name: str
    relations: tuple[RelationSpec, ...]
    anaphors: tuple[str, ...]  # how later sentences may refer to the subject (besides its name)
    flavor: tuple[str, ...]  # sentences with no answerable fact, for realistic text


def R(name, kind, target, facts, train_q, test_q, role="", lo=0, hi=0) -> RelationSpec:
    return RelationSpec(name, kind, target, tuple(facts), tuple(train_q), tuple(test_q), role, lo, hi)


# The tables below are kept compact by hand (one relation per block) rather than one string per line.
# fmt: off
OCCUPATIONS = (
    "cartographer", "engineer", "botanist", "chemist", "architect", "surveyor", "painter", "composer",
    "physician", "astronomer", "geologist", "linguist", "historian", "sculptor", "poet", "merchant",
    "shipwright", "clockmaker", "glassblower", "mathematician", "economist", "diplomat", "judge", "teacher",
    "printer", "brewer", "weaver", "potter", "navigator", "archivist", "librarian", "metallurgist",
    "cooper", "translator", "violinist", "surgeon", "philosopher", "inventor", "banker", "engraver",
)
COMPANY_KINDS = ("Works", "Holdings", "Company", "Foundry", "Mills", "Industries", "Trading", "Guild")
DEVICES = ("loom", "lantern", "engine", "press", "compass", "kiln", "pump", "clock", "telescope", "furnace",
           "sextant", "turbine", "lathe", "barometer", "still", "winch")
ANIMALS = ("heron", "moth", "vole", "trout", "finch", "beetle", "lizard", "hare", "owl", "newt", "crab",
           "swift", "marten", "eel", "wren", "toad")
CITY_FORMS = ("{}", "New {}", "Old {}", "Upper {}", "Lower {}", "Port {}", "North {}", "South {}")
MOUNTAIN_FORMS = ("Mount {}", "{} Peak", "{} Crag", "{} Fell", "{} Spire", "{} Ridge")
# The word that tells apart the entities of one type sharing a stem (persons use invented given names).
NAME_WORDS = {"city": CITY_FORMS, "company": COMPANY_KINDS, "invention": DEVICES, "species": ANIMALS,
              "mountain": MOUNTAIN_FORMS}
LANDFORMS = ("Highlands", "Basin", "Coast", "Plains", "Marches", "Valley", "Uplands", "Fens")
MATERIAL_SUFFIXES = ("ite", "ium", "ine", "ane")

PERSON = TypeSpec(
    "person",
    (
        R("person.occupation", "pool", "occupations",
          ["{S} is {a_v}.", "{S} is {a_v} by profession.", "{S} works as {a_v}."],
          ["What is the occupation of {s}?", "What does {s} do for a living?", "What profession does {s} practise?"],
          ["What job does {s} have?", "In what line of work is {s}?"]),
        R("person.birthplace", "entity", "city",
          ["{S} was born in {v}.", "{S} was born in the city of {v}.", "{P} birthplace is {v}.",
           "{S} comes from {v}, where {pr} was born."],
          ["Where was {s} born?", "In which city was {s} born?", "What is the birthplace of {s}?"],
          ["Which city is {s} originally from?", "{S} was born in what city?"],
          role="{Poss} home city"),
        R("person.birth_year", "year", "",
          ["{S} was born in {v}.", "{S} was born in the year {v}.", "{P} year of birth is {v}."],
          ["In what year was {s} born?", "When was {s} born?", "What is the birth year of {s}?"],
          ["{S} was born in which year?", "Which year saw the birth of {s}?"], lo=1750, hi=1960),
        R("person.employer", "entity", "company",
          ["{S} works for {v}.", "{S} is employed by {v}.", "{P} employer is {v}.",
           "{S} has worked at {v} for many years."],
          ["Who employs {s}?", "Which company does {s} work for?", "What is the employer of {s}?"],
          ["{S} is employed by which company?", "At which firm does {s} work?"],
          role="{Poss} employer"),
        R("person.mentor", "entity", "person",
          ["{S} was trained by {v}.", "{P} mentor was {v}.", "{S} studied under {v}."],
          ["Who was the mentor of {s}?", "Who trained {s}?", "Under whom did {s} study?"],
          ["Who taught {s}?", "{S} was a student of whom?"],
          role="{Poss} mentor"),
    ),
    anaphors=(),  # persons are referred to by pronoun
    flavor=("{S} kept detailed notebooks that survive today.", "{S} spent many summers travelling abroad.",
            "{S} is remembered as a patient and careful worker.", "{S} rarely spoke in public."),
)

CITY = TypeSpec(
    "city",
    (
        R("city.region", "pool", "regions",
          ["{S} is a city in the {v}.", "{S} is a town in the {v}.", "{S} is a city that lies in the {v}."],
          ["In which region is {s}?", "Where is {s} located?", "What region is {s} part of?"],
          ["{S} lies in which region?", "Which region contains the city of {s}?"]),
        R("city.river", "pool", "rivers",
          ["The river {v} flows through {s}.", "{S} stands on the river {v}.",
           "{S} was built on the banks of the {v}."],
          ["Which river flows through {s}?", "On what river does {s} stand?", "What is the river of {s}?"],
          ["{S} lies on which river?", "Which river runs through {s}?"]),
        R("city.founded", "year", "",
          ["{S} was founded in {v}.", "{S} was established in {v}.", "{S} dates from {v}."],
          ["When was {s} founded?", "In what year was {s} founded?", "What is the founding year of {s}?"],
          ["{S} was established in which year?", "In which year did the founding of {s} take place?"],
          lo=900, hi=1750),
        R("city.mayor", "entity", "person",
          ["The mayor of {s} is {v}.", "{S} is governed by {v}.", "{P} mayor is {v}."],
          ["Who is the mayor of {s}?", "Who governs {s}?", "Who leads the city of {s}?"],
          ["{S} has which mayor?", "Which person serves as mayor of {s}?"],
          role="{Poss} mayor"),
        R("city.export", "pool", "materials",
          ["{S} is known for its trade in {v}.", "The main export of {s} is {v}.", "{S} exports {v}."],
          ["What is the main export of {s}?", "What does {s} export?", "What is {s} known for trading?"],
          ["Which material is exported from {s}?", "{S} trades mainly in what?"]),
        R("city.twin", "entity", "city",
          ["{S} is twinned with {v}.", "The twin city of {s} is {v}.",
           "{S} has a partnership with the city of {v}."],
          ["Which city is {s} twinned with?", "What is the twin city of {s}?", "What is the partner city of {s}?"],
          ["{S} is twinned with which city?", "With what city does {s} have a partnership?"],
          role="{Poss} twin city"),
    ),
    anaphors=("the city",),
    flavor=("{S} holds a large market every spring.", "The old quarter of {s} is known for its narrow streets.",
            "{S} has a small university and two museums.", "{S} is crossed by several stone bridges."),
)

COMPANY = TypeSpec(
    "company",
    (
        R("company.headquarters", "entity", "city",
          ["{S} is a company based in {v}.", "{S} is a firm headquartered in {v}.",
           "{S} is a company with its headquarters in {v}."],
          ["Where is {s} based?", "In which city is {s} headquartered?", "Where are the headquarters of {s}?"],
          ["{S} has its head office in which city?", "Which city is home to {s}?"],
          role="{Poss} home city"),
        R("company.founder", "entity", "person",
          ["{S} was founded by {v}.", "{S} was started by {v}.", "{P} founder was {v}."],
          ["Who founded {s}?", "Who started {s}?", "Who is the founder of {s}?"],
          ["{S} was founded by whom?", "Which person established {s}?"],
          role="{Poss} founder"),
        R("company.founded", "year", "",
          ["{S} was founded in {v}.", "{S} opened in {v}.", "{S} has been trading since {v}."],
          ["When was {s} founded?", "In what year was {s} founded?", "What year did {s} open?"],
          ["{S} was established in which year?", "Since what year has {s} existed?"], lo=1780, hi=1990),
        R("company.product", "entity", "invention",
          ["{S} is best known for the {v}.", "{S} makes the {v}.", "The main product of {s} is the {v}."],
          ["What is the main product of {s}?", "What does {s} make?", "What is {s} best known for making?"],
          ["Which device is produced by {s}?", "{S} manufactures what?"],
          role="{Poss} main product"),
        R("company.rival", "entity", "company",
          ["{S} competes with {v}.", "The main rival of {s} is {v}.", "{P} chief competitor is {v}."],
          ["Who is the main rival of {s}?", "Which company competes with {s}?",
           "What is the chief competitor of {s}?"],
          ["{S} is in competition with which company?", "Which firm is the rival of {s}?"],
          role="{Poss} rival"),
    ),
    anaphors=("the company", "the firm"),
    flavor=("{S} employs several hundred workers.", "{S} began as a small family workshop.",
            "{S} publishes a short report every year.", "{S} has offices in several towns."),
)

INVENTION = TypeSpec(
    "invention",
    (
        R("invention.inventor", "entity", "person",
          ["{S} is a device invented by {v}.", "{S} is a machine designed by {v}.",
           "{S} is an instrument first built by {v}."],
          ["Who invented {s}?", "Who designed {s}?", "Who is the inventor of {s}?"],
          ["{S} was invented by whom?", "Which person created {s}?"],
          role="{Poss} inventor"),
        R("invention.year", "year", "",
          ["{S} was invented in {v}.", "{S} was first built in {v}.", "{S} dates from {v}."],
          ["When was {s} invented?", "In what year was {s} invented?", "What year was {s} first built?"],
          ["{S} was created in which year?", "In which year did {s} appear?"], lo=1760, hi=1990),
        R("invention.material", "pool", "materials",
          ["{S} is made of {v}.", "{S} is built from {v}.", "The frame of {s} is made of {v}."],
          ["What is {s} made of?", "What material is {s} built from?", "From what is {s} made?"],
          ["Which material is used to build {s}?", "{S} is made from what material?"]),
        R("invention.city", "entity", "city",
          ["{S} was first shown in {v}.", "{S} was first demonstrated in {v}.",
           "The first public showing of {s} took place in {v}."],
          ["Where was {s} first shown?", "In which city was {s} first demonstrated?",
           "Where was {s} first demonstrated?"],
          ["{S} was first presented in which city?", "Which city saw the first showing of {s}?"]),
        R("invention.predecessor", "entity", "invention",
          ["{S} replaced the {v}.", "{S} was developed from the {v}.", "{S} succeeded the older {v}."],
          ["What did {s} replace?", "Which device came before {s}?", "What was {s} developed from?"],
          ["{S} succeeded which device?", "What is the predecessor of {s}?"],
          role="{Poss} predecessor"),
    ),
    anaphors=("the {noun}", "the device"),
    flavor=("{S} was widely copied in the following decades.", "Early models of {s} were slow but reliable.",
            "{S} is still shown in several museums.", "{S} needed two people to operate."),
)

SPECIES = TypeSpec(
    "species",
    (
        R("species.habitat", "pool", "regions",
          ["{S} is a species of {noun} found in the {v}.", "{S} is a species native to the {v}.",
           "{S} is an animal that lives in the {v}."],
          ["Where does {s} live?", "What is the habitat of {s}?", "In which region is {s} found?"],
          ["{S} is native to which region?", "Which region is home to {s}?"]),
        R("species.prey", "entity", "species",
          ["{S} feeds on the {v}.", "{S} hunts the {v}.", "The main prey of {s} is the {v}."],
          ["What does {s} eat?", "What does {s} feed on?", "What is the main prey of {s}?"],
          ["{S} hunts which animal?", "Which species does {s} prey on?"],
          role="{Poss} prey"),
        R("species.discoverer", "entity", "person",
          ["{S} was first described by {v}.", "{S} was discovered by {v}.", "{P} discoverer was {v}."],
          ["Who discovered {s}?", "Who first described {s}?", "Who is credited with discovering {s}?"],
          ["{S} was discovered by whom?", "Which naturalist first described {s}?"],
          role="{Poss} discoverer"),
        R("species.discovered", "year", "",
          ["{S} was discovered in {v}.", "{S} was first recorded in {v}.", "{S} was first described in {v}."],
          ["When was {s} discovered?", "In what year was {s} first recorded?", "What year was {s} discovered?"],
          ["{S} was first described in which year?", "In which year was {s} discovered?"], lo=1760, hi=1990),
        R("species.lifespan", "number", "years",
          ["{S} lives for about {v}.", "{S} can live up to {v}.", "The typical lifespan of {s} is {v}."],
          ["How long does {s} live?", "What is the lifespan of {s}?", "How many years does {s} live?"],
          ["{S} lives for how long?", "What age does {s} typically reach?"], lo=3, hi=60),
    ),
    anaphors=("the {noun}", "the species"),
    flavor=("{S} is most active at dawn.", "{S} is rarely seen in winter.",
            "{S} is protected in several reserves.", "{S} nests in small groups."),
)

MOUNTAIN = TypeSpec(
    "mountain",
    (
        R("mountain.range", "pool", "regions",
          ["{S} is a mountain in the {v}.", "{S} is a peak in the {v}.", "{S} is the highest mountain of the {v}."],
          ["In which region is {s}?", "Where is {s} located?", "What region is {s} part of?"],
          ["{S} lies in which region?", "Which region contains {s}?"]),
        R("mountain.height", "number", "metres",
          ["{S} is {v} high.", "{S} rises to {v}.", "The summit of {s} stands at {v}."],
          ["How high is {s}?", "What is the height of {s}?", "How tall is {s}?"],
          ["{S} rises to what height?", "What elevation does {s} reach?"], lo=1200, hi=4800),
        R("mountain.climber", "entity", "person",
          ["{S} was first climbed by {v}.", "The first ascent of {s} was made by {v}.",
           "{P} first climber was {v}."],
          ["Who first climbed {s}?", "Who made the first ascent of {s}?",
           "Who was the first person to climb {s}?"],
          ["{S} was first climbed by whom?", "Which climber first reached the top of {s}?"],
          role="{Poss} first climber"),
        R("mountain.ascent", "year", "",
          ["{S} was first climbed in {v}.", "{S} was first summited in {v}.",
           "The first ascent of {s} took place in {v}."],
          ["When was {s} first climbed?", "In what year was {s} first climbed?",
           "What year was the first ascent of {s}?"],
          ["{S} was first climbed in which year?", "In which year did the first ascent of {s} happen?"],
          lo=1780, hi=1990),
        R("mountain.city", "entity", "city",
          ["The nearest town to {s} is {v}.", "{S} can be reached from {v}.", "{S} overlooks the city of {v}."],
          ["Which city is nearest to {s}?", "What is the nearest town to {s}?",
           "From which city can {s} be reached?"],
          ["{S} overlooks which city?", "Which city lies closest to {s}?"],
          role="The nearest town"),
    ),
    anaphors=("the mountain", "the peak"),
    flavor=("The slopes of {s} are covered in pine forest.", "{S} is popular with walkers in summer.",
            "{S} is often hidden by cloud.", "A narrow path leads to the summit of {s}."),
)
# fmt: on

TYPES: tuple[TypeSpec, ...] = (PERSON, CITY, COMPANY, INVENTION, SPECIES, MOUNTAIN)
TYPE_INDEX = {t.name: k for k, t in enumerate(TYPES)}
RELATIONS = {r.name: r for t in TYPES for r in t.relations}
