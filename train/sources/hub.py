"""Hugging Face hub ids, resolved from the local cache only: a model someone downloaded is found where
`DDPMPipeline.from_pretrained` finds it, and nothing is ever fetched at run time.

The cache is the one huggingface_hub uses (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub), read when
a model is opened. Outputs must never be written into it: `in_cache` tells a caller that a path lies there.
"""

from __future__ import annotations

import os
from pathlib import Path

from runtime.backends import is_hub_id
from runtime.errors import DDPMError

def cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def in_cache(path: str | os.PathLike) -> bool:
    """Whether `path` lies inside the Hugging Face cache (a snapshot folder or below)."""
    resolved = Path(path).resolve()
    return resolved.is_relative_to(cache_dir().resolve()) or any(p.name.startswith("models--")
                                                                   for p in resolved.parents)


def resolve(hub_id: str) -> Path:
    """The local snapshot folder of `owner/name[@revision]`, from the cache only."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise DDPMError(f"{hub_id} looks like a Hugging Face hub id; reading the hub cache needs huggingface_hub "
                        "(pip install 'ddpm-deploy[export]')") from None
    repo, _, revision = hub_id.partition("@")
    try:
        folder = snapshot_download(repo, revision=revision or None, cache_dir=cache_dir(), local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        raise DDPMError(f"{hub_id} is neither a local path nor a model in the Hugging Face cache {cache_dir()}; "
                        "download it once with `huggingface-cli download` (or DDPMPipeline.from_pretrained) on a "
                        "machine with network, or pass the model's folder") from None
    return Path(folder)


def export_name(source: str | os.PathLike) -> str:
    """A folder name for outputs made from `source`: the repo name of a hub id or cached snapshot, else the name."""
    text = str(source)
    if is_hub_id(text):
        return text.partition("@")[0].split("/")[-1]
    path = Path(text).resolve()
    for parent in (path, *path.parents):
        if parent.name.startswith("models--"):
            return parent.name.split("--")[-1]
    return path.name
