"""One-line error messages: what a user reads when something stops.

Every script ends a failure with one line that names the problem (the key, the file, the
model). These helpers turn exceptions into such lines; nothing else in the project flattens
exception text by hand.
"""
from __future__ import annotations

import errno

_SHORT = 160  # past this, a multi-sentence message keeps its first sentence
_LONG = 300  # hard cap


def flat(exc: BaseException | str) -> str:
    """The text of an exception (or a string) on one line, whitespace runs collapsed."""
    return " ".join(str(exc).split())


def one_line(exc: BaseException, whole: bool = False) -> str:
    """An exception as one short line, prefixed by its type unless it is a ValueError or a
    missing file (ours already say what is wrong). whole: keep our own long messages uncut
    (no first-sentence cut, no cap)."""
    text = flat(exc) or "(no message)"
    if not whole:
        if len(text) > _SHORT and ". " in text:
            text = text.split(". ")[0]  # e.g. torch.load's four-sentence message for a truncated zip
        text = text if len(text) <= _LONG else text[:_LONG - 3] + "..."
    return text if isinstance(exc, (ValueError, FileNotFoundError)) else f"{type(exc).__name__}: {text}"


def os_error_line(exc: OSError, what: str) -> str:
    """'<what> PATH: <reason> (ERRNO)', e.g. 'cannot write /x/last.pth: No space left on device (ENOSPC)'."""
    reason = exc.strerror or flat(exc)
    name = errno.errorcode.get(exc.errno or 0, "")
    return f"{what} {exc.filename or '?'}: {reason}" + (f" ({name})" if name else "")
