"""Retention: what is purged when, for every tenant, now (PurgeExpired) and periodically.

- Facts: deleted once `expires_at` has passed (Recall hides them from that instant, purge
  frees the rows), and when older than their kind's max age (MEMORY_FACT_RETENTION_DAYS
  and tenant overrides; applied as an expiry when a fact is written, and by the purge to
  facts written before the policy changed).
- Messages: deleted when older than the tenant's message retention; a session whose
  messages are all gone is deleted too. Their cached windows are dropped.
- Audit entries: deleted when older than the audit retention.

A purge runs at start-up and then every MEMORY_PURGE_INTERVAL_S, on every replica; on
PostgreSQL the purges of several replicas take turns (the store serialises them).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress

from libs.common import context
from services.memory import metrics
from services.memory.config import MemorySettings
from services.memory.hot_tier import HotTier
from services.memory.models import AuditRecord, PurgeCounts, now_us
from services.memory.recall_index import RecallIndex
from services.memory.store import MemoryStore

log = logging.getLogger(__name__)
SYSTEM_CALLER = "memory-retention"


class Purger:
    def __init__(
        self,
        settings: MemorySettings,
        store: MemoryStore,
        hot: HotTier,
        index: RecallIndex | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.hot = hot
        self.index = index
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def run_once(self, audit: AuditRecord | None = None) -> PurgeCounts:
        async with self._lock:  # the background run and PurgeExpired never overlap
            if audit is None:
                audit = AuditRecord(
                    tenant="*", caller=SYSTEM_CALLER, key_id="", rpc="purge", user_id=None
                )
            tenants = await self.store.retention_tenants()
            policies = {}
            for tenant in {*tenants, *self.settings.memory_tenant_retention}:
                p = self.settings.retention_for(tenant)
                policies[tenant] = (p.message_days, p.audit_days, p.fact_days)
            try:
                counts = await self.store.purge(policies, now_us(), audit)
            except BaseException:
                if self.index is not None:
                    self.index.clear()
                raise
            if self.index is not None and counts.facts_by_age:
                # Any user's, and rare (a retention policy got stricter): drop every cached
                # recall index. Facts that merely expired were ignored by recall already.
                # (Other replicas see the users' facts versions reset.)
                self.index.clear()
            await self.hot.invalidate(counts.touched_sessions)
        for kind, n in (
            ("facts", counts.facts),
            ("messages", counts.messages),
            ("sessions", counts.sessions),
            ("audit_entries", counts.audit_entries),
        ):
            metrics.PURGED.labels(kind).inc(n)
        log.info(
            "retention purge done",
            extra={
                "facts": counts.facts,
                "messages": counts.messages,
                "sessions": counts.sessions,
                "audit_entries": counts.audit_entries,
            },
        )
        return counts

    async def run_for_caller(self) -> PurgeCounts:
        ident = context.current_identity()
        return await self.run_once(
            AuditRecord(
                tenant=ident.tenant,
                caller=ident.caller,
                key_id=ident.key_id,
                rpc="PurgeExpired",
                user_id=None,
            )
        )

    def start(self) -> None:
        if self.settings.memory_purge_interval_s > 0:
            self._task = asyncio.create_task(self._loop(), name="memory-retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # the next run retries; a failed purge must not stop the loop
                log.exception("retention purge failed")
            await asyncio.sleep(self.settings.memory_purge_interval_s)
