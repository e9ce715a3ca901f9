"""The memory modes and their registry (in the manner of vLLM's attention-backend registry).

Each mode is one package `memlm/modes/<name>/` with two modules:
- `settings.py`: `Settings`, the mode's section of the server settings (`[knn]` in memlm.toml,
  `MEMLM_KNN__PRESET=...`), and optionally `CollectionOptions`, what a collection fixes for the
  mode when it is created (`--memory knn`); pydantic only, imported with `memlm.config`.
- `mode.py`: `Mode`, a `memlm.modes.base.MemoryModeBase` subclass: validation, the read plan, the
  context it generates in, the derived memory it keeps. Imported when a host starts.

Adding a mode: a new package, its name in `MODES`, and its `MEMORY_MODE_<NAME>` value in
proto/memlm/v1/memlm.proto (names map onto the wire by name). The host, the servicers, the CLI
(`memlm modes`, `--memory`), the settings and the contract test (tests/modes/test_mode_contract.py)
pick it up from here.

This module stays light (no torch, no faiss, no pydantic): `memlm.config` and the client-only CLI
import it.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any, Mapping, Optional

if TYPE_CHECKING:
    from pydantic import BaseModel

    from memlm.modes.base import MemoryModeBase

MODES: tuple[str, ...] = ("none", "rag", "knn", "retro", "landmark")  # the registry, in the order `memlm modes` lists them


def settings_module(name: str) -> ModuleType:
    return importlib.import_module(f"memlm.modes.{name}.settings")


def mode_class(name: str) -> "type[MemoryModeBase]":
    """The registered mode `name` (a name from `MODES`)."""
    if name not in MODES:
        raise KeyError(name)
    return importlib.import_module(f"memlm.modes.{name}.mode").Mode


def settings_class(name: str) -> "Optional[type[BaseModel]]":
    """A mode's settings section, or None when it has none."""
    return getattr(settings_module(name), "Settings", None)


def collection_options_class(name: str) -> "Optional[type[BaseModel]]":
    """What a collection fixes for the mode at creation, or None: the mode derives nothing per collection."""
    return getattr(settings_module(name), "CollectionOptions", None)


def parse_mode(value: Any) -> str:
    """A request's memory mode, as a registered name. InvalidArgument for a name nobody knows,
    Unimplemented for one the wire reserves for a mode not built yet (landmark, rmt)."""
    from memlm.errors import InvalidArgument, Unimplemented

    name = str(getattr(value, "value", value) or "none").strip().lower()
    if name in MODES:
        return name
    if name in reserved_modes():
        raise Unimplemented(f"memory mode {name!r} is not implemented yet; supported: {', '.join(MODES)}")
    raise InvalidArgument(f"unknown memory mode {value!r}; expected one of: {', '.join(MODES)}")


def reserved_modes() -> tuple[str, ...]:
    """Mode names the wire format has an enum value for but no package implements yet."""
    from memlm.v1 import memlm_pb2 as pb

    names = (n.removeprefix("MEMORY_MODE_").lower() for n in pb.MemoryMode.keys())
    return tuple(n for n in names if n not in MODES and n != "unspecified")


def collection_memory(memory: Mapping[str, Optional[Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Validate the memory a collection is created with ({mode: options}) and fill each mode's
    defaults: {mode: options dict}, modes in registry order. Only modes that derive something per
    collection (a `CollectionOptions`) are kept; a mode like rag, which reads the store as it is,
    needs nothing and is dropped. InvalidArgument naming the mode and the bad option."""
    from pydantic import ValidationError

    from memlm.errors import InvalidArgument

    out: dict[str, dict[str, Any]] = {}
    for name, options in memory.items():
        mode = parse_mode(name)
        cls = collection_options_class(mode)
        if cls is None:
            if options:
                raise InvalidArgument(f"memory mode {mode!r} takes no collection options, got {dict(options)!r}")
            continue
        if options is not None and not isinstance(options, Mapping):
            raise InvalidArgument(f"memory mode {mode!r}: options must be an object, got {options!r}")
        try:
            out[mode] = cls(**dict(options or {})).model_dump(mode="json")
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '?'}: {err['msg']}" for err in e.errors())
            raise InvalidArgument(f"memory mode {mode!r} collection options: {problems}") from None
        except TypeError as e:
            raise InvalidArgument(f"memory mode {mode!r} collection options: {e}") from None
    return {name: out[name] for name in MODES if name in out}
