"""Hugging Face Hub sources: `hf:OWNER/REPO/PATH/IN/REPO[@REVISION]` -> a local file.

Every tool that reads weights (`tools.convert --from`, `tools.vq --from`,
`tools.eval_assets convert_gpt2 --from`) accepts such a source; `resolve` turns it into
the path of the file in the Hugging Face cache (downloading it through
`huggingface_hub.hf_hub_download` if it is not there yet) and leaves any other value
unchanged, so the code after it only ever sees local paths.

  hf:jdeschena/pgm/pgm_8_8.ckpt               a file of a repo, at the `main` branch
  hf:jdeschena/pgm/pgm_8_8.ckpt@<commit|tag>  ... at a revision (branch, tag or commit hash)
  hf:openai-community/gpt2-large              a repo (`resolve_repo`: the GPT-2 judge)
  hf:gpt2-large                               a repo without an owner (the Hub's old names)

The cache is huggingface_hub's own: HF_HUB_CACHE, else HF_HOME/hub, else
~/.cache/huggingface/hub; HF_HUB_OFFLINE=1 reads only the cache (no network). Both are read
when a source is resolved, not only when huggingface_hub is imported. HF_TOKEN (or
`hf auth login`) is used by huggingface_hub for private and gated repos.

huggingface_hub is an optional extra (`pip install 'pgm_jax[hub]'`); it is imported only
when an `hf:` source is resolved. Every failure is one line (a `HubError`, a ValueError)
naming the flag and the source.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional, Sequence

from pgm_jax.core import cli

PREFIX = "hf:"
SYNTAX = "hf:OWNER/REPO/PATH/IN/REPO[@REVISION]"
INSTALL = "pip install 'pgm_jax[hub]'"
_TRUE = {"1", "ON", "YES", "TRUE"}


class HubError(ValueError):
  """An `hf:` source that cannot be resolved (the message is one line)."""


class _Missing(HubError):
  """The file is not in the repo, or (offline, unreachable) not in the cache."""

  def __init__(self, message: str, error: Exception):
    super().__init__(message)
    self.error = error


@dataclasses.dataclass(frozen=True)
class Source:
  repo_id: str
  filename: Optional[str]  # None: the source names a repo
  revision: Optional[str]  # None: the default branch (main)

  def __str__(self):
    path = self.repo_id + (f"/{self.filename}" if self.filename else "")
    return PREFIX + path + (f"@{self.revision}" if self.revision else "")


def is_hub(src) -> bool:
  return isinstance(src, str) and src.startswith(PREFIX)


def parse(src: str, flag: str = "--from", *, repo: bool = False) -> Source:
  """`hf:OWNER/REPO/PATH[@REV]` (repo=False) or `hf:[OWNER/]REPO[@REV]` (repo=True)."""
  want = "hf:[OWNER/]REPO[@REVISION]" if repo else SYNTAX
  rest = src[len(PREFIX):]
  revision = None
  if "@" in rest:
    rest, revision = rest.rsplit("@", 1)
    if not revision:
      raise HubError(f"{flag}={src}: empty revision after '@' (expected {want})")
  parts = rest.split("/")
  if any(not p.strip() for p in parts) or (repo and len(parts) > 2) or (
      not repo and len(parts) < 3):
    raise HubError(f"{flag}={src}: expected {want}")
  if repo:
    return Source(rest, None, revision)
  return Source("/".join(parts[:2]), "/".join(parts[2:]), revision)


def offline() -> bool:
  """HF_HUB_OFFLINE (as huggingface_hub reads it), read now rather than at its import."""
  value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
  if value is not None:
    return value.strip().upper() in _TRUE
  hub = _import(None, "")
  return bool(hub.constants.HF_HUB_OFFLINE) if hub else False


def cache_dir() -> str:
  """The hub cache huggingface_hub uses: HF_HUB_CACHE, else HF_HOME/hub, else its default."""
  env = os.environ
  expand = lambda p: os.path.expandvars(os.path.expanduser(p))
  for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
    if env.get(name):
      return expand(env[name])
  if env.get("HF_HOME"):
    return os.path.join(expand(env["HF_HOME"]), "hub")
  hub = _import(None, "")
  if hub is not None:
    return hub.constants.HF_HUB_CACHE
  return os.path.join(expand(env.get("XDG_CACHE_HOME", "~/.cache")), "huggingface", "hub")


def _import(src: Optional[str], flag: str):
  """huggingface_hub, or (src given) a one-line error saying how to install it."""
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    import huggingface_hub.constants  # pylint: disable=g-import-not-at-top,unused-import
    return huggingface_hub
  except ImportError:
    if src is None:
      return None
    raise HubError(f"{flag}={src}: hf: sources need huggingface_hub, which is not installed: "
                   f"{INSTALL}") from None


def _explain(e: Exception, source: Source, filename: str, flag: str, src: str) -> HubError:
  """A huggingface_hub error -> one line naming the flag, the source and what to do."""
  from huggingface_hub import errors  # pylint: disable=g-import-not-at-top
  rev = source.revision or "main"
  where = f"{filename} in {source.repo_id}@{rev}"
  if isinstance(e, errors.GatedRepoError):
    why = (f"{source.repo_id} is gated: accept its terms on huggingface.co and log in "
           f"(HF_TOKEN or `hf auth login`)")
  elif isinstance(e, errors.RepositoryNotFoundError):
    why = f"repository {source.repo_id} not found on the Hub (or private: set HF_TOKEN)"
  elif isinstance(e, errors.RevisionNotFoundError):
    why = f"revision {rev} not found in {source.repo_id}"
  elif isinstance(e, errors.RemoteEntryNotFoundError):
    why = f"no file {filename} in {source.repo_id}@{rev}"
  elif isinstance(e, errors.LocalEntryNotFoundError) and offline():
    why = (f"{where} is not in the Hugging Face cache ({cache_dir()}) and HF_HUB_OFFLINE is "
           f"set, so nothing is downloaded: unset HF_HUB_OFFLINE, or fill the cache")
  elif isinstance(e, errors.LocalEntryNotFoundError):
    why = (f"could not reach the Hub and {where} is not in the cache ({cache_dir()}): check "
           f"the connection")
  else:
    why = f"download of {where} failed: {type(e).__name__}: {cli.one_line(e)}"
  if isinstance(e, (errors.RemoteEntryNotFoundError, errors.LocalEntryNotFoundError)):
    return _Missing(f"{flag}={src}: {why}", e)
  return HubError(f"{flag}={src}: {why}")


def _download(hub, source: Source, filename: str, flag: str, src: str) -> str:
  try:
    return hub.hf_hub_download(source.repo_id, filename, revision=source.revision,
                               cache_dir=cache_dir(), local_files_only=offline())
  except HubError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # hub, network and file errors
    raise _explain(e, source, filename, flag, src) from None


def resolve(src: str, flag: str = "--from", log: Optional[Callable[[str], None]] = None) -> str:
  """The local path of `src`: an `hf:` file source is fetched into the hub cache (or found
  there); anything else is returned unchanged."""
  if not is_hub(src):
    return src
  source = parse(src, flag)
  hub = _import(src, flag)
  path = _download(hub, source, source.filename, flag, src)
  if log:
    log(f"{src} -> {path}")
  return path


def resolve_repo(src: str, files: Sequence[Sequence[str]], flag: str = "--from",
                 log: Optional[Callable[[str], None]] = None) -> str:
  """An `hf:[OWNER/]REPO[@REV]` source -> its snapshot folder in the hub cache, holding one
  file of each group of `files` (the first of a group the repo has: e.g.
  [["config.json"], ["model.safetensors", "pytorch_model.bin"]]). A file source
  (`hf:OWNER/REPO/PATH`) resolves to that file, as `resolve`; anything else is unchanged."""
  if not is_hub(src):
    return src
  if src[len(PREFIX):].split("@", 1)[0].count("/") >= 2:
    return resolve(src, flag, log)
  source = parse(src, flag, repo=True)
  hub = _import(src, flag)
  folders = set()
  for group in files:
    first = None
    for name in group:
      try:
        folders.add(os.path.dirname(_download(hub, source, name, flag, src)))
        break
      except _Missing as e:
        first = first or e
    else:  # none of the group: say so once, naming them all
      raise _explain(first.error, source, " or ".join(group), flag, src)
  if len(folders) != 1:  # the branch moved between two downloads
    raise HubError(f"{flag}={src}: the files came from different commits ({sorted(folders)}); "
                   f"pin one with @REVISION")
  folder = folders.pop()
  if log:
    log(f"{src} -> {folder}")
  return folder
