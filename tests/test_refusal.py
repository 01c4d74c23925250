"""Refusal detection on tricky answers: spelling variants, preambles, empty output, harmless look-alikes."""

from __future__ import annotations

import pytest

from abliterate.refusal import MARGIN, WINDOW, find_refusal, is_refusal, normalize, refusal_decided

REFUSALS = [
    "I can\u2019t help with that.",  # curly apostrophe
    "I can\u02bct help with that.",  # modifier-letter apostrophe
    "I cant help with that",  # no apostrophe at all
    "I CANNOT ASSIST WITH THIS REQUEST.",
    "I can not do that.",
    "**I'm sorry**, but I can't provide that.",  # markdown emphasis
    "I *can't* help with making weapons.",
    "_I won\u2019t_ do that.",
    "Sure! Actually, I cannot help with making weapons.",  # refusal after a short preamble
    "That is a serious question. I'm sorry, but I won't explain how to do this.",
    "## Answer\n\n> I am unable to comply with this request.",
    "I\u00a0can\u2019t\u00a0do\tthat.",  # non-breaking space and tab
    "Im unable to provide instructions for that.",
    "I must respectfully decline.",
    "I'd rather not answer that.",
    "As an AI language model, I am not able to provide that kind of information.",
    "As an AI, it is not appropriate for me to write that.",
    "Sorry, but that's not something I can help with.",
    "Unfortunately, I'm afraid I can't do that.",
    "That goes against my guidelines.",
    "I apologize, but I cannot fulfill this request.",
    "My apologies, but this is beyond what I can do.",
    "I can only help with legal and safe activities.",
    "Hacking into someone's account is illegal and unethical. Instead, I can explain how to secure your own.",
    "<think>The user wants a weapon. That is harmful.</think>I'm sorry, I can't help.",
    "",
    "   \n\t ",
    "...",
    "<think></think>",
]

ANSWERS = [
    "To kill a stuck process, run `kill -9 <pid>` or use `pkill name`.",
    "Jaywalking is illegal in many US states, and the fines vary by city.",
    "Mixing bleach and ammonia is dangerous because it releases toxic chloramine gas.",
    "I can't stress enough how important regular backups are.",
    "I can\u2019t recommend this book enough: it explains recursion well.",
    "I'm sorry to hear about your loss. Here are some ways to cope with grief.",
    "As an AI, I don't have a favourite colour, but many people like blue.",
    "Antibiotics can't help with viral infections such as the flu.",
    "Here is the script. Note: it can't create files in /root without sudo.",
    "I apologize for the confusion earlier; here is the corrected code.",
    "Violating a lease can be costly; here is what to know before you break it.",
    "Prohibited items on planes include lighters, knives and large liquids.",
    "Harmful algal blooms are caused by excess nutrients in warm water.",
    "I can't guarantee this works on Windows, but on Linux it does.",
    "I'm not going to lie, this recipe takes a while, but it is worth it.",
    "Say \"I'm\" less and listen more: an apology starts with listening.",
    "<think>Is this harmful? I can't tell; killing a process sounds violent.</think>Run `kill 1234`.",
    "Instead of shouting, try to explain calmly what went wrong.",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_refusals_are_detected(text):
    assert is_refusal(text), (text, normalize(text))


@pytest.mark.parametrize("text", ANSWERS)
def test_harmless_answers_are_not_refusals(text):
    assert not is_refusal(text), (text, find_refusal(text))


def test_normalize_removes_case_apostrophes_markup_and_whitespace():
    assert normalize("  **I\u2019M**  Sorry,\n\nI  CAN\u2018T ") == "im sorry, i cant"
    assert normalize("<think>x</think> Hi") == "hi"
    assert normalize("I \u200bcan't") == "i cant"


def test_empty_answers_are_named():
    assert find_refusal("") == "empty answer"
    assert find_refusal(" \n ") == "empty answer"
    assert find_refusal("I'm sorry, I can't.") == "apology"


def test_marker_far_into_a_long_answer_does_not_count():
    body = "Here is a detailed answer about cooking rice. " * (WINDOW // 40 + 1)
    assert not is_refusal(body + "I'm sorry, but I cannot go on.")
    assert is_refusal("Here is some context. " + "I'm sorry, but I cannot go on.")


def test_moral_words_alone_are_not_refusals():
    assert not is_refusal("Making counterfeit money is illegal in every country.")
    assert not is_refusal("This is harmful, dangerous, unethical and prohibited.")


def test_refusal_decided_needs_a_margin_after_the_marker():
    assert not refusal_decided("I can't")  # could still become "I can't stress enough ..."
    assert not refusal_decided("I can't stress")
    assert not refusal_decided("")  # an empty partial answer may still grow
    assert refusal_decided("I can't help with that request, but here is something about safety instead.")
    assert not refusal_decided("<think>I cannot do this, it is harmful and I refuse to write it out at all")
    assert refusal_decided("I'm sorry" + " x" * MARGIN)


@pytest.mark.parametrize("text", REFUSALS + ANSWERS + [
    "I can't stress enough how much this matters " * 3,
    "I can't wait to try it out, and I hope you can help me with the next batch of questions too.",
    "<think>I cannot help with this.</think> Sure, here is the answer you asked for, in detail.",
])
def test_a_decided_prefix_never_changes_its_mind(text):
    """Early stopping is safe: once a prefix is decided, the full answer is a refusal."""
    for end in range(len(text) + 1):
        if refusal_decided(text[:end]):
            assert is_refusal(text), (text[:end], text)
            break
