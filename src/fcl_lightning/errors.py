"""Errors about what the user gave (data, config values, checkpoints, weights, output folder).

The CLI (:func:`fcl_lightning.cli.main`) ends a command that raises one with a single line
``error: <message>`` and exit code 2; anything else is an internal error (exit 1). The traceback
is printed only with ``--debug`` or ``FCL_DEBUG=1``. Every module raises a subclass of
:class:`UserError` for bad input, so that one ``except`` tells the two kinds apart.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

#: exit codes: bad input, internal error
EXIT_USER, EXIT_INTERNAL = 2, 1


class UserError(ValueError):
    """Bad input; the message names the file, key or value at fault."""


class ConfigError(UserError):
    """A config value that cannot work (named by its key)."""


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then the exceptions it was raised from or during, outermost first."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def first_user_error(exc: BaseException) -> UserError | None:
    return next((e for e in exception_chain(exc) if isinstance(e, UserError)), None)


def as_config_error(exc: BaseException) -> UserError | None:
    """The user-facing error behind an exception raised while the config's classes were built:
    a :class:`UserError` anywhere in the chain, else the first ``ValueError``/``TypeError`` raised
    by a constructor's own check (jsonargparse wraps it in union and namespace dumps)."""
    found = first_user_error(exc)
    if found is not None:
        return found
    chain = list(exception_chain(exc))
    plain = [
        e
        for e in chain
        if type(e) in (ValueError, TypeError) and "\n" not in str(e) and "Does not validate" not in str(e)
    ]
    return ConfigError(f"invalid config value: {plain[-1]}") if plain else None


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """Whether ``--debug`` is in ``argv`` or ``FCL_DEBUG`` is set; ``argv`` without ``--debug``."""
    env = os.environ.get("FCL_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    return env or "--debug" in argv, [a for a in argv if a != "--debug"]


def run_reporting_errors(fn: Callable[[], Any], debug: bool) -> Any:
    """Run ``fn``; a :class:`UserError` (also one wrapped by another exception) ends the process
    with one ``error:`` line and exit 2, any other exception with one line and exit 1; a stop
    signal (:mod:`fcl_lightning.interrupt`) with where it stopped and exit ``128 + signal``."""
    from fcl_lightning.interrupt import RunInterrupted

    try:
        return fn()
    except RunInterrupted as stop:  # a stop signal: where it stopped, exit 128 + signal
        print(stop.message, file=sys.stderr)
        raise SystemExit(stop.exit_code) from None
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:  # noqa: BLE001 - this is the process's last handler
        if debug:
            traceback.print_exc()
        user = first_user_error(exc)
        if user is not None:
            print(f"error: {user}", file=sys.stderr)
            raise SystemExit(EXIT_USER) from None
        hint = "" if debug else " (an internal error: rerun with --debug or FCL_DEBUG=1 for the traceback)"
        print(f"error: {type(exc).__name__}: {exc}{hint}", file=sys.stderr)
        raise SystemExit(EXIT_INTERNAL) from None
