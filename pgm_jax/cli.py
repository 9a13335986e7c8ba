"""Command-line helpers shared by `pgm_jax.main` and `pgm_jax.convert`: bad input
becomes one clear error line (naming the flag or config key), not a traceback."""
import sys

from absl import flags


def one_line(error: BaseException) -> str:
  """The first line of an error, plus its last line when a traceback is embedded."""
  lines = [l.strip() for l in str(error).replace("\\n", "\n").splitlines() if l.strip()]
  if not lines:
    return type(error).__name__
  text = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
  return text.strip("'\"")


def flags_parser(prog: str):
  """An absl `flags_parser` reporting bad flags/config overrides as one line (exit 2)."""

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      message = one_line(e)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      message = f"bad --config override: {one_line(e)}"
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)

  return parse
