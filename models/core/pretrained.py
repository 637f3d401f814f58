"""Pretrained initial weights for stage 1: find them (a file under the data root, or a torchvision
weights name in the torch hub cache), read them without unpickling objects, and load them into an
`ImageClassifier`: every backbone key exactly, the head as the run asks (`HeadInit`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from models.contract.pretrained import PretrainedFile, TorchvisionWeights, resolve_in_root
from models.core.backbones import TORCHVISION_KEY_PREFIXES, ImageClassifier

log = logging.getLogger("h2t.train")


class PretrainedMismatch(ValueError):
    """The weights do not fit the run's backbone (missing, unexpected or differently shaped keys)."""


@dataclass(frozen=True)
class WeightSource:
    """Where named weights are looked up on this host: the data root for files, the torch hub cache
    (`torch.hub.get_dir()`, i.e. `$TORCH_HOME/hub`) for torchvision names; nothing is downloaded unless
    `allow_download` (the operator's H2T_ALLOW_WEIGHT_DOWNLOAD)."""

    data_root: Path | None = None
    allow_download: bool = False

    def path_of(self, spec: PretrainedFile | TorchvisionWeights) -> Path:
        if isinstance(spec, PretrainedFile):
            if self.data_root is None:
                raise ValueError(f"pretrained file {spec.file!r} needs a data root to be found under")
            path = resolve_in_root(self.data_root, spec.file)
            if not path.is_file():
                raise FileNotFoundError(f"pretrained weights {spec.file!r} not found under the data root "
                                        f"{self.data_root}")
            return path
        path, url = torchvision_cache_file(spec.torchvision)
        if path.is_file():
            return path
        if not self.allow_download:
            raise FileNotFoundError(
                f"torchvision weights {spec.torchvision} are not in the torch hub cache: expected {path}; copy the "
                f"file from {url} there (docs/recipes.md), or let the workers download it with "
                "H2T_ALLOW_WEIGHT_DOWNLOAD=true")
        path.parent.mkdir(parents=True, exist_ok=True)
        match = torch.hub.HASH_REGEX.search(path.name)
        log.info("downloading %s to %s", url, path)
        torch.hub.download_url_to_file(url, str(path), hash_prefix=match.group(1) if match else None, progress=False)
        return path


def torchvision_cache_file(name: str) -> tuple[Path, str]:
    """The torch hub cache file of a torchvision weights name (as `torch.hub.load_state_dict_from_url`
    stores it) and the URL it comes from."""
    import torchvision.models

    enum_name, _, member = name.partition(".")
    enum = getattr(torchvision.models, enum_name, None)
    try:
        weights = enum[member]  # type: ignore[index]
    except (TypeError, KeyError):
        raise ValueError(f"torchvision has no weights named {name!r}") from None
    filename = os.path.basename(urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename, weights.url


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a torch file read with `weights_only=True` (tensors and
    plain containers only: a pickle of arbitrary objects is refused). A checkpoint of this service
    (`{"model": ...}`) or a `{"state_dict": ...}` wrapper is unwrapped; DataParallel's `module.` goes."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: object = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError and friends: not a plain state dict
            raise ValueError(f"{path.name} is not a plain state dict (read with weights_only=True): {exc}") from exc
    for wrapper in ("model", "state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{path.name} does not hold a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def to_classifier_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Torchvision's key layout renamed to ImageClassifier's; ours is kept as it is."""
    if any(k.startswith(("backbone.", "head.")) for k in state):
        return dict(state)
    renamed = {}
    for key, value in state.items():
        for theirs, ours in TORCHVISION_KEY_PREFIXES:
            if key.startswith(theirs):
                key = ours + key.removeprefix(theirs)
                break
        renamed[key] = value
    return renamed


@dataclass(frozen=True)
class PretrainedReport:
    source: str
    loaded: tuple[str, ...]  # keys of the model that took the file's values
    ignored: tuple[str, ...]  # keys of the file that were not loaded (the head, when re-initialised)
    head_loaded: bool

    def summary(self) -> str:
        head = "loaded" if self.head_loaded else "re-initialised"
        ignored = f"; ignored {', '.join(self.ignored)}" if self.ignored else ""
        return f"stage 1 starts from {self.source}: {len(self.loaded)} tensors loaded, head {head}{ignored}"


def load_pretrained(model: ImageClassifier, state: Mapping[str, torch.Tensor], head: str,
                    source: str = "pretrained weights") -> PretrainedReport:
    """Copy `state` into `model`: every backbone tensor must be there with its shape and nothing else
    may be; the head is loaded ("load"), kept as initialised ("reinit"), or loaded when it fits ("auto")."""
    state = to_classifier_keys(state)
    own = model.state_dict()
    backbone = [k for k in own if k.startswith("backbone.")]
    heads = [k for k in own if not k.startswith("backbone.")]
    missing = [k for k in backbone if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in backbone
                if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        problems = [f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", reshaped)) if keys]
        raise PretrainedMismatch(f"{source} do not fit this backbone ({'; '.join(problems)})")
    head_fits = all(k in state and state[k].shape == own[k].shape for k in heads)
    if head == "load" and not head_fits:
        raise PretrainedMismatch(f"{source}: head.load asks for a classifier head of this run's shape "
                                 f"({', '.join(f'{k} {tuple(own[k].shape)}' for k in heads)}); the file has none")
    load_head = head == "load" or (head == "auto" and head_fits)
    chosen = {k: state[k] for k in backbone + (heads if load_head else [])}
    result = model.load_state_dict(chosen, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) == (set() if load_head else set(heads))
    return PretrainedReport(source, tuple(chosen), tuple(k for k in state if k not in chosen), load_head)


def initialise_from(model: ImageClassifier, spec: PretrainedFile | TorchvisionWeights,
                    source: WeightSource) -> PretrainedReport:
    """Find, read and load the weights a run names."""
    path = source.path_of(spec)
    name = spec.file if isinstance(spec, PretrainedFile) else spec.torchvision
    return load_pretrained(model, read_state_dict(path), spec.head, f"pretrained weights {name}")
