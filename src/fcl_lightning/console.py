"""Where the commands print: results on stdout, progress and logs on stderr.

``fcl-lightning fit ... > log.txt`` then holds the round lines, the Dice tables and the line that
says where the outputs are, while the progress bar stays on the terminal. Piped output is not
wrapped at 80 columns (rich's default without a terminal).
"""

from __future__ import annotations

import codecs
import sys

from rich.console import Console

#: width of tables and lines when the output is not a terminal
PIPE_WIDTH = 160


def output_console() -> Console:
    """Results: round lines, tables, where the outputs are (stdout)."""
    return Console(width=None if sys.stdout.isatty() else PIPE_WIDTH)


def log_console() -> Console:
    """Progress bars and progress lines (stderr)."""
    return Console(stderr=True, width=None if sys.stderr.isatty() else PIPE_WIDTH)


#: ASCII stand-ins for the characters the project prints (anything else becomes ``?``)
ASCII_FALLBACK = {
    "±": "+/-",
    "→": "->",
    "←": "<-",
    "×": "x",
    "—": "-",
    "–": "-",
    "…": "...",
    "≥": ">=",
    "≤": "<=",
    "Δ": "d",
    "·": ".",
}


def _ascii_fallback(err: UnicodeError) -> tuple[str, int]:
    if not isinstance(err, UnicodeEncodeError):
        raise err
    bad = err.object[err.start : err.end]
    return "".join(ASCII_FALLBACK.get(ch, "?") for ch in bad), err.end


codecs.register_error("fcl-ascii", _ascii_fallback)


def printable_output() -> None:
    """Never crash on output: a stream whose encoding cannot hold a character (``PYTHONIOENCODING=ascii``,
    a C locale) writes an ASCII stand-in (``+/-``, ``->``) or ``?`` for it, and rich draws its
    tables in ASCII on such a stream."""
    for stream in (sys.stdout, sys.stderr):
        enc = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        if not enc.startswith("utf") and hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="fcl-ascii")
            except (ValueError, OSError):  # a stream that cannot be reconfigured is left alone
                pass
