"""Where the commands print: results on stdout, progress and logs on stderr.

``fcl-lightning fit ... > log.txt`` then holds the round lines, the Dice tables and the line that
says where the outputs are, while the progress bar stays on the terminal. Piped output is not
wrapped at 80 columns (rich's default without a terminal).
"""

from __future__ import annotations

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
