"""One-line error messages naming the problem (key, file, model): the only place exception text is flattened."""
from __future__ import annotations

import errno

_SHORT = 160  # past this, keep the first sentence (torch.load's message for a truncated zip has four)
_LONG = 300


def flat(exc: BaseException | str) -> str:
    return " ".join(str(exc).split())


def one_line(exc: BaseException, whole: bool = False) -> str:
    """An exception as one short line, its type prefixed unless a ValueError or FileNotFoundError; whole: uncut."""
    text = flat(exc) or "(no message)"
    if not whole:
        if len(text) > _SHORT and ". " in text:
            text = text.split(". ")[0]
        text = text if len(text) <= _LONG else text[:_LONG - 3] + "..."
    return text if isinstance(exc, (ValueError, FileNotFoundError)) else f"{type(exc).__name__}: {text}"


def os_error_line(exc: OSError, what: str) -> str:
    """'<what> PATH: <reason> (ERRNO)', e.g. 'cannot write /x/last.pth: No space left on device (ENOSPC)'."""
    reason = exc.strerror or flat(exc)
    name = errno.errorcode.get(exc.errno or 0, "")
    return f"{what} {exc.filename or '?'}: {reason}" + (f" ({name})" if name else "")


class RunDirError(RuntimeError):
    """The run folder cannot be used (locked, unwritable, holds another run): exit 2, one line."""
