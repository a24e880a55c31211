"""The shipped processors: "pii" (redaction) and "content_filter", through
`await processor.process(text, place)` as the edge calls them."""

from __future__ import annotations

import types

import pytest

from voicestack.edge.processing import ProcessorChain
from voicestack.errors import StageError
from voicestack.processors import PLACES
from voicestack.processors.content_filter import DEFAULT_TEXT, ContentFilter
from voicestack.processors.pii import PiiRedactor, luhn_ok, redact

pytestmark = pytest.mark.fast


def settings(**overrides):
    fields = {"pii_redact_llm": False, "content_filter_words_file": "",
              "content_filter_text": "Sorry, I can't say that."}
    fields.update(overrides)
    return types.SimpleNamespace(**fields)


@pytest.fixture(scope="module")
def pii():
    return PiiRedactor(settings())  # loads the spaCy model once for the module


# ---------------------------------------------------------------- pii: its shape

def test_pii_redacts_the_record_only_unless_asked_to_redact_what_the_llm_sees(pii):
    assert pii.name == "pii"
    assert pii.fail_closed
    assert pii.applies_to == {"record"}
    both = PiiRedactor(settings(pii_redact_llm=True))
    assert both.applies_to == {"record", "user", "tool_result"}
    assert both.applies_to <= PLACES


# ---------------------------------------------------------------- cards

@pytest.mark.parametrize("card", [
    "4111 1111 1111 1111",          # Visa, spaced
    "4111-1111-1111-1111",          # dashed
    "4111111111111111",             # one run
    "41111111 11111111",            # as Whisper sometimes groups it
    "5500 0000 0000 0004",          # Mastercard
    "2223 0031 2200 3222",          # 2-series Mastercard (not in Presidio's pattern)
    "3782 822463 10005",            # Amex, 15 digits
])
async def test_a_luhn_valid_card_number_is_redacted(pii, card):
    out = await pii.process(f"My card number is {card}, thanks.", "record")
    assert out == "My card number is [card], thanks."


@pytest.mark.parametrize("number", [
    "1234 5678 9012 3456",   # 16 digits, fails Luhn: an order number
    "4111 1111 1111 1112",   # a card number misheard by one digit: fails Luhn
    "12345678",
])
async def test_digits_that_are_not_a_card_are_kept_in_the_conversation(pii, number):
    assert not luhn_ok(number.replace(" ", ""))
    text = f"Your order number is {number}."
    assert await pii.process(text, "user") == text


@pytest.mark.parametrize("heard", [
    "5105 1 0 5 1 0 5 1 0 5 1 0 5 1 0 0",  # a card read out, heard with a group too many (19 digits)
    "1234 5678 9012 3456",
])
async def test_what_is_recorded_loses_every_long_number(pii, heard):
    assert await pii.process(f"My card number is {heard}.", "record") == "My card number is [number]."
    assert await pii.process("Your table is 12345678.", "record") == "Your table is 12345678."


@pytest.mark.parametrize("spoken", [
    "four one one one one one one one one one one one one one one one",
    "four one one one, one one one one, one one one one, one one one one",
    "four one one one double one one one one one one one triple one one",
    "four one double one, one one one one, one one one one, one one one one",
])
async def test_a_card_number_read_out_in_words_is_redacted(pii, spoken):
    assert await pii.process(f"Sure, it's {spoken}.", "record") == "Sure, it's [card]."


async def test_a_spoken_card_followed_by_its_expiry_is_redacted_and_the_expiry_kept(pii):
    text = "It's four one one one one one one one one one one one one one one one, oh five two seven."
    assert await pii.process(text, "record") == "It's [card], oh five two seven."


async def test_spoken_digits_that_are_not_a_card_are_kept(pii):
    # 16 digits failing Luhn (kept in the conversation; a record loses any long number),
    # and a short spoken number (kept everywhere).
    text = "It's four one one one one one one one one one one one one one one two."
    assert await pii.process(text, "user") == text
    assert await pii.process(text, "record") == "It's [number]."
    text = "My order number is seven three nine two eight one."
    assert await pii.process(text, "record") == text


# ---------------------------------------------------------------- phones

@pytest.mark.parametrize("phone", [
    "415 555 0132", "415-555-0132", "(415) 555-0132", "+1 415 555 0132",
    "+33 6 12 34 56 78", "06 12 34 56 78", "020 7946 0018", "+49 30 1234567",
])
async def test_a_phone_number_is_redacted(pii, phone):
    out = await pii.process(f"Call me back on {phone} tomorrow.", "record")
    assert out == "Call me back on [phone] tomorrow."


@pytest.mark.parametrize("spoken", [
    "four one five five five five zero one three two",
    "four one five, five five five, oh one three two",
    "plus four four two zero seven nine four six zero zero one eight",
])
async def test_a_phone_number_read_out_in_words_is_redacted(pii, spoken):
    assert await pii.process(f"My number is {spoken} okay", "record") == "My number is [phone] okay"


# ---------------------------------------------------------------- emails

@pytest.mark.parametrize("email", [
    "john.smith@example.com", "JOHN.SMITH@Example.CO.UK", "j_smith+news@mail.example.org",
    "john at example dot com", "john dot smith at example dot co dot uk",
    "john at example.com", "j underscore smith at mail dot example dot org",
])
async def test_an_email_address_written_or_spoken_is_redacted(pii, email):
    out = await pii.process(f"My email is {email}.", "record")
    assert out == "My email is [email]."


async def test_a_website_named_is_not_an_email(pii):
    text = "Look at example dot com for the details."
    assert await pii.process(text, "record") == text


# ---------------------------------------------------------------- names (spaCy en_core_web_sm NER)

@pytest.mark.parametrize("text, expected", [
    ("Hi, my name is John Smith and I'd like to check my order.",
     "Hi, my name is [name] and I'd like to check my order."),
    ("I spoke with Dr. Emily Chen yesterday about the refund.",
     "I spoke with Dr. [name] yesterday about the refund."),
    ("Then Maria called about the invoice.", "Then [name] called about the invoice."),
    ("Please ask Jean-Pierre Martin to call.", "Please ask [name] to call."),
    ("Hi, this is Sarah from the bank.", "Hi, this is [name] from the bank."),
    # ASR output in lowercase: "my name is" still gives the name away.
    ("my name is john smith and I live here", "my name is [name] and I live here"),
])
async def test_a_person_name_is_redacted(pii, text, expected):
    assert await pii.process(text, "record") == expected


@pytest.mark.parametrize("text", [
    "Okay, one moment please.",
    "I want two pizzas and three colas at 5 pm.",
    "Will you be there at five o'clock?",
    "Apple released a new phone.",
    "I'm fine, thanks.",
])
async def test_text_without_pii_passes_unchanged(pii, text):
    assert await pii.process(text, "record") == text


async def test_everything_in_one_transcript_and_the_sync_function_agrees(pii):
    text = ("I'm Robert Brown, card 4111 1111 1111 1111, phone 415 555 0132, "
            "email robert at example dot com.")
    expected = "I'm [name], card [card], phone [phone], email [email]."
    assert await pii.process(text, "user") == expected
    assert redact(text) == expected
    assert await pii.process("", "record") == ""


async def test_a_redaction_that_fails_ends_the_turn_rather_than_record_the_text(pii, monkeypatch):
    def broken(text):
        raise RuntimeError("model gone")

    monkeypatch.setattr("voicestack.processors.pii.redact", broken)
    with pytest.raises(StageError) as error:
        await ProcessorChain([pii]).run("My card is 4111 1111 1111 1111", "record")
    assert "'pii'" in str(error.value) and "4111" not in str(error.value)


# ---------------------------------------------------------------- content filter

@pytest.fixture(scope="module")
def content_filter():
    return ContentFilter(settings())


def test_the_content_filter_checks_the_agents_clauses_and_fails_closed(content_filter):
    assert content_filter.name == "content_filter"
    assert content_filter.applies_to == {"agent"}
    assert content_filter.fail_closed


@pytest.mark.parametrize("clause", [
    "What the fuck is that?",
    "That's FUCKING great.",           # a prefix entry ("fuck*"), any case
    "You should kill   yourself.",     # a phrase, any spacing
    "I\u2019m going to kill you.",     # a curly apostrophe
    "Ta gueule, connard.",             # French
    "Du bist ein Arschloch.",          # German
    "So eine SCHEISSE.",               # German, "ß" written "ss"
    "Das ist Scheiße.",
])
async def test_a_clause_with_a_listed_word_is_replaced(content_filter, clause):
    assert await content_filter.process(clause, "agent") == DEFAULT_TEXT


@pytest.mark.parametrize("clause", [
    "Your order ships tomorrow.",
    "Scunthorpe is a town in Lincolnshire.",     # "cunt" inside a word
    "The assassin's creed was a good game.",
    "Votre commande arrive demain.",
    "Ihre Bestellung kommt morgen.",
    "Shitake mushrooms are on the menu.",        # "shit" only as a whole word
    "",
])
async def test_a_clean_clause_passes_unchanged(content_filter, clause):
    assert await content_filter.process(clause, "agent") == clause


async def test_an_extra_word_list_and_the_replacement_text_come_from_the_settings(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("# our own\n\nblorp\nfrobnicat*\nsecret project x\n", encoding="utf-8")
    f = ContentFilter(settings(content_filter_words_file=str(words),
                               content_filter_text="Let's talk about something else."))
    for clause in ["A blorp here.", "It frobnicates.", "About Secret Project X:", "Fuck."]:
        assert await f.process(clause, "agent") == "Let's talk about something else."
    for clause in ["Blorps are fine.", "A secret project."]:
        assert await f.process(clause, "agent") == clause


def test_a_missing_extra_word_list_fails_at_start():
    with pytest.raises(FileNotFoundError):
        ContentFilter(settings(content_filter_words_file="/nonexistent/words.txt"))


async def test_the_judge_hook_checks_what_the_lists_pass():
    asked = []

    async def judge(clause: str) -> bool:
        asked.append(clause)
        return "bank details" in clause

    f = ContentFilter(settings(), judge=judge)
    assert await f.process("Send me your bank details.", "agent") == DEFAULT_TEXT
    assert await f.process("Your order ships tomorrow.", "agent") == "Your order ships tomorrow."
    assert await f.process("Fuck that.", "agent") == DEFAULT_TEXT
    assert asked == ["Send me your bank details.", "Your order ships tomorrow."]


async def test_a_judge_that_fails_ends_the_turn():
    async def judge(clause: str) -> bool:
        raise TimeoutError("moderation service")

    with pytest.raises(StageError):
        await ProcessorChain([ContentFilter(settings(), judge=judge)]).clause("Hello there.")
