"""Errors in a pipeline's definition, raised when it is built, before anything runs; and the check that text
can travel at all."""

from __future__ import annotations


class PipelineError(ValueError):
    """The pipeline as written cannot run; the message names the agent or placeholder and the fix."""


class InvalidTextError(ValueError):
    """Text that is not valid Unicode (a lone surrogate) where a run needs text; the message says where."""


def check_text(text: str, where: str, error: type[Exception] = InvalidTextError) -> None:
    """Raise `error` if `text` cannot be sent as UTF-8: a lone surrogate, e.g. from bytes decoded with
    errors='surrogateescape' (file names, a terminal's undecodable input). Refused rather than replaced, so
    that what the model reads is exactly what was given, and the fault is named where it entered."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise error(
            f"{where} is not valid Unicode: a lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start}; "
            "fix the text where it is made (e.g. decode bytes with errors='replace')"
        ) from None
