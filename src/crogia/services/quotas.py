"""Session caps (MAX_SESSIONS, MAX_SESSIONS_PER_TENANT) and the image allow-list (SANDBOX_IMAGES).

`SessionService.create` goes through `capped`: the count (rows in the store plus creations still in
flight) is taken and a place reserved under one lock, so a burst of creates cannot overshoot a cap;
the place is given back when the create ends (its row then counts, or it failed and left none).
A create racing the last moments of another may count that one twice: it errs toward refusing.
"""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Concatenate, ParamSpec, Protocol, TypeVar

from crogia.config import Settings
from crogia.errors import Conflict, Forbidden, InvalidInput, Unavailable
from crogia.store import Database, repo

T = TypeVar("T")


class SessionQuotas:
    """Admits a session create, or says which cap or rule stops it."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self._lock = asyncio.Lock()
        self._in_flight: Counter[str] = Counter()

    @asynccontextmanager
    async def admit(self, *, tenant: str, image: str | None) -> AsyncIterator[None]:
        """Hold a place for one session of `tenant` while it is created.

        Forbidden for an image outside SANDBOX_IMAGES, Conflict past a cap; an allowed image the
        engine does not have is the caller's InvalidInput, not the server's Unavailable.
        """
        self.check_image(image)
        async with self._lock:
            await self._check_caps(tenant)
            self._in_flight[tenant] += 1
        try:
            yield
        except Unavailable as exc:
            if image and image != self.settings.docker_base_image and exc.context.get("image") == image:
                raise InvalidInput(f"Image {image} is not on the sandbox engine.", image=image) from None
            raise
        finally:
            self._in_flight[tenant] -= 1
            if self._in_flight[tenant] <= 0:
                del self._in_flight[tenant]

    def check_image(self, image: str | None) -> None:
        allowed = self.settings.allowed_images
        if image is not None and image not in allowed:
            raise Forbidden(
                f"Image {image} is not allowed on this server (SANDBOX_IMAGES: {', '.join(allowed)}).",
                image=image,
            )

    async def _check_caps(self, tenant: str) -> None:
        cap_all, cap_mine = self.settings.max_sessions, self.settings.max_sessions_per_tenant
        if not cap_all and not cap_mine:
            return
        async with self.db.session() as db:
            total, mine = await repo.count_sessions(db, tenant=tenant)
        total += sum(self._in_flight.values())
        mine += self._in_flight[tenant]
        if cap_all and total >= cap_all:
            raise Conflict(
                f"This server holds its maximum of {cap_all} sessions (MAX_SESSIONS).", cap=cap_all
            )
        if cap_mine and mine >= cap_mine:
            raise Conflict(
                f"Tenant {tenant} holds its maximum of {cap_mine} sessions (MAX_SESSIONS_PER_TENANT); "
                "delete one first.",
                cap=cap_mine,
            )


class _Capped(Protocol):
    quotas: SessionQuotas


S = TypeVar("S", bound=_Capped)
P = ParamSpec("P")


def capped(create: Callable[Concatenate[S, P], Awaitable[T]]) -> Callable[Concatenate[S, P], Awaitable[T]]:
    """Decorates `SessionService.create(self, *, tenant, image, ...)`: admitted by `self.quotas`."""

    @functools.wraps(create)
    async def admitted(service: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        image = kwargs.get("image")
        admit = service.quotas.admit(
            tenant=str(kwargs["tenant"]), image=image if isinstance(image, str) else None
        )
        async with admit:
            return await create(service, *args, **kwargs)

    return admitted
