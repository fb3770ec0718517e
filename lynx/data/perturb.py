"""Hand-written answer perturbations: turn a gold answer into one the passage contradicts or does not support.

Every perturbation type is a generator of candidates for one gold answer; `check` rejects a candidate that changes
nothing (a no-op), that is another gold answer of the same question, or whose new content the passage still supports; `perturb` tries the types in a seeded order and
returns the first accepted candidate. Randomness comes only from the `random.Random` passed in, so a build is
deterministic for a seed.

Types (Perturbation.kind):
  number        a value, percentage or year changed, formatting kept ("$1,577.00" -> "$1,734.70")
  number_swap   a value replaced by another value of the same kind (year, percentage, ...) that the passage gives
                elsewhere: a number a word-overlap check finds in the document, attached to the wrong fact
  unit          a scale word or unit swapped within its dimension ("million" -> "billion", "mg" -> "g")
  date          a month, day or year inside a date expression changed ("March 1, 1565" -> "April 1, 1565")
  entity        a name swapped with a same-kind name from the same passage, or the other option of an "A or B"
                question
  polarity      negation added or removed, yes/no/maybe flipped (PubMedQA's decision and its long answer)
  antonym       an antonym or the opposite comparative (increase/decrease, higher/lower, more/less)
  added_claim   a sentence appended that the passage does not support
  other_answer  the gold answer of another question about the same passage
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterator

from lynx.data.text import STOPWORDS, content_words, normalize, passage_info

TYPES = ("number", "number_swap", "unit", "date", "entity", "polarity", "antonym", "added_claim", "other_answer")
# Factual edits are tried before the two whole-answer types, so they are not drowned by them.
TYPE_WEIGHTS = {"number": 3, "number_swap": 3, "unit": 3, "date": 3, "entity": 3, "polarity": 3, "antonym": 3,
                "added_claim": 1, "other_answer": 1}
MAX_CANDIDATES_PER_TYPE = 4


@dataclass(frozen=True)
class Edit:
    start: int  # offset of `before` in the gold answer (len(gold) for an appended claim)
    before: str
    after: str


@dataclass(frozen=True)
class Perturbation:
    answer: str  # the perturbed answer
    kind: str
    edits: tuple[Edit, ...]

    @property
    def before(self) -> str:
        return self.edits[0].before

    @property
    def after(self) -> str:
        return self.edits[0].after


@dataclass
class Context:
    """What a perturbation may look at besides the gold answer."""

    question: str
    passage: str
    source: str = ""
    other_answers: tuple[str, ...] = ()  # gold answers of the other questions about this passage
    # Every gold answer the source gives for this question: a question asked twice on one document can have two
    # (COVID-QA, DROP's contrast set), and a FAIL answer equal to any of them would be a correct answer labelled FAIL.
    gold_answers: tuple[str, ...] = ()

    @property
    def info(self):
        return passage_info(self.passage)


def apply_edits(gold: str, edits: list[Edit], kind: str) -> Perturbation:
    """The perturbation made of non-overlapping edits of the gold answer."""
    out, pos = [], 0
    for e in sorted(edits, key=lambda e: e.start):
        assert gold[e.start:e.start + len(e.before)] == e.before and e.start >= pos, (gold, e)
        out += [gold[pos:e.start], e.after]
        pos = e.start + len(e.before)
    out.append(gold[pos:])
    return Perturbation("".join(out), kind, tuple(sorted(edits, key=lambda e: e.start)))


def _match_case(word: str, template: str) -> str:
    if template.isupper() and len(template) > 1:
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


# ---------------------------------------------------------------------------------------------------------- dates

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
MONTH_ABBR = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
_MONTH = r"(?:January|February|March|April|May|June|July|August|September|October|November|December|" \
         r"Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept?|Oct|Nov|Dec)\.?"
_DAY = r"(?:[12]\d|3[01]|0?[1-9])(?:st|nd|rd|th)?"
_YEAR = r"(?:1[0-9]\d\d|20\d\d)"
DATE_RE = re.compile(
    rf"\b(?:(?P<m1>{_MONTH})\s+(?P<d1>{_DAY})(?:,?\s+(?P<y1>{_YEAR}))?"  # March 1, 1565 / March 1
    rf"|(?P<d2>{_DAY})\s+(?P<m2>{_MONTH})(?:,?\s+(?P<y2>{_YEAR}))?"  # 1 March 1565 / 15 March
    rf"|(?P<m3>{_MONTH})(?:,?\s+(?P<y3>{_YEAR}))"  # March 1565
    rf"|(?P<y4>{_YEAR})-(?P<mo4>0[1-9]|1[0-2])-(?P<d4>[0-2]\d|3[01])"  # 2020-04-23
    rf"|(?P<mo5>0?[1-9]|1[0-2])/(?P<d5>[0-2]?\d|3[01])/(?P<y5>{_YEAR})"  # 04/23/2020
    rf"|(?P<m6>January|February|March|April|June|July|August|September|October|November|December))\b"
)


def _date_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in DATE_RE.finditer(text)]


def _other_month(name: str, rng: random.Random) -> str:
    bare = name.rstrip(".")
    dot = name[len(bare):]
    table = MONTHS if bare in MONTHS else MONTH_ABBR
    key = bare[:3]
    i = [m[:3] for m in MONTHS].index(key)
    j = (i + rng.choice([-3, -2, -1, 1, 2, 3])) % 12
    new = table[j]
    if bare == "Sept":
        new = "Sept" if j == 8 else MONTH_ABBR[j]
    return new + dot


def perturb_date(gold: str, ctx: Context, rng: random.Random) -> Iterator[Perturbation]:
    matches = list(DATE_RE.finditer(gold))
    rng.shuffle(matches)
    for m in matches:
        parts = [(k, m.start(k), m.group(k)) for k in m.groupdict() if m.group(k)]
        rng.shuffle(parts)
        for name, start, value in parts:
            if name.startswith("m") and not name.startswith("mo"):
                new = _other_month(value, rng)
            elif name.startswith("mo"):
                new = f"{(int(value) - 1 + rng.choice([-2, -1, 1, 2])) % 12 + 1:0{len(value)}d}"
            elif name.startswith("d"):
                digits = re.match(r"\d+", value).group()
                day = int(digits)
                new_day = rng.choice([d for d in range(1, 29) if d != day and abs(d - day) <= 9])
                new = f"{new_day:0{len(digits)}d}" + _ordinal_suffix(new_day, value[len(digits):])
            else:
                new = str(int(value) + rng.choice([-3, -2, -1, 1, 2, 3]))
            yield apply_edits(gold, [Edit(start, value, new)], "date")


def _ordinal_suffix(day: int, old_suffix: str) -> str:
    if not old_suffix:
        return ""
    if day % 100 in (11, 12, 13):
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")


# -------------------------------------------------------------------------------------------------------- numbers

# A number with optional currency sign, thousands separators, decimals and percent. Not part of a word or code
# ("FY2022", "HIV-1", "COVID-19", "12th"), not a version-like "1.2.3".
NUMBER_RE = re.compile(r"(?<![\w.\-/])(?P<num>\d{1,3}(?:,\d{3})+|\d+)(?P<dec>\.\d+)?(?P<pct>\s?%)?(?![\w/]|\.\d)")


def new_number_text(text: str, rng: random.Random) -> str:
    """A different value written like `text` (same decimals, separators and percent sign)."""
    m = NUMBER_RE.fullmatch(text)
    if not m:
        raise ValueError(f"not a number: {text!r}")
    int_part, dec, pct = m.group("num"), m.group("dec") or "", m.group("pct") or ""
    decimals = len(dec) - 1 if dec else 0
    value = int(int_part.replace(",", "")) + (float(dec) if dec else 0.0)
    is_year = not dec and not pct and "," not in int_part and 1000 <= value <= 2100 and len(int_part) == 4
    if is_year:
        new = value + rng.choice([-3, -2, -1, 1, 2, 3])
    elif not decimals and value < 10:
        new = rng.choice([v for v in (value - 2, value - 1, value + 1, value + 2, value + 3) if v >= 0])
    else:
        factor = rng.choice([0.5, 0.6, 0.75, 0.8, 1.2, 1.25, 1.5, 2.0])
        new = value * factor
        if pct and value <= 100 and new > 100:
            new = value * 0.75
        if decimals:
            new = round(new, decimals)
        else:
            # Keep the look of the number: 400,000 -> 500,000 rather than 487,123.
            trailing = len(int_part.replace(",", "")) - len(int_part.replace(",", "").rstrip("0"))
            unit = 10 ** min(trailing, len(str(int(new))) - 1)
            new = max(unit, round(new / unit) * unit)
        if round(new, decimals) == round(value, decimals):
            new = value + (10 ** -decimals if decimals else 1)
    if decimals:
        body = f"{new:,.{decimals}f}" if "," in int_part else f"{new:.{decimals}f}"
    else:
        body = f"{int(new):,}" if "," in int_part else str(int(new))
    return body + pct


def _number_matches(gold: str, skip_dates: bool = True):
    dates = _date_spans(gold) if skip_dates else []
    for m in NUMBER_RE.finditer(gold):
        if any(s <= m.start() < e for s, e in dates):
            continue
        yield m


def perturb_number(gold: str, ctx: Context, rng: random.Random) -> Iterator[Perturbation]:
    matches = list(_number_matches(gold))
    rng.shuffle(matches)
    for m in matches[:2]:
        old = m.group()
        for _ in range(2):  # a second draw when the first value is rejected (e.g. it is in the passage)
            yield apply_edits(gold, [Edit(m.start(), old, new_number_text(old, rng))], "number")


def number_kind(m: re.Match) -> str:
    """year, percent, decimal or integer: what a number may be swapped with."""
    if m.group("pct"):
        return "percent"
    if m.group("dec"):
        return "decimal"
    value = m.group("num")
    return "year" if len(value) == 4 and 1000 <= int(value) <= 2100 else "integer"


def perturb_number_swap(gold: str, ctx: Context, rng: random.Random) -> Iterator[Perturbation]:
    in_gold = {m.group() for m in _number_matches(gold, skip_dates=False)}
    by_kind = defaultdict(list)
    for m in NUMBER_RE.finditer(ctx.passage):
        if m.group() not in in_gold and m.group() not in by_kind[number_kind(m)]:
            by_kind[number_kind(m)].append(m.group())
    matches = list(_number_matches(gold, skip_dates=False))
    rng.shuffle(matches)
    for m in matches[:2]:
        others = by_kind[number_kind(m)]
        for new in rng.sample(others, min(2, len(others))):
            yield apply_edits(gold, [Edit(m.start(), m.group(), new)], "number_swap")


# ---------------------------------------------------------------------------------------------------------- units

# Alternatives within one dimension; a unit only counts right after a number ("5 mg", "$1.2 billion").
UNIT_GROUPS = [
    ["thousand", "million", "billion", "trillion"],
    ["thousands", "millions", "billions"],
    ["mg", "g", "kg", "µg"],
    ["ml", "l"],
    ["mm", "cm", "m", "km"],
    ["seconds", "minutes", "hours", "days", "weeks", "months", "years"],
    ["second", "minute", "hour", "day", "week", "month", "year"],
    ["yards", "feet", "meters", "miles"],
    ["yard", "foot", "meter", "mile"],
    ["percent", "percentage points"],
]
_UNIT_ALTERNATIVES = {u: g for g in UNIT_GROUPS for u in g}
_UNIT_RE = re.compile(
    r"(?<=\d)(?P<space>[\s-]?)(?P<unit>" + "|".join(sorted(map(re.escape, _UNIT_ALTERNATIVES), key=len, reverse=True))
    + r")\b", re.IGNORECASE)


def perturb_unit(gold: str, ctx: Context, rng: random.Random) -> Iterator[Perturbation]:
    matches = list(_UNIT_RE.finditer(gold))
    rng.shuffle(matches)
    for m in matches:
        unit = m.group("unit")
        group = _UNIT_ALTERNATIVES[unit.lower()]
        i = group.index(unit.lower())
        # Neighbouring scales first: million -> billion is subtle, million -> trillion less so.
        choices = [group[j] for j in (i - 1, i + 1) if 0 <= j < len(group)] or [u for u in group if u != unit.lower()]
        new = rng.choice(choices)
        if unit in ("mL", "L"):
            new = {"ml": "mL", "l": "L"}[new]
        yield apply_edits(gold, [Edit(m.start("unit"), unit, _match_case(new, unit))], "unit")


# -------------------------------------------------------------------------------------------------------- entities

# "and" is not a connector: "Trillium, Array, and Therachon" is three names, not one.
_CONNECTORS = {"of", "for", "de", "da", "van", "von", "der", "la", "le", "du"}
_NOT_NAMES = {w.capitalize() for w in STOPWORDS} | set(MONTHS) | set(MONTH_ABBR) | {
    "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "However", "Although", "Despite",
    "Yes", "No", "Maybe", "Table", "Figure", "Fig", "Abstract", "Background", "Methods", "Results", "Conclusion",
    "Conclusions", "Introduction", "Discussion", "Total", "Net", "Year", "Years", "Note", "Notes", "Dr", "Mr", "Mrs",
    "Ms", "Prof", "St"}
# Section headings in capitals ("CONCLUSIONS"); not the stopwords, or "WHO" would be lost.
_NOT_NAMES |= {w.upper() for w in ("Abstract", "Background", "Methods", "Results", "Conclusion", "Conclusions",
                                   "Introduction", "Discussion", "Objective", "Objectives", "Design", "Setting",
                                   "Purpose", "Aims", "Aim", "Table", "Figure", "Note", "Notes", "Total")}
_ORG_SUFFIXES = {"Inc", "Inc.", "Corp", "Corp.", "Corporation", "Company", "Co.", "Group", "University", "College",
                 "Institute", "Party", "Magazine", "Bank", "Association", "Society", "Council", "Committee", "Agency",
                 "Department", "Ministry", "Army", "Navy", "Club", "Team", "League", "Records", "Airlines",
                 "Hospital", "School", "Church", "Foundation", "Organization", "Organisation", "Union", "Press",
                 "Times", "News", "FC", "Ltd", "Ltd.", "LLC", "Holdings", "Network", "Studios", "Band"}
# A capitalised token (hyphens of any kind inside: "HCoV‐HKU1"), without a possessive "'s"; tokens joined by
# spaces or by a connector ("Partitions of the Polish-Lithuanian Commonwealth").
_NAME_TOKEN = r"(?:[A-Z](?:[\w.\-\u2010\u2011&]|['’](?![sS]\b))*[\w]|[A-Z])"
_NAME_RE = re.compile(
    rf"(?<![\w\-\u2010\u2011]){_NAME_TOKEN}(?:\s+(?:(?:of|for|de|da|van|von|der|la|le|du)(?:\s+the)?\s+)?{_NAME_TOKEN})*")
# Nationalities and languages ("English", "Germans", "Chinese") are swapped only with each other.
_DEMONYM = re.compile(r"[A-Z][a-z]+(?:ish|ese|ians?|ans)|French|Dutch|Greek|Thai|Swiss|Iraqi|Israeli|Pakistani")


def name_kind(name: str) -> str:
    """A coarse kind for same-kind swaps: acronym ("MTCT", "DCs"), code ("HIV-1", "IL6"), organisation,
    single-word name or multi-word name."""
    tokens = name.split()
    upper, letters = sum(c.isupper() for c in name), sum(c.isalpha() for c in name)
    if len(tokens) == 1 and upper >= 2 and 2 * upper >= letters:  # "MTCT", "HCoV", "DCs"; not "McDonald"
        return "code" if any(c.isdigit() for c in name) else "acronym"
    if len(tokens) == 1 and _DEMONYM.fullmatch(name):
        return "demonym"
    if tokens[-1] in _ORG_SUFFIXES:
        return "org"
    return "name1" if len(tokens) == 1 else "name2"


def find_names(text: str) -> list[tuple[int, int]]:
    """(start, end) of capitalised name spans, with leading function words ("The", "In") dropped."""
    out = []
    for m in _NAME_RE.finditer(text):
        start, span = m.start(), m.group()
        tokens = span.split()
        while tokens and (tokens[0] in _NOT_NAMES or tokens[0].lower() in _CONNECTORS):
            start = text.index(tokens[1], start + len(tokens[0])) if len(tokens) > 1 else m.end()
            tokens = tokens[1:]
        while tokens and tokens[-1].lower() in _CONNECTORS:
            tokens = tokens[:-1]
        if not tokens or all(t in _NOT_NAMES for t in tokens):
            continue
        end = start + len(" ".join(tokens)) if text[start:].startswith(" ".join(tokens)) else m.end()
        name = text[start:end]
        if len(name) < 2 or re.fullmatch(r"[A-Z]\.?", name):
            continue
        out.append((start, end))
    return out


@lru_cache(maxsize=256)
def _lowercase_words(passage: str) -> frozenset[str]:
    return frozenset(re.findall(r"(?<![\w'’\-])[a-z][\w'’\-]*", passage))


@lru_cache(maxsize=256)
def _passage_names(passage: str) -> dict[str, str]:
    """Name -> kind for the passage's names, common words written with a capital at a sentence start excluded."""
    # A capitalised word that the passage also writes in lower case ("Revenue" / "revenue") is not a name.
    lowercase_words = _lowercase_words(passage)
    names, mid_sentence = {}, set()
    for s, e in find_names(passage):
        name = passage[s:e]
        kind = name_kind(name)
        if kind in ("name1", "acronym") and name.lower() in lowercase_words:
            continue
        names.setdefault(name, kind)
        if passage[:s].rstrip()[-1:] not in ("", ".", "!", "?", "\n", ":", '"'):
            mid_sentence.add(name)
    # A single capitalised word seen only at sentence starts is probably not a name ("Historically", "Implementation").
    return {n: k for n, k in names.items() if k != "name1" or n in mid_sentence}


def _or_alternatives(gold: str, question: str) -> list[str]:
    """The other option of an "A or B" question whose answer is A (or B)."""
    q = question.rstrip(" ?")
    low_q, low_g = q.lower(), gold.lower().strip(" .")
    alternatives = []
    i = low_q.find(low_g)
    if i < 0 or not low_g:
        return []
    after = q[i + len(low_g):]
    if after.lower().startswith(" or "):
        alt = re.split(r"[,;?]| or ", after[4:])[0].strip()
        alternatives.append(alt)
    before = q[:i]
    if before.lower().endswith(" or "):
        tokens = before[:-4].split()
        if gold[:1].isupper():
            k = len(tokens)
            while k > 0 and (tokens[k - 1][:1].isupper() or tokens[k - 1].lower() in _CONNECTORS):
                k -= 1
            alt_tokens = tokens[k:]
            while alt_tokens and alt_tokens[0].lower() in _CONNECTORS:
                alt_tokens = alt_tokens[1:]
        else:
            alt_tokens = tokens[-len(low_g.split()):]
        alternatives.append(" ".join(alt_tokens))
    return [a for a in alternatives if a and a.lower() != low_g and len(a.split()) <= 6]


def perturb_entity(gold: str, ctx: Context, rng: random.Random) -> Iterator[Perturbation]:
    stripped = gold.strip().rstrip(".")
    for alt in _or_alternatives(stripped, ctx.question):
        yield apply_edits(gold, [Edit(gold.index(stripped), stripped, alt)], "entity")
    passage_names = _passage_names(ctx.passage)
    # Only names the passage itself has: a swap then trades one passage entity for another of the same kind.
    gold_names = [(s, e) for s, e in find_names(gold) if gold[s:e] in passage_names]
    rng.shuffle(gold_names)
    low_gold, low_question = gold.lower(), ctx.question.lower()
    for s, e in gold_names[:MAX_CANDIDATES_PER_TYPE]:
        name = gold[s:e]
        kind = name_kind(name)
        distractors = sorted(
            other for other, other_kind in passage_names.items()
            if other_kind == kind and other.lower() not in low_gold and name.lower() not in other.lower()
            and other.lower() not in low_question and not (kind == "name2" and abs(len(other.split()) - len(name.split())) > 1)
        )
        if distractors:
            yield apply_edits(gold, [Edit(s, name, rng.choice(distractors))], "entity")


# -------------------------------------------------------------------------------------------------------- polarity

_AUX = r"is|are|was|were|has|have|had|does|do|did|can|could|will|would|should|may|might|must"
_CONTRACTIONS = {"isn't": "is", "aren't": "are", "wasn't": "was", "weren't": "were", "hasn't": "has",
                 "haven't": "have", "hadn't": "had", "doesn't": "does", "don't": "do", "didn't": "did",
                 "can't": "can", "cannot": "can", "couldn't": "could", "won't": "will", "wouldn't": "would",
                 "shouldn't": "should"}
_DECISION_FLIP = {"yes": ["no"], "no": ["yes"], "maybe": ["yes", "no"]}


def _negation_edits(text: str, offset: int = 0) -> list[Edit]:
    """Every single-place negation flip of `text`: removals of an existing negation first, then insertions."""
    removals, insertions = [], []
    for m in re.finditer(rf"\b(?:{_AUX})\s+not\b", text, re.IGNORECASE):
        aux = m.group().split()[0]
        removals.append(Edit(offset + m.start(), m.group(), aux))
    for m in re.finditer(r"\b(?:" + "|".join(map(re.escape, _CONTRACTIONS)) + r")", text, re.IGNORECASE):
        removals.append(Edit(offset + m.start(), m.group(), _match_case(_CONTRACTIONS[m.group().lower()], m.group())))
    for m in re.finditer(r"\bno\s+(?=(?:significant|statistically|clear|major|difference|differences|"
                         r"association|effect|evidence|change|correlation|relationship|benefit|increase|"
                         r"decrease|improvement|impact)\b)", text, re.IGNORECASE):
        removals.append(Edit(offset + m.start(), m.group(), _match_case("a ", m.group())))
    for m in re.finditer(r"\bnot\s+(?=(?:significantly|statistically|associated|related|correlated|different|"
                         r"effective|useful|necessary|required|increased|decreased|reduced)\b)", text, re.IGNORECASE):
        removals.append(Edit(offset + m.start(), m.group(), ""))
    for m in re.finditer(r"\bnever\b", text, re.IGNORECASE):
        removals.append(Edit(offset + m.start(), m.group(), _match_case("always", m.group())))
    for m in re.finditer(rf"\b(?:{_AUX})\b(?!\s+not\b|n't)", text, re.IGNORECASE):
        word = m.group()
        insertions.append(Edit(offset + m.start(), word, word + (("not" if word.lower() == "can" else " not"))))
    for m in re.finditer(r"\b(?:significantly|statistically significant)\b", text, re.IGNORECASE):
        if not re.search(r"\bnot\s+$", text[:m.start()], re.IGNORECASE):
            insertions.append(Edit(offset + m.start(), m.group(), "not " + m.group()))
    return removals + insertions


def perturb_polarity(gold: str, ctx: Context, rng: random.Random) -> Iterator[Perturbation]:
    decision = re.match(r"(yes|no|maybe)\b", gold, re.IGNORECASE)
    if decision:
        word = decision.group()
        new_word = _match_case(rng.choice(_DECISION_FLIP[word.lower()]), word)
        flip = Edit(0, word, new_word)
        rest = _negation_edits(gold[decision.end():], decision.end())
        # A consistent change reads better ("No. ... was not associated ..."); fall back to the decision alone.
        if rest and new_word.lower() != "maybe":
            yield apply_edits(gold, [flip, rest[0]], "polarity")
        yield apply_edits(gold, [flip], "polarity")
        return
    edits = _negation_edits(gold)
    removals = [e for e in edits if len(e.after) < len(e.before)]
    # Keep the first few in text order (the main clause usually comes first), removals before insertions.
    for e in (removals + [e for e in edits if e not in removals])[:MAX_CANDIDATES_PER_TYPE]:
        yield apply_edits(gold, [e], "polarity")


# --------------------------------------------------------------------------------------------------------- antonyms

_ANTONYM_PAIRS = [
    ("increase", "decrease"), ("increased", "decreased"), ("increases", "decreases"), ("increasing", "decreasing"),
    ("higher", "lower"), ("highest", "lowest"), ("more", "less"), ("most", "least"), ("greater", "smaller"),
    ("larger", "smaller"), ("largest", "smallest"), ("rise", "fall"), ("rose", "fell"), ("gain", "loss"),
    ("gains", "losses"), ("improved", "worsened"), ("improve", "worsen"), ("positive", "negative"),
    ("better", "worse"), ("best", "worst"), ("before", "after"), ("first", "last"), ("earlier", "later"),
    ("longer", "shorter"), ("longest", "shortest"), ("maximum", "minimum"), ("above", "below"), ("grew", "shrank"),
    ("growth", "decline"), ("profit", "loss"), ("older", "younger"), ("oldest", "youngest"),
    ("reduced", "raised"), ("lowered", "raised"), ("reduce", "raise"), ("strong", "weak"), ("stronger", "weaker"),
    ("high", "low"), ("large", "small"), ("early", "late"), ("faster", "slower"), ("inside", "outside"),
    ("inhibits", "promotes"), ("inhibit", "promote"), ("upregulated", "downregulated"),
    ("favorable", "unfavorable"), ("efficient", "inefficient"), ("fewer", "more"), ("minor", "major"),
    ("north", "south"), ("east", "west"), ("won", "lost"), ("win", "loss"), ("wins", "losses"),
]
_ANTONYMS: dict[str, str] = {}
for _a, _b in _ANTONYM_PAIRS:
    _ANTONYMS.setdefault(_a, _b)
    _ANTONYMS.setdefault(_b, _a)
_ANTONYM_RE = re.compile(r"\b(?:" + "|".join(sorted(_ANTONYMS, key=len, reverse=True)) + r")\b", re.IGNORECASE)


def perturb_antonym(gold: str, ctx: Context, rng: random.Random) -> Iterator[Perturbation]:
    matches = list(_ANTONYM_RE.finditer(gold))
    rng.shuffle(matches)
    for m in matches[:MAX_CANDIDATES_PER_TYPE]:
        word = m.group()
        if word[0].isupper() and gold[:m.start()].rstrip()[-1:] not in ("", ".", "!", "?", ":"):
            continue  # capitalised inside a sentence: part of a name ("Best Buy", "Great Lakes")
        yield apply_edits(gold, [Edit(m.start(), word, _match_case(_ANTONYMS[word.lower()], word))], "antonym")


# ------------------------------------------------------------------------------------------------------ added claim

_CLAIMS = {
    "biomedical": [
        "This was confirmed in a follow-up trial of {n} patients.",
        "The effect was seen only in patients older than {age} years.",
        "These results were first reported in {year}.",
        "The finding was independently replicated by a team in {country}.",
        "Treatment costs fell by about {pct}% as a result.",
    ],
    "finance": [
        "This was mainly driven by a one-time tax benefit of ${n} million.",
        "Management expects this trend to reverse in fiscal {year}.",
        "The company also announced a {pct}% increase in its dividend.",
        "Most of this came from its operations in {country}.",
    ],
    "general": [
        "This happened in {year}.",
        "It was widely reported in {country} at the time.",
        "More than {n},000 people attended.",
        "It was the first time this had happened since {year}.",
    ],
}
_DOMAIN = {"pubmedqa": "biomedical", "covidqa": "biomedical", "financebench": "finance"}
_COUNTRIES = ["Canada", "Brazil", "Japan", "Germany", "India", "Australia", "Sweden", "Mexico", "Italy", "Kenya"]


def perturb_added_claim(gold: str, ctx: Context, rng: random.Random) -> Iterator[Perturbation]:
    templates = list(_CLAIMS[_DOMAIN.get(ctx.source, "general")])
    rng.shuffle(templates)
    for template in templates[:2]:
        values = {
            "n": str(rng.randint(12, 950)), "age": str(rng.choice([40, 50, 60, 65, 70])), "pct": str(rng.randint(3, 40)),
            "year": str(rng.randint(1950, 2022)), "country": rng.choice(_COUNTRIES),
        }
        claim = template.format(**values)
        stem = gold.rstrip()
        sep = " " if stem.endswith((".", "!", "?")) else ". "
        yield apply_edits(gold, [Edit(len(gold), "", sep + claim)], "added_claim")


# ----------------------------------------------------------------------------------------------------- other answer

def perturb_other_answer(gold: str, ctx: Context, rng: random.Random) -> Iterator[Perturbation]:
    others = sorted(set(a for a in ctx.other_answers if a.strip()))
    rng.shuffle(others)
    for other in others[:MAX_CANDIDATES_PER_TYPE]:
        yield Perturbation(other, "other_answer", (Edit(0, gold, other),))


PERTURBERS: dict[str, Callable[[str, Context, random.Random], Iterator[Perturbation]]] = {
    "number": perturb_number,
    "number_swap": perturb_number_swap,
    "unit": perturb_unit,
    "date": perturb_date,
    "entity": perturb_entity,
    "polarity": perturb_polarity,
    "antonym": perturb_antonym,
    "added_claim": perturb_added_claim,
    "other_answer": perturb_other_answer,
}


# -------------------------------------------------------------------------------------------- document edits

# Types whose edits replace a word or phrase of the answer with one of the same kind: the same replacement made in
# the document gives a document that supports the perturbed answer and contradicts the gold one.
DOCUMENT_EDIT_TYPES = ("number", "number_swap", "unit", "date", "entity", "antonym")


def _occurrences(text: str) -> re.Pattern:
    # Whole words only, and not a piece of a longer number ("2" in "2.5" or "1,200").
    return re.compile(rf"(?<![\w.,]){re.escape(text)}(?![\w]|[.,]\d)")


def edit_document(passage: str, gold: str, p: Perturbation) -> str | None:
    """The passage with each edit's original words replaced by its new words in the sentence that states them, so
    that it says what the perturbed answer says; None when the perturbation is not a replacement of
    DOCUMENT_EDIT_TYPES or an edit's original words are in no sentence of the passage. The sentence is the one,
    among those containing the words, that shares the most words with the answer around the edit: "21" becomes "37"
    in "hospitalised for 21 days", not in "As at 21 February". A training question then comes as four rows that only
    a comparison separates: (passage, gold) PASS, (passage, perturbed) FAIL, (edited, gold) FAIL, (edited, perturbed)
    PASS; neither the answer nor the document alone gives the label away."""
    if p.kind not in DOCUMENT_EDIT_TYPES or not p.edits:
        return None
    info, spans = passage_info(passage), []
    for e in p.edits:  # every edit found in the original passage, then all made at once (an edit may swap two names)
        before, after = e.before.strip(), e.after.strip()
        if not before or not after or normalize(before) == normalize(after):
            return None
        pattern = _occurrences(before)
        holding = [(s, t) for s, t in info.sentences if pattern.search(passage, s, t)]
        if not holding:
            return None
        around = content_words(" ".join(gold[:e.start].split()[-8:] + gold[e.start + len(e.before):].split()[:8]))
        s, t = max(holding, key=lambda span: len(around & content_words(passage[span[0]:span[1]])))
        spans += [(m.start(), m.end(), after) for m in pattern.finditer(passage, s, t)]
    out, end = [], len(passage)
    for start, stop, after in sorted(spans, reverse=True):
        if stop > end:  # overlaps a replacement already made
            continue
        out += [passage[stop:end], after]
        end = start
    return passage[:end] + "".join(reversed(out))


def invert(gold: str, p: Perturbation) -> Perturbation:
    """The perturbation that turns p.answer back into gold (edit offsets in p.answer): how the gold answer is wrong
    about an edited document."""
    edits, shift = [], 0
    for e in p.edits:
        edits.append(Edit(e.start + shift, e.after, e.before))
        shift += len(e.after) - len(e.before)
    return apply_edits(p.answer, edits, p.kind)


# ------------------------------------------------------------------------------------------------------- validation

def _window(text: str, start: int, length: int, n_words: int = 3) -> str:
    """The text around [start, start+length) with up to n_words words of context on each side."""
    left = text[:start].split()[-n_words:] if n_words else []
    right = text[start + length:].split()[:n_words] if n_words else []
    return " ".join(left + [text[start:start + length]] + right)


def check(gold: str, p: Perturbation, ctx: Context) -> str | None:
    """Why the candidate must be rejected ("noop", "gold" or "supported"), or None when it is a valid FAIL answer.

    Gold means: the new answer equals (after `normalize`) another gold answer of the same question, ctx.gold_answers.

    Supported means: the new content, read with the words around it, is still in the passage (e.g. "no significant
    difference" -> "a significant difference" while the passage says "a significant difference"); the whole new
    answer is a sentence of the passage; an added claim is covered by a passage sentence; or another question's
    answer overlaps this one's so much it may also answer it.
    """
    if normalize(p.answer) == normalize(gold) or all(normalize(e.before) == normalize(e.after) for e in p.edits):
        return "noop"
    if normalize(p.answer) in {normalize(g) for g in ctx.gold_answers}:
        return "gold"
    info = ctx.info
    if p.kind == "added_claim":
        claim = p.edits[0].after.strip(" .")
        _, coverage = info.best_sentence(claim)
        facts = re.findall(r"\d+|[A-Z][a-z]+", claim.split(" ", 1)[1] if " " in claim else claim)
        if coverage >= 0.75 or any(info.contains(f) for f in facts if f.lower() not in STOPWORDS):
            return "supported"
        return None
    if p.kind == "other_answer":
        a, b = normalize(gold), normalize(p.answer)
        wa, wb = content_words(gold), content_words(p.answer)
        if a in b or b in a or (wa and wb and len(wa & wb) / len(wa | wb) >= 0.5):
            return "supported"
        return None
    if len(p.answer.split()) >= 4 and info.contains(p.answer):
        return "supported"
    # Locate each edit in the new answer and look its surroundings up in the passage.
    shift = 0
    for e in p.edits:
        # Hand-written edits keep offsets; a model's rewrite may move text, so find its new span instead.
        new_start = e.start + shift if p.kind != "model" else p.answer.find(e.after)
        shift += len(e.after) - len(e.before)
        window = _window(p.answer, new_start, len(e.after))
        if len(window.split()) >= len(e.after.split()) + 2 and info.contains(window):
            return "supported"
    return None


# ----------------------------------------------------------------------------------------------------- statistics

class PerturbStats:
    """Per type: candidates tried / accepted / rejected (noop, gold, supported), and rows where the type proposed at
    least one candidate vs rows where it produced the accepted one."""

    def __init__(self):
        self.counts: dict[str, Counter] = defaultdict(Counter)

    def add(self, kind: str, key: str, n: int = 1):
        self.counts[kind][key] += n

    def merge(self, other: "PerturbStats"):
        for kind, c in other.counts.items():
            self.counts[kind].update(c)

    def table(self) -> dict:
        out = {}
        for kind in sorted(self.counts):
            c = self.counts[kind]
            tried = c["tried"]
            out[kind] = {"rejected_invalid": c["invalid"]} if c["invalid"] else {}  # unparsable model output
            out[kind] |= {
                "tried": tried, "accepted": c["accepted"], "rejected_noop": c["noop"], "rejected_gold": c["gold"],
                "rejected_supported": c["supported"], "rows_applicable": c["rows_applicable"],
                "validity_rate": round(c["accepted"] / tried, 4) if tried else None,
                "rejection_rate": round((tried - c["accepted"]) / tried, 4) if tried else None,
            }
        return out


def type_order(rng: random.Random, types=TYPES) -> list[str]:
    """A weighted random order of the types (weighted sampling without replacement)."""
    pool, order = [t for t in types], []
    while pool:
        weights = [TYPE_WEIGHTS.get(t, 1) for t in pool]
        t = rng.choices(pool, weights=weights)[0]
        order.append(t)
        pool.remove(t)
    return order


def perturb(gold: str, ctx: Context, rng: random.Random, *, types=TYPES, stats: PerturbStats | None = None
            ) -> Perturbation | None:
    """The first accepted candidate over the types in a seeded order, or None when no type works for this answer.

    A type counts as attempted on a row when it proposes a candidate. Once a type is accepted, later types are not
    tried: each row gets one FAIL answer.
    """
    for kind in type_order(rng, types):
        proposed, seen = False, set()
        for candidate in PERTURBERS[kind](gold, ctx, rng):
            if candidate.answer in seen:  # a repeated draw is not a second attempt
                continue
            seen.add(candidate.answer)
            if not proposed:
                proposed = True
                stats and stats.add(kind, "rows_applicable")
            stats and stats.add(kind, "tried")
            reason = check(gold, candidate, ctx)
            if reason is None:
                stats and stats.add(kind, "accepted")
                return candidate
            stats and stats.add(kind, reason)
    return None
