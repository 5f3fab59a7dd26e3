"""One exception type for everything a user can fix: the CLI prints it as one line and exits 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PeftlabError(Exception):
    """A bad input or environment, with the field/file it concerns and a fix, on one line."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # Messages quote user input (a --set string, a file's first line): keep them on one line.
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))


class GuardFailure(PeftlabError):
    """The health guard stopped a run: the message is the diagnosis. `every_rank`: every process of the run raised
    it at the same step (the guard's agreed decision), so they can wait for each other before exiting."""

    exit_code = 3

    def __init__(self, message: str, every_rank: bool = False) -> None:
        super().__init__(message)
        self.every_rank = every_rank


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The valid name a typo most likely meant, or None when nothing is close."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return match[0] if match else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """The `fix: ...` part of an unknown-name error: the closest valid name, else every valid name."""
    choices = list(choices)
    guess = closest(word, choices)
    if guess:
        return f"fix: did you mean '{guess}'?"
    return f"fix: use one of {', '.join(sorted(choices))}"
