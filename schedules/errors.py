"""One error type for everything a user can get wrong, and the CLI guard that prints it in one line.

Every package of blockcache raises `BlockcacheError` (or a subclass) for bad input; the console
scripts wrap their `main` in `cli_main` so that a user sees `error: <one line>` and exit status 2,
never a traceback. Programming errors still raise normally, so bugs stay visible in tests.

Library functions name their own parameters in errors (`ParameterError`); `cli_main` shows the flag
that sets the parameter (`CLI_FLAGS`) instead, so the user reads what they typed.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading


class BlockcacheError(Exception):
    """A problem with the user's input (file, argument, schedule, plan). The message is one line."""


class ParameterError(BlockcacheError):
    """A bad value of the named parameter of a library function. `message` writes the parameter as
    `{name}` (substituted as text, so user values in the message may hold braces): the library's
    text shows the parameter name, a CLI's (`render`) its flag."""

    def __init__(self, parameter: str, message: str):
        self.parameter, self.template = parameter, message
        super().__init__(message.replace("{name}", parameter))

    def render(self, flags: dict[str, str]) -> str:
        return self.template.replace("{name}", flags.get(self.parameter, self.parameter))


# Library parameters → the flags that set them; every blockcache CLI names a parameter the same way.
CLI_FLAGS = {"out_dir": "--out", "batch_size": "--batch-size", "precision": "--precision", "workspace": "--workspace",
             "timing_cache": "--timing-cache", "opt_level": "--opt-level", "guidance_scale": "--guidance-scale",
             "backend": "--backend", "device": "--device", "threads": "--threads", "random_init": "--random-init",
             "every_step": "--every-step", "seed": "--init-seed", "steps": "--steps", "seeds": "--seeds",
             "contexts": "--contexts", "batch_sizes": "--batch-sizes", "schedules": "--schedule"}  # load_model's seed: the random weights' seed


def one_line(message: object) -> str:
    return " ".join(str(message).split())


class Terminated(BaseException):
    """SIGTERM during a CLI: raised in the main thread so that `finally` blocks clean up (an export
    removes its staging folder) before the process exits with 143."""


def _terminate(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises `Terminated` while the block runs (main thread only: signal handlers live there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cli_main(main=None, *, flags: dict[str, str] = CLI_FLAGS):
    """Decorate a console-script entry point: user errors become one line on stderr and exit 2.
    `flags` maps library parameter names to the CLI's flags (default `CLI_FLAGS`); use as `@cli_main`
    or `@cli_main(flags=…)`."""
    if main is None:
        return functools.partial(cli_main, flags=flags)

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            with _sigterm_raises():
                return main(argv)
        except ParameterError as e:
            print(f"error: {one_line(e.render(flags))}", file=sys.stderr)
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
        except Terminated:
            print("error: terminated", file=sys.stderr)
            return 143
        return 2

    return wrapper
