"""Several keys and base URLs behind one provider: weighted least-in-flight choice, a
cool-down per key, and keys that rotate without a restart.

A provider entry may list `deployments` (LLM_GATEWAY_PROVIDERS[name].deployments): each an
`id` (what usage, spans and metrics name; never the key), an optional `base_url` (another
endpoint or region of the same API), its key and a `weight`. Without the list the provider
is one deployment, id `default`, from its own base URL and key.

Choice, per attempt: among the deployments not cooling down, those with the fewest requests
in flight per unit of weight; among them, smooth weighted round-robin (nginx's), so that
sequential traffic splits exactly by weight and concurrent traffic goes where it waits least. A deployment that answered 429 cools down for its Retry-After
(else LLM_GATEWAY_KEY_RATE_LIMIT_COOLDOWN_S); one that answered 401/403 for
LLM_GATEWAY_KEY_AUTH_COOLDOWN_S, unless its key file changed meanwhile (then the new key
is used at once). The others are not affected, and the retry goes to one of them without
waiting for the cooled key's Retry-After. When every deployment cools down, the one whose
cool-down ends first is tried (the provider's answer, not the gateway, then decides).

Keys from `api_key_file` are re-read when the file changes (checked at most once a second,
and at once after a 401/403): rotating a mounted Secret needs no restart. Keys from an
environment variable or inline are read at start.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.llm_gateway import metrics

log = logging.getLogger(__name__)

DEFAULT_ID = "default"
_STAT_EVERY_S = 1.0


class KeySource:
    """A provider key: fixed (inline or from the environment), or read from a file and read
    again when the file changes."""

    def __init__(
        self,
        value: str | None = None,
        path: Path | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._value = value
        self._clock = clock
        self._mtime: int | None = None
        self._checked = 0.0
        if path is not None:
            self._read(force=True)

    def current(self) -> str | None:
        if self.path is not None and self._clock() - self._checked >= _STAT_EVERY_S:
            self._read()
        return self._value

    def refresh(self) -> bool:
        """Check the file now; True when the key changed."""
        if self.path is None:
            return False
        before = self._value
        self._read()
        return self._value != before

    def _read(self, *, force: bool = False) -> None:
        assert self.path is not None
        self._checked = self._clock()
        try:
            mtime = os.stat(self.path).st_mtime_ns
            if mtime == self._mtime and not force:
                return
            text = self.path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            if force:
                raise
            # A rotation in progress (the file replaced under us): keep the last key.
            log.warning(
                "provider key file unreadable; keeping the last key",
                extra={"path": str(self.path), "error": exc.strerror},
            )
            return
        changed = self._mtime is not None and (text or None) != self._value
        self._value, self._mtime = text or None, mtime
        if changed:
            log.info("provider key reloaded", extra={"path": str(self.path)})


@dataclass(frozen=True)
class Deployment:
    """One key (and base URL) of a provider, as configured."""

    id: str
    base_url: str
    key: KeySource
    weight: int = 1


@dataclass
class Slot:
    """A deployment's live state in one gateway replica."""

    deployment: Deployment
    in_flight: int = 0
    cool_until: float = 0.0
    current: int = 0  # smooth weighted round-robin credit

    @property
    def id(self) -> str:
        return self.deployment.id


class Balancer:
    """Picks the deployment of each attempt and cools down the ones that were refused."""

    def __init__(
        self,
        provider: str,
        slots: Sequence[Slot],
        *,
        rate_limit_cooldown_s: float,
        auth_cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.provider = provider
        self.slots = list(slots)
        self.rate_limit_cooldown_s = rate_limit_cooldown_s
        self.auth_cooldown_s = auth_cooldown_s
        self._clock = clock

    def pick(self) -> Slot:
        slots = self.slots
        if len(slots) == 1:
            return slots[0]
        now = self._clock()
        ready = [s for s in slots if s.cool_until <= now]
        if not ready:  # every deployment cools down: the one that is back first
            return min(slots, key=lambda s: s.cool_until)
        least = min(s.in_flight / s.deployment.weight for s in ready)
        eligible = [s for s in ready if s.in_flight / s.deployment.weight <= least]
        if len(eligible) == 1:
            return eligible[0]
        total = 0
        best = eligible[0]
        for slot in eligible:
            slot.current += slot.deployment.weight
            total += slot.deployment.weight
            if slot.current > best.current:
                best = slot
        best.current -= total
        return best

    def refused(self, slot: Slot, status: int, retry_after: float | None) -> bool:
        """Cool `slot` down after a 429/401/403; True when another deployment can take the
        retry now (the cooled key's Retry-After then does not delay it)."""
        if status == 429:
            seconds, reason = (
                (retry_after if retry_after is not None else self.rate_limit_cooldown_s),
                "rate_limited",
            )
        elif status in (401, 403):
            if slot.deployment.key.refresh():
                return True  # rotated: the new key is tried at once, on this deployment
            seconds, reason = self.auth_cooldown_s, "auth"
        else:
            return False
        if seconds > 0:
            slot.cool_until = self._clock() + seconds
            metrics.child(metrics.KEY_COOLDOWNS, self.provider, slot.id, reason).inc()
            log.warning(
                "provider key cooling down",
                extra={
                    "provider": self.provider,
                    "key_id": slot.id,
                    "status": status,
                    "cooldown_s": round(seconds, 3),
                },
            )
        now = self._clock()
        return any(s.cool_until <= now for s in self.slots if s is not slot)

    def cooling(self) -> list[str]:
        now = self._clock()
        return [s.id for s in self.slots if s.cool_until > now]
