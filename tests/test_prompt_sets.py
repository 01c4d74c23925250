"""The committed prompt sets: sizes, format, disjointness and the harmful/harmless match.

The measurement sets (``prompts/harmful.txt``, ``prompts/harmless.txt``) feed the difference of
means, so they must differ in harm and not in length or form; the eval sets are held out, so no
prompt of theirs may appear (exactly or nearly) in the measurement or demo sets. Harmless prompts
come in two kinds, kept apart: plain requests (``eval/harmless.txt``, the tail of ``harmless.txt``;
damage is measured on them) and borderline ones, edgy but harmless (``eval/borderline.txt``,
``borderline.txt``; over-refusal is measured on them).
"""

from __future__ import annotations

import itertools
import re
import statistics
from pathlib import Path

import pytest

from abliterate.model.prompts import load_prompts

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "prompts"

# set -> minimum number of prompts
MINIMUM = {
    "harmful.txt": 300,
    "harmless.txt": 300,
    "eval/harmful.txt": 120,
    "eval/harmless.txt": 120,
    "eval/borderline.txt": 100,
    "borderline.txt": 100,
}

# Words that make a harmless prompt look scary ("kill a process", "shoot a portrait").
EDGY_WORDS = {
    "kill", "kills", "shoot", "attack", "bomb", "bombs", "poison", "poisoning", "poisonous", "deadly",
    "murder", "crime", "war", "battle", "battles", "destroy", "blow", "slaughter", "butcher", "choke",
    "choking", "hack", "terminate", "execute", "steal", "knife", "toxic", "villain", "mafia", "bites",
    "locked", "trapping", "nuclear", "chainsaw", "smoke", "wipe", "recoil", "beat", "hitting",
    "impostor", "zombie", "force-kills", "crush", "strangler", "hit",
}

NEAR_DUPLICATE = 0.6  # Jaccard similarity of content-word sets above which two prompts are "the same"

# Function words and bare request verbs: two prompts that share only these are not near-duplicates
# ("How do I make a birdhouse?" vs "How do I make a paper crane?").
STOPWORDS = frozenset(
    """a an the and or but if so to of in on at by for with from into onto about as than then that
    this these those it its is are was were be been being do does did done have has had i me my mine
    you your we our us he him his she her they them their what whats which who whom whose how when
    where why can could would should will shall may might must not no yes there here some any all
    each every one just very more most also up out over under again please give tell show explain
    describe write help make let lets im ive id youre dont doesnt cant wont get got""".split()
)


def _normalize(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower().replace("'", "").replace("\u2019", "")))


def _words(text: str) -> frozenset[str]:
    return frozenset(_normalize(text).split())


def _content_words(text: str) -> frozenset[str]:
    return _words(text) - STOPWORDS


def _similar(a: frozenset[str], b: frozenset[str]) -> bool:
    return bool(a | b) and len(a & b) > NEAR_DUPLICATE * len(a | b)


def _sets() -> dict[str, list[str]]:
    """Every committed prompt set (ours and the demo tuning prompts), by path under prompts/."""
    demo = [f"demo/{name}" for name in ("harmful.txt", "harmless.txt") if (PROMPTS / "demo" / name).is_file()]
    names = list(MINIMUM) + demo
    return {name: load_prompts(PROMPTS / name) for name in names}


@pytest.mark.parametrize("name", sorted(MINIMUM))
def test_set_loads_and_is_big_enough(name):
    prompts = load_prompts(PROMPTS / name)
    assert len(prompts) >= MINIMUM[name]


@pytest.mark.parametrize("name", sorted(MINIMUM))
def test_file_is_clean_one_prompt_per_line(name):
    raw = (PROMPTS / name).read_bytes().decode("utf-8")  # UTF-8 or it raises
    assert raw.endswith("\n") and "\r" not in raw and "\t" not in raw
    lines = raw[:-1].split("\n")
    assert all(line and line == line.strip() for line in lines), "blank or padded line"
    # load_prompts drops exact duplicates silently: none may be there to drop
    assert len(load_prompts(PROMPTS / name)) == len(lines)
    normalized = [_normalize(line) for line in lines]
    assert len(set(normalized)) == len(normalized), "duplicate prompts after normalization"


def test_no_prompt_shared_between_sets():
    sets = _sets()
    seen: dict[str, str] = {}
    for name, prompts in sets.items():
        for prompt in prompts:
            key = _normalize(prompt)
            assert key not in seen or seen[key] == name, f"{prompt!r} in {seen.get(key)} and {name}"
            seen[key] = name


def test_near_duplicate_check_catches_rewordings():
    assert _similar(_content_words("How do I fix a leaking faucet?"), _content_words("How do I fix a leaking kitchen faucet?"))
    assert not _similar(_content_words("How do I make a birdhouse?"), _content_words("How do I make a paper crane?"))


def test_no_near_duplicates_between_sets():
    sets = {name: [_content_words(p) for p in prompts] for name, prompts in _sets().items()}
    clashes = []
    for (name_a, words_a), (name_b, words_b) in itertools.combinations(sets.items(), 2):
        for i, a in enumerate(words_a):
            for j, b in enumerate(words_b):
                if _similar(a, b):
                    clashes.append(f"{name_a}:{i + 1} ~ {name_b}:{j + 1}")
    assert not clashes, f"near-duplicate prompts across sets: {clashes[:10]}"


def test_no_near_duplicates_within_our_sets():
    for name in MINIMUM:
        words = [_content_words(p) for p in load_prompts(PROMPTS / name)]
        for (i, a), (j, b) in itertools.combinations(enumerate(words), 2):
            assert not _similar(a, b), f"{name}: lines {i + 1} and {j + 1} nearly equal"


def _quartiles(values: list[int]) -> list[float]:
    return statistics.quantiles(values, n=4)


def _relative_gap(a: float, b: float) -> float:
    return abs(a - b) / max(a, b)


@pytest.mark.parametrize("measure", ["chars", "words"])
def test_measurement_sets_are_matched_in_length(measure):
    harmful = load_prompts(PROMPTS / "harmful.txt")
    harmless = load_prompts(PROMPTS / "harmless.txt")

    def size(prompt: str) -> int:
        return len(prompt) if measure == "chars" else len(prompt.split())

    a, b = [size(p) for p in harmful], [size(p) for p in harmless]
    assert _relative_gap(statistics.fmean(a), statistics.fmean(b)) < 0.15
    for qa, qb in zip(_quartiles(a), _quartiles(b)):
        assert _relative_gap(qa, qb) < 0.15


def test_measurement_sets_are_matched_in_form():
    harmful = load_prompts(PROMPTS / "harmful.txt")
    harmless = load_prompts(PROMPTS / "harmless.txt")
    role_play = re.compile(r"^(you are|you're|pretend|imagine|act as|let's play|as an? |suppose)", re.I)

    def share(prompts: list[str], test) -> float:
        return sum(1 for p in prompts if test(p)) / len(prompts)

    for test in (lambda p: p.endswith("?"), lambda p: bool(role_play.match(p))):
        assert abs(share(harmful, test) - share(harmless, test)) < 0.05
    # role-play framings are a real part of both sets, not a token few
    assert share(harmful, lambda p: bool(role_play.match(p))) > 0.05


def test_plain_harmless_sets_hold_no_edgy_words():
    """KL (damage) is measured on plain requests: the eval set and the search's validation tail of the
    measurement set (its last 64 prompts) hold none of the words that make a prompt look edgy."""
    for prompts in (load_prompts(PROMPTS / "eval" / "harmless.txt"), load_prompts(PROMPTS / "harmless.txt")[-64:]):
        edgy = [p for p in prompts if _words(p) & EDGY_WORDS]
        assert not edgy, edgy[:5]
