"""One error type for everything a user can get wrong, and the CLI guard that prints it in one line.

Every package of blockcache raises `BlockcacheError` (or a subclass) for bad input; the console
scripts wrap their `main` in `cli_main` so that a user sees `error: <one line>` and exit status 2,
never a traceback. Programming errors still raise normally, so bugs stay visible in tests.
"""

from __future__ import annotations

import functools
import sys


class BlockcacheError(Exception):
    """A problem with the user's input (file, argument, schedule, plan). The message is one line."""


def one_line(message: object) -> str:
    return " ".join(str(message).split())


def cli_main(main):
    """Decorate a console-script entry point: user errors become one line on stderr and exit 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except BlockcacheError as e:
            print(f"error: {one_line(e)}", file=sys.stderr)
        except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
            print(f"error: {e.strerror or type(e).__name__}: {e.filename}", file=sys.stderr)
        except BrokenPipeError:  # output piped into `head` and closed early
            sys.stderr.close()
            return 0
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130
        return 2

    return wrapper
