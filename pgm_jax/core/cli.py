"""Command-line helpers shared by every entry point (`pgm_jax.main`, `convert`,
`preprocess`, `tokenizers`, `evaluation`): bad input becomes one clear error line on
stderr (naming the flag, config key or file) and a non-zero exit, never a traceback.

  flags_parser(prog)      absl flags_parser: a bad flag or --config override -> one line, exit 2
  ArgumentParser(...)     argparse with the same one-line errors (exit 2)
  guarded(prog, fn, ...)  runs an entry point's body: expected errors (ValueError, OSError,
                          and the `expected` extras) -> one line, exit 1; anything else (a bug,
                          or an input we did not foresee) -> one line plus the path of a file
                          holding the full traceback, exit 1. PGM_JAX_TRACEBACK=1 (or
                          --verbose where a tool has it) also prints the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback

from absl import flags

TRACEBACK_ENV = "PGM_JAX_TRACEBACK"


def one_line(error: BaseException) -> str:
  """The first line of an error, plus its last line when a traceback is embedded."""
  text = str(error).replace("\\n", "\n").replace("\\'", "'")
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  if not lines:
    return type(error).__name__
  text = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
  if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":  # KeyError('x') -> x
    text = text[1:-1]
  return text


def error_exit(prog: str, message: str, code: int = 1):
  print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def flags_parser(prog: str, flag_values=None):
  """An absl `flags_parser` reporting bad flags/config overrides as one line (exit 2)."""

  def parse(argv):
    fv = flags.FLAGS if flag_values is None else flag_values
    try:
      return fv(argv)
    except flags.Error as e:
      message = one_line(e)
    except (AttributeError, KeyError, TypeError, ValueError, OSError, SyntaxError) as e:
      message = f"bad --config or --config override: {one_line(e)}"
    error_exit(prog, message, 2)

  return parse


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose usage errors are one line ("PROG: error: ... (see --help)"), exit 2."""

  def error(self, message):
    error_exit(self.prog.replace("python -m ", ""), f"{message} (see --help)", 2)


def _traceback_file(prog: str) -> str:
  """Writes the current exception's traceback to a file; returns its path."""
  name = "".join(c if c.isalnum() else "_" for c in prog)
  path = os.path.join(tempfile.gettempdir(),
                      f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.traceback.txt")
  try:
    with open(path, "w", encoding="utf-8") as f:
      traceback.print_exc(file=f)
  except OSError:
    return "(could not be written)"
  return path


def guarded(prog: str, fn, *args, expected: tuple = (), verbose: bool = False, **kwargs):
  """Runs `fn(*args, **kwargs)`; every exception becomes one stderr line and exit 1."""
  verbose = verbose or bool(os.environ.get(TRACEBACK_ENV))
  try:
    return fn(*args, **kwargs)
  except SystemExit:
    raise
  except KeyboardInterrupt:
    error_exit(prog, "interrupted", 130)
  except (ValueError, OSError) + tuple(expected) as e:
    if verbose:
      traceback.print_exc()
    error_exit(prog, one_line(e))
  except Exception as e:  # pylint: disable=broad-except  # the last-resort handler
    if verbose:
      traceback.print_exc()
    path = _traceback_file(prog)
    error_exit(prog, f"unexpected {type(e).__name__}: {one_line(e)} (full traceback in "
                     f"{path}; {TRACEBACK_ENV}=1 prints it)")
