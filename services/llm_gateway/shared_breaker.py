"""A provider's circuit shared by every gateway replica, through Redis.

Each replica keeps its own pybreaker circuit (breaker.py): it decides alone while Redis is
away, and it is the fast path always: no request waits for Redis (the half-open trial lease
below aside). On top of it:

* Every counted failure is added to a per-provider counter in Redis, and a success resets
  it, by a small Lua script sent off the request path: reports are coalesced per provider
  (at most one round trip in flight; what arrives meanwhile goes in the next one), and a
  success costs nothing unless this replica reported a failure since its last success or
  its last poll saw the shared counter above zero. The script that takes the counter to
  the threshold opens the shared circuit: `open` key with TTL = the reset timeout.
* A poll every `LLM_GATEWAY_SHARED_BREAKER_POLL_S` reads every provider's keys in one
  pipelined round trip. A replica that sees a circuit newly open opens its local breaker
  too (so it stays open should Redis go away next) and refuses calls while the key lives.
* When the `open` key expires the circuit is half-open for every replica (`tripped` still
  exists). One replica makes the trial: the first call a replica gets then asks Redis for
  the `trial` lease (SET NX, one round trip; the only Redis call ever awaited on the request
  path, and only in this state), and the replica that gets it lets that call through; the
  others refuse until the verdict. The trial's success deletes the keys (closed for all:
  each replica's poll closes its local breaker); its failure sets `open` again (re-opened
  for all). A trial ended by a cancellation or the caller's deadline releases the lease
  with no verdict.
* Redis unreachable or slow: the poll marks every shared state unknown, reports are
  dropped until a poll succeeds, each replica decides on its local breaker alone. Nothing
  is raised to a caller; `llm_gateway_shared_breaker_redis_errors_total` counts the failed
  operations and one log line per 10 s says why.

Keys (hash tag = the provider, so one script's keys share a Redis Cluster slot):

    llm:breaker:{deepseek}:failures  failures across replicas since the last success
                                     (expires `LLM_GATEWAY_SHARED_BREAKER_WINDOW_S` after
                                     the last failure)
    llm:breaker:{deepseek}:open      exists while open (TTL = LLM_GATEWAY_BREAKER_RESET_S)
    llm:breaker:{deepseek}:tripped   from opening until a trial succeeds (TTL = 3 x reset):
                                     `tripped` without `open` = half-open
    llm:breaker:{deepseek}:trial     the half-open trial lease (value: the replica's id)
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Coroutine
from typing import Any, Literal

import pybreaker
from redis.asyncio import Redis
from redis.exceptions import RedisError

from libs.common.dbspans import redis_spans
from libs.common.logging import ThrottledLog
from services.llm_gateway import metrics

log = logging.getLogger(__name__)
redis_down_log = ThrottledLog(log)

State = Literal["closed", "open", "half-open"]
_STATE_VALUE = {"closed": 0, "open": 1, "half-open": 2}
_NONE, _CLOSE, _OPEN = 0, 1, 2  # events of a report
_TRIPPED_RESETS = 3  # `tripped` lives this many reset timeouts: a trial must come by then

# KEYS: failures, open, tripped, trial.
# ARGV: event (0 none, 1 close: a trial succeeded, 2 open: a trial failed), reset counter
#       (0/1), failures to add, threshold, window ms, open ms, tripped ms, replica id.
# Returns {failures counted, 1 when this report opened the circuit}.
_REPORT_LUA = """
local event = tonumber(ARGV[1])
if event == 1 then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
elseif event == 2 then
  redis.call('SET', KEYS[2], ARGV[8], 'PX', ARGV[6])
  redis.call('SET', KEYS[3], ARGV[8], 'PX', ARGV[7])
  redis.call('DEL', KEYS[1], KEYS[4])
end
if ARGV[2] == '1' then
  redis.call('DEL', KEYS[1])
end
local n = tonumber(ARGV[3])
if n == 0 then
  return {0, 0}
end
local count = redis.call('INCRBY', KEYS[1], n)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if count >= tonumber(ARGV[4]) and redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('SET', KEYS[2], ARGV[8], 'PX', ARGV[6])
  redis.call('SET', KEYS[3], ARGV[8], 'PX', ARGV[7])
  redis.call('DEL', KEYS[1])
  return {count, 1}
end
return {count, 0}
"""

# KEYS: open, tripped, trial. ARGV: replica id, lease ms.
# Returns {1 lease taken | 0 another replica's trial | 2 closed | 3 still open, open ms}.
_TRIAL_LUA = """
local open_ms = redis.call('PTTL', KEYS[1])
if open_ms > 0 then
  return {3, open_ms}
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  return {2, 0}
end
if redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, 0}
end
return {0, 0}
"""

# KEYS: trial. ARGV: replica id. Releases the lease if this replica holds it.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


NORMAL, TRIAL, ASK = 0, 1, 2  # what `SharedCircuit.admit` decides


def breaker_key(provider: str, part: str) -> str:
    return f"llm:breaker:{{{provider}}}:{part}"


class SharedOpen(Exception):
    """The shared state refused the call; `retry_after` = seconds until it may pass."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("shared circuit open")
        self.retry_after = retry_after


class SharedCircuit:
    """One provider's shared state as this replica last saw it, and its pending report.

    Runs on the request path without waiting, except `take_trial` (half-open only) and
    `_flush` (a background task)."""

    def __init__(
        self, hub: SharedBreakers, provider: str, *, fail_max: int, reset_s: float
    ) -> None:
        self.hub = hub
        self.provider = provider
        self.fail_max = fail_max
        self.reset_s = reset_s
        self.keys = [breaker_key(provider, p) for p in ("failures", "open", "tripped", "trial")]
        self.local: pybreaker.CircuitBreaker | None = None  # bound by ProviderBreaker
        self.state: State | None = None  # None: unknown (not polled yet, Redis unreachable)
        self.failures = 0  # the shared counter at the last poll or report
        self.open_until = 0.0  # monotonic; while state == "open"
        self.trial_lease = False  # this replica holds the half-open trial lease
        self.trial_running = False  # ...and its trial call is in flight
        self.asking = False  # a trial lease request of this replica is in flight
        self.changed_at = 0.0  # monotonic time of the last change made here (polls older lose)
        self._dirty = False  # a failure reported since this replica's last success
        self._event = _NONE
        self._reset = False
        self._pending = 0
        self._flushing = False
        metrics.SHARED_BREAKER_STATE.labels(provider).set(-1)

    # -- the request path ---------------------------------------------------------------------
    def admit(self) -> int:
        """NORMAL, TRIAL (this call is the half-open trial), ASK (half-open: the trial lease
        must be asked for, `take_trial`), or raise SharedOpen."""
        state = self.state
        if state is None or state == "closed":
            return NORMAL
        now = time.monotonic()
        if state == "open" and now < self.open_until:
            raise SharedOpen(self.open_until - now)
        if self.trial_lease:
            if self.trial_running:
                raise SharedOpen(self.hub.poll_s)
            self.trial_running = True
            return TRIAL
        if self.asking:  # one lease request per replica at a time
            raise SharedOpen(self.hub.poll_s)
        return ASK

    async def take_trial(self) -> int:
        """Ask for the trial lease: TRIAL (this call makes it), NORMAL (closed meanwhile, or
        Redis unreachable: the local breaker decides), or raise SharedOpen."""
        self.asking = True
        try:
            code, open_ms = await self.hub.take_trial(self)
        except (RedisError, OSError) as exc:
            self.hub.failed("trial", exc)
            return NORMAL
        finally:
            self.asking = False
        now = time.monotonic()
        if code == 1:
            self.won_trial()
            self.trial_running = True
            return TRIAL
        if code == 2:
            self.changed_at = now
            self.closed()
            return NORMAL
        if code == 3:
            self.open_until = now + open_ms / 1000
            raise SharedOpen(open_ms / 1000)
        raise SharedOpen(self.hub.poll_s)

    def succeeded(self, trial: bool) -> None:
        if trial:
            self._settle(_CLOSE, "closed")
            self.failures = 0
        elif self._dirty or self.failures:
            self._dirty = False
            self.failures = 0
            self._reset, self._pending = True, 0
            self._kick()

    def failed(self, trial: bool) -> None:
        if trial:
            self._settle(_OPEN, "open")
            self.open_until = time.monotonic() + self.reset_s
            metrics.SHARED_BREAKER_OPENS.labels(self.provider, "this_replica").inc()
        else:
            self._dirty = True
            self._pending += 1
            self._kick()

    def abandoned(self, trial: bool) -> None:
        """A cancelled call or one ended by the caller's deadline: no verdict."""
        if trial:
            self.trial_running = self.trial_lease = False
            self.hub.spawn(self.hub.release(self))

    def _settle(self, event: int, state: State) -> None:
        self.trial_running = self.trial_lease = False
        self._set_state(state)
        self.changed_at = time.monotonic()
        self._event, self._reset, self._pending = event, False, 0
        self._kick()

    def _set_state(self, state: State | None) -> None:
        self.state = state
        metrics.SHARED_BREAKER_STATE.labels(self.provider).set(
            -1 if state is None else _STATE_VALUE[state]
        )

    def _kick(self) -> None:
        if self.hub.down:
            self._event, self._reset, self._pending = _NONE, False, 0
            return
        if not self._flushing:
            self._flushing = True
            self.hub.spawn(self._flush())

    # -- off the request path ---------------------------------------------------------------
    async def _flush(self) -> None:
        try:
            while self._event or self._reset or self._pending:
                event, reset, pending = self._event, self._reset, self._pending
                self._event, self._reset, self._pending = _NONE, False, 0
                sent = time.monotonic()
                try:
                    count, opened = await self.hub.report(self, event, reset, pending)
                except (RedisError, OSError) as exc:
                    self.hub.failed("report", exc)
                    self._event, self._reset, self._pending = _NONE, False, 0
                    return
                if pending:
                    self.failures = int(count)
                if opened and self.state != "open":
                    self.changed_at = sent
                    self.opened(self.reset_s, "this_replica")
        finally:
            self._flushing = False

    def opened(self, ttl_s: float, source: str) -> None:
        """The shared circuit is open (for `ttl_s` more seconds): refuse, open locally."""
        self._set_state("open")
        self.open_until = time.monotonic() + ttl_s
        self.trial_lease = self.trial_running = False
        self.failures = 0
        metrics.SHARED_BREAKER_OPENS.labels(self.provider, source).inc()
        if self.local is not None and self.local.current_state != "open":
            self.local.open()

    def observe(
        self, polled_at: float, open_ms: int, tripped_ms: int, failures: Any, holder: Any
    ) -> None:
        """Apply one poll's reading (ignored if this replica changed the state since)."""
        if polled_at < self.changed_at:
            return
        before = self.state
        self.failures = int(failures or 0)
        self.trial_lease = holder is not None and holder == self.hub.replica_id.encode()
        if not self.trial_lease:
            self.trial_running = False
        if open_ms > 0 or open_ms == -1:
            if before != "open":
                self.opened(max(open_ms, 0) / 1000 or self.reset_s, "other_replica")
            else:
                self.open_until = time.monotonic() + max(open_ms, 0) / 1000
        elif tripped_ms > 0 or tripped_ms == -1:
            self._set_state("half-open")
        elif before in ("open", "half-open"):
            self.closed()
        else:
            self._set_state("closed")

    def closed(self) -> None:
        """Closed for every replica (another one's trial succeeded): close locally too."""
        self._set_state("closed")
        self.trial_lease = self.trial_running = False
        if self.local is not None and self.local.current_state != "closed":
            self.local.close()

    def won_trial(self) -> None:
        """This replica holds the lease: the asking call is the trial (local breaker too)."""
        self.trial_lease = True
        if self.local is not None and self.local.current_state == "open":
            self.local.half_open()

    def lost(self) -> None:
        self._set_state(None)
        self.trial_lease = self.trial_running = False
        self._event, self._reset, self._pending = _NONE, False, 0


class SharedBreakers:
    """The replica's side of the shared circuits: the poll loop and the Redis calls."""

    def __init__(self, redis: Redis, *, poll_s: float, window_s: float) -> None:
        self.redis = redis
        self.poll_s = poll_s
        self.window_ms = max(1, int(window_s * 1000))
        self.replica_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.circuits: dict[str, SharedCircuit] = {}
        self.down = False  # the last Redis operation failed; reset by a good poll
        self._report = redis.register_script(_REPORT_LUA)
        self._trial = redis.register_script(_TRIAL_LUA)
        self._release = redis.register_script(_RELEASE_LUA)
        self._spans = redis_spans(redis)
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def circuit(self, provider: str, *, fail_max: int, reset_s: float) -> SharedCircuit:
        found = self.circuits[provider] = SharedCircuit(
            self, provider, fail_max=fail_max, reset_s=reset_s
        )
        return found

    def start(self) -> None:
        if self._task is None and self.circuits:
            self._task = asyncio.create_task(self._run(), name="shared-breaker-poll")

    async def aclose(self) -> None:
        tasks = [t for t in (self._task, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception:  # a bug must not stop the polling for the process's life
                log.exception("shared breaker: poll failed")
            await asyncio.sleep(self.poll_s)

    async def drain(self) -> None:
        """Wait for the reports and lease releases in flight (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def poll(self) -> None:
        """Read every circuit's keys in one round trip and apply what changed."""
        circuits = list(self.circuits.values())
        started = time.monotonic()
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for c in circuits:
                    failures, open_, tripped, trial = c.keys
                    pipe.pttl(open_)
                    pipe.pttl(tripped)
                    pipe.get(failures)
                    pipe.get(trial)
                replies = await pipe.execute()
        except (RedisError, OSError) as exc:
            self.failed("poll", exc)
            return
        if self.down:
            self.down = False
            log.info("shared breaker: redis reachable again")
        for i, c in enumerate(circuits):
            open_ms, tripped_ms, failures, holder = replies[4 * i : 4 * i + 4]
            c.observe(started, int(open_ms), int(tripped_ms), failures, holder)

    async def report(
        self, c: SharedCircuit, event: int, reset: bool, failures: int
    ) -> tuple[int, int]:
        reset_ms = max(1, int(c.reset_s * 1000))
        count, opened = await self._report(
            keys=c.keys,
            args=[
                event,
                int(reset),
                failures,
                c.fail_max,
                self.window_ms,
                reset_ms,
                reset_ms * _TRIPPED_RESETS,
                self.replica_id,
            ],
        )
        return int(count), int(opened)

    async def take_trial(self, c: SharedCircuit) -> tuple[int, int]:
        _, open_, tripped, trial = c.keys
        lease_ms = max(1, int(c.reset_s * 1000))
        with self._spans.span("llm.breaker.trial", "EVALSHA"):  # awaited by the request
            code, open_ms = await self._trial(
                keys=[open_, tripped, trial], args=[self.replica_id, lease_ms]
            )
        return int(code), int(open_ms)

    async def release(self, c: SharedCircuit) -> None:
        try:
            await self._release(keys=[c.keys[3]], args=[self.replica_id])
        except (RedisError, OSError) as exc:
            self.failed("trial", exc)

    def failed(self, operation: str, exc: BaseException) -> None:
        """A Redis operation failed: every shared state unknown, local breakers decide."""
        metrics.SHARED_BREAKER_REDIS_ERRORS.labels(operation).inc()
        redis_down_log.warning(
            "shared breaker: redis unavailable, each provider's local breaker decides alone",
            extra={"operation": operation, "error": type(exc).__name__},
        )
        self.down = True
        for c in self.circuits.values():
            c.lost()
