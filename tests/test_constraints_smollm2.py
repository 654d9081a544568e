"""The default model (SmolLM2-135M-Instruct) under a choices constraint: a valid label every time.

Held-out support tickets, written for this test and seen in no prompt, classified with four
examples through a real server. Unconstrained, the small model answers in its own words
("payment", "security", "error"); constrained, every answer is one of the labels.
"""

from __future__ import annotations

import pytest

from parrot_nb.function import SemanticFunction

pytestmark = pytest.mark.slow  # the default model on a CPU
SERVER_ARGS = ("--model", "smollm2")

LABELS = ("billing", "technical", "account", "shipping")
TICKETS = [
    ("I was charged twice for my subscription this month.", "billing"),
    ("The app crashes every time I open the settings page.", "technical"),
    ("I forgot my password and the reset email never arrives.", "account"),
    ("My package has been stuck in transit for two weeks.", "shipping"),
    ("Can I get a refund for the annual plan I bought yesterday?", "billing"),
    ("The website shows error 500 when I upload a photo.", "technical"),
    ("Please delete my profile and all of my data.", "account"),
    ("The courier left my parcel at the wrong address.", "shipping"),
]
TEMPLATE = """Ticket: My invoice shows the wrong VAT number.
Category: billing
Ticket: The export button does nothing in Firefox.
Category: technical
Ticket: How do I change the email address on my login?
Category: account
Ticket: When will my order be delivered?
Category: shipping
Ticket: {{input:ticket}}
Category: {{output:category %s}}"""


def test_the_default_model_gives_a_valid_label_for_every_held_out_ticket(connected) -> None:
    constrained = SemanticFunction.from_template("triage", TEMPLATE % 'choices="billing|technical|account|shipping"')
    # Unconstrained, the prompt must not end in a space (nothing moves it): "Category:" then " payment".
    free = SemanticFunction.from_template("triage_free", TEMPLATE.replace(": {{output", ":{{output") % 'max_tokens=6 stop="\\n"')
    labels = [constrained(ticket=t) for t, _ in TICKETS]
    answers = [free(ticket=t) for t, _ in TICKETS]
    got = [v.get(timeout=300) for v in labels]
    words = [a.get(timeout=300) for a in answers]
    assert all(label in LABELS for label in got), got
    right = sum(g == gold for g, (_, gold) in zip(got, TICKETS))
    print(f"\nconstrained: {got} ({right}/{len(TICKETS)} right)\nunconstrained: {words}")
    # The prompt ends in a space: the engine moves it into the output, so the model writes " billing" as it
    # would; without that, a space-ended prompt makes this model answer one label for every ticket.
    assert len(set(got)) > 1
