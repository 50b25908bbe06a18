"""``VUAConfig``: how token sequences are split into groups and named.

``VUAConfig`` works as the class itself (``VUA(VUAConfig, root)``), as a subclass that overrides
``split_factor``, or as an instance (``VUAConfig(split_factor=64, identity="llama-3-8b")``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Generic, TypeVar

from .errors import ConfigError
from .keys import Namespace, as_token_array, chained_digests, squeeze_batch
from .layout import prefix_relpath

__all__ = ["VUAConfig"]

T = TypeVar("T")


class _class_or_instance(Generic[T]):
    """A method bound to the instance when called on one, else to the class (so both spellings work)."""

    def __init__(self, method: Callable[..., T]) -> None:
        self.method = method
        functools.update_wrapper(self, method)  # type: ignore[arg-type]

    def __get__(self, obj: Any, cls: type) -> Callable[..., T]:
        return functools.partial(self.method, obj if obj is not None else cls)


class VUAConfig:
    """Grouping and naming of token sequences.

    Attributes:
        split_factor: tokens per stored group (default 200). A fragment holds one group.
        identity: anything that must keep caches apart (model name and revision, dtype, KV
            layout). Configurations with different identities never share entries.
    """

    split_factor: int = 200
    identity: str = ""

    def __init__(self, split_factor: int | None = None, identity: str | None = None) -> None:
        if split_factor is not None:
            self.split_factor = split_factor
        if identity is not None:
            self.identity = identity
        self.validate()

    @_class_or_instance
    def validate(self) -> None:
        if type(self.split_factor) is not int or self.split_factor <= 0:
            raise ConfigError(f"split_factor must be a positive int, got {self.split_factor!r}")
        if not isinstance(self.identity, str):
            raise ConfigError(f"identity must be a str, got {type(self.identity).__name__}")

    @_class_or_instance
    def namespace(self) -> Namespace:
        self.validate()
        return Namespace(granularity=self.split_factor, identity=self.identity)

    @_class_or_instance
    def trim_to_split_factor(self, tokens: Any) -> Any:
        """``tokens`` with its last dimension cut to a multiple of ``split_factor`` (leading dims kept)."""
        self.validate()
        length = tokens.shape[-1] if hasattr(tokens, "shape") else len(tokens)
        keep = length - length % self.split_factor
        return tokens[..., :keep] if hasattr(tokens, "shape") else tokens[:keep]

    @_class_or_instance
    def tokens_to_paths(self, tokens: Any) -> list[str]:
        """One relative path per full group of ``tokens`` ([N] or [1, N]), each naming the whole prefix up to that group."""
        namespace = self.namespace()
        digests = chained_digests(as_token_array(squeeze_batch(tokens)), self.split_factor, namespace.seed)
        return [prefix_relpath(namespace.name, d) for d in digests]
