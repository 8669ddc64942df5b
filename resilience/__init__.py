"""resilience: circuit breaker, retry, timeout, bulkhead, fallback and rate limiting for asyncio.

Every policy is an async decorator, an ``await policy.call(fn, ...)``, and can be stacked with
``Pipeline``. Breakers share their state through a store: ``MemoryStore`` in one process, or
``RedisStore`` across every replica of a service.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .clock import Clock, SystemClock
from .errors import (
    BulkheadFullError,
    CircuitOpenError,
    NoHealthyEndpointError,
    RateLimitedError,
    RejectedError,
    ResilienceError,
    ResilienceTimeoutError,
    StoreUnavailableError,
    ThrottledError,
    UnacceptableResultError,
)
from .events import (
    BatchCalled,
    CallFinished,
    CallRejected,
    Coalesced,
    ConfigChanged,
    Event,
    FallbackUsed,
    HealthChanged,
    Listener,
    RetryScheduled,
    StateChanged,
    StoreDataReset,
    StoreDegraded,
    StoreRecovered,
    SubscriberReplaced,
    TimedOut,
    select,
)
from .policies.base import Policy
from .policies.bulkhead import Bulkhead
from .policies.cache import FallbackCache, JSONSerializer, Serializer
from .policies.circuit import CircuitBreaker
from .policies.coalesce import Coalesce, request_scope
from .policies.collapse import Collapse
from .policies.fallback import Fallback
from .policies.health import HealthCheck, HealthResult
from .policies.hedge import Hedge
from .policies.permits import FleetLeases, FleetShare, PermitSource, shortest_lease
from .policies.pipeline import Pipeline
from .policies.ratelimit import RateLimiter
from .policies.retry import Retry, RetryBudget, RetryCallState
from .policies.throttle import Throttle
from .policies.timeout import Timeout
from .rules.breaker import BreakerMetrics
from .rules.detectors import PhiAccrualDetector, TimeoutDetector
from .rules.limits import AdaptiveLimit
from .rules.quantile import LearnedDelay
from .rules.windows import CountWindow, TimeWindow
from .states import CircuitState
from .store import MemoryStore, Store
from .store.config import ConfigChange, ConfigState, configure_from
from .store.protocol import status
from .store.records import LATENCY_BUCKETS, PolicyStatus, ReplicaReport
from .version import DISTRIBUTION, __version__

if TYPE_CHECKING:  # pragma: no cover
    from .store.redis import RedisStore as RedisStore
    from .telemetry import Telemetry as Telemetry


__all__ = [
    "DISTRIBUTION",
    "LATENCY_BUCKETS",
    "AdaptiveLimit",
    "BatchCalled",
    "BreakerMetrics",
    "Bulkhead",
    "BulkheadFullError",
    "CallFinished",
    "CallRejected",
    "CircuitBreaker",
    "CircuitOpenError",
    "CircuitState",
    "Clock",
    "Coalesce",
    "Coalesced",
    "Collapse",
    "ConfigChange",
    "ConfigChanged",
    "ConfigState",
    "CountWindow",
    "Event",
    "Fallback",
    "FallbackCache",
    "FallbackUsed",
    "FleetLeases",
    "FleetShare",
    "HealthChanged",
    "HealthCheck",
    "HealthResult",
    "Hedge",
    "JSONSerializer",
    "LearnedDelay",
    "Listener",
    "MemoryStore",
    "NoHealthyEndpointError",
    "PermitSource",
    "PhiAccrualDetector",
    "Pipeline",
    "Policy",
    "PolicyStatus",
    "RateLimitedError",
    "RateLimiter",
    "RejectedError",
    "ReplicaReport",
    "ResilienceError",
    "ResilienceTimeoutError",
    "Retry",
    "RetryBudget",
    "RetryCallState",
    "RetryScheduled",
    "Serializer",
    "StateChanged",
    "Store",
    "StoreDataReset",
    "StoreDegraded",
    "StoreRecovered",
    "StoreUnavailableError",
    "SubscriberReplaced",
    "SystemClock",
    "Throttle",
    "ThrottledError",
    "TimeWindow",
    "TimedOut",
    "Timeout",
    "TimeoutDetector",
    "UnacceptableResultError",
    "__version__",
    "configure_from",
    "request_scope",
    "select",
    "shortest_lease",
    "status",
]


def __getattr__(name: str) -> Any:
    """Load the parts with optional dependencies (``RedisStore``, ``Telemetry``) on demand."""
    if name == "RedisStore":
        from .store.redis import RedisStore

        return RedisStore
    if name == "Telemetry":
        from .telemetry import Telemetry

        return Telemetry
    raise AttributeError(f"module 'resilience' has no attribute {name!r}")
