"""Errors in what the user gave (a path, a config value, a dataset, a tokenizer): a retry cannot fix
them, so a run that meets one stops at once with one line naming the input, instead of restarting
its worker group ``train.max_failures`` times (or forever under -1)."""

from __future__ import annotations


class UserInputError(Exception):
    """Base of every error a retry cannot fix; the message names the bad input. ``transient`` marks the
    exception to the rule: the input may be fine and its store briefly unreachable (an S3 endpoint that
    timed out), so a retry may help."""

    transient: bool = False


class UsageError(UserInputError):
    """A command-line argument that cannot work as given (the message says why and what to give)."""


def input_error_of(exc: BaseException) -> "UserInputError | None":
    """The user-input error inside ``exc``, if any: itself, its cause, or the original that a Ray
    wrapper carries (a worker's exception in Ray Train, a controller's failure)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)  # a RayTaskError (also an instance of its cause's class): the
        if isinstance(cause, BaseException) and id(cause) not in seen:  # task's own exception, without the
            exc = cause  # remote traceback that the wrapper's message carries
            continue
        if isinstance(exc, UserInputError):
            return exc
        exc = getattr(exc, "_base_exc", None) or getattr(exc, "controller_failure", None) or exc.__cause__
    return None
