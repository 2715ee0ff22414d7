"""One registry for every pluggable family: heads, priors, likelihoods, networks, ...

>>> HEADS = Registry("posterior")
>>> @HEADS.register("log_var")
... class LogVarHead: ...
>>> HEADS.build("log_var")  # doctest: +ELLIPSIS
<...LogVarHead object at ...>

Entries are looked up by name; an unknown name fails with a message that lists every registered
name. A config mapping either names an entry (``name: log_var``) or points at any importable
callable with Hydra's ``_target_``; :meth:`Registry.from_config` handles both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry", "UnknownNameError"]


class UnknownNameError(KeyError):
    """An unknown registry name. Its message lists the names that are registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    """A named family of classes or factories, filled by the :meth:`register` decorator.

    Args:
        kind: what the family is, used in error messages (``"posterior"``, ``"prior"``, ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering a class or factory under ``name``; a taken name raises."""

        def decorator(entry: T) -> T:
            if name in self._entries:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered (by {self._entries[name]!r})"
                )
            self._entries[name] = entry
            return entry

        return decorator

    def get(self, name: str) -> T:
        """The entry registered as ``name``; an unknown name raises :class:`UnknownNameError`."""
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; registered {self.kind} names: "
                f"{', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def name_of(self, entry: object) -> str | None:
        """The name ``entry`` (or the class of an instance) is registered under, if any."""
        for name, registered in self._entries.items():
            if registered is entry or registered is type(entry):
                return name
        return None

    def build(self, name: str, **kwargs: Any) -> Any:
        """Construct the entry registered as ``name`` with ``kwargs``."""
        factory: Any = self.get(name)
        return factory(**kwargs)

    def from_config(self, config: Mapping[str, Any], key: str = "", **kwargs: Any) -> Any:
        """Build from a config mapping: ``{"name": ..., **options}`` or ``{"_target_": ...}``.

        Args:
            config: the options; ``name`` picks a registered entry, ``_target_`` any callable.
            key: where the mapping sits in the whole config (``"posterior"``), for messages.
            **kwargs: arguments supplied by the caller (``latent_dim=...``), merged over the
                config's options.
        """
        options = {k: v for k, v in dict(config).items() if k not in ("name", "_target_")}
        where = key or self.kind
        if "_target_" in config:
            from hydra.utils import get_method

            try:
                factory = get_method(str(config["_target_"]))
            except Exception as err:
                raise ValueError(
                    f"{where}._target_={config['_target_']!r} cannot be imported: {err}"
                ) from None
            return _named_errors(where, factory, {**options, **kwargs})
        if "name" not in config:
            raise ValueError(
                f"{where} needs 'name' (one of: {', '.join(self.names())}) or '_target_'"
            )
        name = str(config["name"])
        if name not in self:
            raise ValueError(
                f"{where}.name={name!r} is not a registered {self.kind}; "
                f"allowed: {', '.join(self.names())}"
            )
        return _named_errors(where, self.get(name), {**options, **kwargs})

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"


def _named_errors(where: str, factory: Any, kwargs: dict[str, Any]) -> Any:
    """``factory(**kwargs)``; a ``ValueError`` whose message does not name a key gets ``where``
    in front (``likelihood: scale must be ...``), so every config error says where it is."""
    try:
        return factory(**kwargs)
    except ValueError as err:
        message = str(err)
        if message.startswith(where):
            raise
        try:
            renamed = type(err)(f"{where}: {message}")
        except Exception:
            raise err from None
        raise renamed from err
