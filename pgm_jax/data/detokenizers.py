"""Text cleanup applied before tokenizing, per corpus (`config.data.detokenizer`).

Several evaluation corpora come pre-tokenised: words and punctuation separated by spaces
("it 's , he said ."), WikiText's "@-@" number separators, PTB's "N" for numbers. The
reference code (and MDLM before it) rewrites such text into ordinary prose before the
GPT-2 / BERT tokenizer sees it, one rule set per corpus. These are the same rules, in
the same order, so that token counts and perplexities are comparable:

  lm1b               spaced URLs, contractions, punctuation, quotes and brackets (LM1B)
  wikitext           "@-@" / "@,@" / "@.@", spaced punctuation, brackets, heading "= =" runs
  ptb                "'s", "n't", "N" -> "1", "<unk>" -> "?"
  lambada            curly double quotes -> '"', and a leading newline
  scientific_papers  wikitext's rules, then lm1b's
  none               the text as it is

    detokenize("lm1b", "he said , \" hello \" .") == 'he said, "hello".'
"""
from __future__ import annotations

import re
from typing import Callable

# (pattern, replacement, is_regex) applied in order.
_Rule = tuple[str, str, bool]

_WIKITEXT: tuple[_Rule, ...] = (
    ("s '", "s'", False),                          # plural possessive
    (r"/' [0-9]/", r"/'[0-9]/", True),             # kept as the reference has it
    (" @-@ ", "-", False), (" @,@ ", ",", False), (" @.@ ", ".", False),
    (" : ", ": ", False), (" ; ", "; ", False), (" . ", ". ", False), (" ! ", "! ", False),
    (" ? ", "? ", False), (" , ", ", ", False),
    (r"\(\s*([^\)]*?)\s*\)", r"(\1)", True),       # inner spaces of brackets and quotes
    (r"\[\s*([^\]]*?)\s*\]", r"[\1]", True),
    (r"{\s*([^}]*?)\s*}", r"{\1}", True),
    (r"\"\s*([^\"]*?)\s*\"", r'"\1"', True),
    (r"'\s*([^']*?)\s*'", r"'\1'", True),
    ("= = = =", "====", False), ("= = =", "===", False), ("= =", "==", False),
    (" \u00b0 ", "\u00b0", False),                 # degree sign
    (" \n", "\n", False), ("\n ", "\n", False),
    (" N ", " 1 ", False), (" 's", "'s", False),
)

_LM1B: tuple[_Rule, ...] = (
    ("http : / / ", "http://", False), ("https : / / ", "https://", False),
    (r" \'(\w+)", r"'\1", True),                   # " 's" -> "'s"
    (r" (\w+) \. ", r" \1. ", True), (r" (\w+) \.$", r" \1.", True),
    (" ? ", "? ", False), (r" \?$", "?", True),
    (" ! ", "! ", False), (r" \!$", "!", True),
    (" , ", ", ", False), (" : ", ": ", False), (" ; ", "; ", False), (" / ", "/", False),
    (r"\" ([^\"]+) \"", r'"\1"', True), (r"\' ([^\']+) \'", r"'\1'", True),
    (r"\( ([^\(\)]+) \)", r"(\1)", True), (r"\[ ([^\[\]]+) \]", r"[\1]", True),
    ("$ ", "$", False), ("\u00a3 ", "\u00a3", False),
)

_PTB_HEAD: tuple[_Rule, ...] = (
    (" 's", "'s", False), ("s ' ", "s' ", False), (" n't", "n't", False),
    (" \n ", "\n", False), ("\\/", "/", False),
)
_PTB_TAIL: tuple[_Rule, ...] = (
    ("$ 1", "$1", False), ("# 1", "#1", False), ("<unk>", "?", False),
)


def _apply(rules, text: str) -> str:
  for pattern, repl, is_regex in rules:
    text = re.sub(pattern, repl, text) if is_regex else text.replace(pattern, repl)
  return text


def wikitext(text: str) -> str:
  return _apply(_WIKITEXT, text)


def lm1b(text: str) -> str:
  return _apply(_LM1B, text)


def ptb(text: str) -> str:
  text = _apply(_PTB_HEAD, text)
  for _ in range(10):                  # overlapping " N N " runs need repeated passes
    text = text.replace(" N ", " 1 ")
  return _apply(_PTB_TAIL, text)


def lambada(text: str) -> str:
  text = text.replace("\u201c", '"').replace("\u201d", '"')
  return "\n" + text.strip()


def scientific_papers(text: str) -> str:
  return lm1b(wikitext(text))


DETOKENIZERS: dict[str, Callable[[str], str]] = {
    "none": lambda text: text, "lm1b": lm1b, "wikitext": wikitext, "ptb": ptb,
    "lambada": lambada, "scientific_papers": scientific_papers,
}


def get(name: str | None, key: str = "config.data.detokenizer") -> Callable[[str], str]:
  """The detokenizer called `name` ("none" or None: identity); a clear error otherwise."""
  name = name or "none"
  if name not in DETOKENIZERS:
    raise ValueError(f"{key}: unknown detokenizer {name!r}; expected one of "
                     f"{sorted(DETOKENIZERS)}")
  return DETOKENIZERS[name]


def detokenize(name: str | None, text: str) -> str:
  return get(name)(text)
