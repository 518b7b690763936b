"""One way to open and close: what every ``X.open(...)`` of the library returns.

``VmaWriter.open``, ``VmaReader.open`` (and the other resources that need an
``await`` to come into being) return an :class:`Opening`, which works both
ways a caller expects from an anyio-style resource:

* ``async with X.open(...) as x:`` opens, enters the resource's own context
  (a writer starts its output task there) and leaves it on the way out;
* ``x = await X.open(...)`` opens and hands the resource over; the caller
  finishes it with ``await x.aclose()`` (which, as trio's ``AsyncResource``
  rule has it, still closes, ungracefully, when cancelled).

The resource itself is an async context manager, so ``x = await
X.open(...)`` followed by ``async with x:`` is the same as the first form.
An :class:`Opening` is single-use: it opens one resource.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Generator
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import anyio

__all__ = ["AsyncResource", "Opening", "unwrap_group"]


class AsyncResource(abc.ABC):
    """What an :class:`Opening` opens (trio's ``AsyncResource``): ``aclose``,
    and ``async with`` that calls it on the way out.

    A resource whose way out depends on how the block ended (the writer
    finishes an archive on success and aborts it on an exception) overrides
    ``__aexit__``; the others inherit this one.
    """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release everything; a cancelled ``aclose`` still closes (ungracefully)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        await self.aclose()
        return None


R = TypeVar("R", bound=AsyncResource)


class Opening(Generic[R]):
    """Awaitable for an open resource, or an async context manager over it."""

    __slots__ = ("_opener", "_resource", "_used")

    def __init__(self, opener: Callable[[], Awaitable[R]]) -> None:
        self._opener = opener
        self._resource: R | None = None
        self._used = False

    def _open(self) -> Awaitable[R]:
        if self._used:
            raise RuntimeError("this open() was already awaited or entered; call open() again")
        self._used = True
        return self._opener()

    def __await__(self) -> Generator[Any, None, R]:
        return self._open().__await__()

    async def __aenter__(self) -> R:
        resource = await self._open()
        # A resource's __aenter__ that fails has closed (or aborted) itself.
        entered = await resource.__aenter__()
        self._resource = resource
        return entered

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        resource, self._resource = self._resource, None
        assert resource is not None
        return await resource.__aexit__(exc_type, exc, tb)


def unwrap_group(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error a caller should see from a failed task group: the first that
    is not a cancellation (a failing sink cancels the reading, not vice versa)."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    cancelled = anyio.get_cancelled_exc_class()
    for leaf in leaves:
        if not isinstance(leaf, cancelled):
            return leaf
    return leaves[0] if leaves else group
