"""Bad input, generated: policy configurations, policy names on a RedisStore, and malformed
deadline headers at the ASGI middleware."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from redis.crc import key_slot
from resilience.integrations.asgi import ResilienceMiddleware
from resilience.integrations.httpx import (
    BreakerOptions,
    BulkheadOptions,
    FallbackOptions,
    HealthCheckOptions,
    HedgeOptions,
    HttpPolicy,
    RateLimitOptions,
    ResilientTransport,
    RetryOptions,
    ThrottleOptions,
)

from resilience import (
    Bulkhead,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    CountWindow,
    Fallback,
    MemoryStore,
    Pipeline,
    RateLimiter,
    ResilienceError,
    Retry,
    RetryBudget,
    Throttle,
    Timeout,
    TimeWindow,
    select,
)
from resilience.policies.base import BasePolicy
from resilience.policies.circuit import LIVE
from resilience.store.redis import RedisStore

from .helpers import boom, ok

# anything a configuration file, an environment variable or a typo can produce
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**63, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 5e-324, 1e308]),
    st.text(max_size=5),
    st.binary(max_size=3),
    st.lists(st.integers(), max_size=2),
)


async def _fallback(request: Any, error: Exception) -> Any:
    """A fallback handler that answers nothing useful (never called here)."""


CONSTRUCTORS: dict[str, tuple[Callable[..., Any], dict[str, Any], list[str]]] = {
    "CircuitBreaker": (
        CircuitBreaker,
        {"name": "b"},
        ["name", *LIVE, "on", "ignore", "failure_if", "store", "clock", "listeners"],
    ),
    "CountWindow": (CountWindow, {"size": 10}, ["size"]),
    "TimeWindow": (TimeWindow, {"seconds": 10}, ["seconds", "buckets"]),
    "Retry": (
        Retry,
        {"on": ValueError},
        [
            "on",
            "attempts",
            "wait",
            "stop",
            "retry_if_result",
            "budget",
            "before_sleep",
            "name",
            "listeners",
        ],
    ),
    "RetryBudget": (
        RetryBudget,
        {"name": "budget"},
        ["name", "max_tokens", "token_ratio", "store"],
    ),
    "Timeout": (Timeout, {"seconds": 1.0}, ["seconds", "name", "clock", "listeners"]),
    "Bulkhead": (
        Bulkhead,
        {"max_concurrent": 2},
        ["max_concurrent", "max_waiting", "max_wait", "distributed", "store", "lease", "name"],
    ),
    "RateLimiter": (
        RateLimiter,
        {"rate": 10.0},
        ["rate", "per", "burst", "store", "name", "clock", "listeners"],
    ),
    "Throttle": (
        Throttle,
        {},
        ["k", "window", "buckets", "accepted_if", "random", "store", "sync_interval", "name"],
    ),
    "Fallback": (
        Fallback,
        {"on": ValueError, "value": 0},
        [
            "on",
            "handler",
            "result_if",
            "cache",
            "cache_key",
            "cache_ttl",
            "cache_refresh",
            "serializer",
            "name",
        ],
    ),
    "MemoryStore": (MemoryStore, {}, ["clock"]),
    "Pipeline": (
        lambda **kw: Pipeline(Timeout(1.0), **kw),
        {},
        ["name", "clock", "listeners"],
    ),
    "select": (
        lambda **kw: select(kw.pop("listener", print), **kw),
        {},
        ["listener", "events", "policies"],
    ),
    "HttpPolicy": (
        HttpPolicy,
        {},
        [
            "retry",
            "breaker",
            "timeout",
            "total_timeout",
            "failure_statuses",
            "idempotency_header",
            "rate_limit",
            "bulkhead",
            "throttle",
            "hedge",
            "health_check",
            "fallback",
            "store",
            "clock",
            "listeners",
        ],
    ),
    "RetryOptions": (
        RetryOptions,
        {},
        ["attempts", "wait", "retry_after_max", "budget", "methods"],
    ),
    "BreakerOptions": (
        BreakerOptions,
        {},
        ["failure_ratio", "minimum_calls", "window", "open_for", "open_for_max", "half_open_calls"],
    ),
    "RateLimitOptions": (RateLimitOptions, {"rate": 10.0}, ["rate", "per", "burst"]),
    "BulkheadOptions": (
        BulkheadOptions,
        {"max_concurrent": 2},
        ["max_concurrent", "max_waiting", "max_wait"],
    ),
    "ThrottleOptions": (ThrottleOptions, {}, ["k", "window"]),
    "HedgeOptions": (HedgeOptions, {}, ["delay", "max_hedges", "budget"]),
    "HealthCheckOptions": (HealthCheckOptions, {"path": "/healthz"}, ["path", "interval"]),
    "FallbackOptions": (FallbackOptions, {"handler": _fallback}, ["handler", "on"]),
    "ResilientTransport": (
        lambda **kw: ResilientTransport(kw.pop("transport", _MOCK), **kw),
        {},
        ["transport", "policy", "key", "deadline_header", "max_origins"],
    ),
    "ResilienceMiddleware": (
        lambda **kw: ResilienceMiddleware(kw.pop("app", _ok_app), **kw),
        {},
        [
            "max_concurrent",
            "max_waiting",
            "max_wait",
            "rate",
            "per",
            "burst",
            "timeout",
            "retry_after",
            "exclude",
            "overrides",
            "deadline_header",
            "max_deadline",
            "enforce_deadline",
            "store",
            "name",
        ],
    ),
}


def _answer(request: Any) -> Any:
    import httpx

    return httpx.Response(200)


def _mock() -> Any:
    import httpx

    return httpx.MockTransport(_answer)


_MOCK = _mock()


async def _ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@st.composite
def configurations(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A constructor and keyword arguments, some of them replaced by junk."""
    which = draw(st.sampled_from(sorted(CONSTRUCTORS)))
    _, base, params = CONSTRUCTORS[which]
    kwargs = dict(base)
    for name in draw(st.lists(st.sampled_from(params), max_size=4, unique=True)):
        kwargs[name] = draw(JUNK)
    return which, kwargs


@settings(max_examples=600, deadline=None)
@given(configurations())
@example(("Throttle", {"k": 10**400}))  # an int beyond any float
@example(("ThrottleOptions", {"k": 10**400}))
def test_any_configuration_constructs_or_raises_value_or_type_error(
    config: tuple[str, dict[str, Any]],
) -> None:
    """Every public constructor fed junk builds a working object or raises ValueError /
    TypeError; a policy that builds runs a call (its result, or one of its own errors)."""
    which, kwargs = config
    factory = CONSTRUCTORS[which][0]
    try:
        built = factory(**kwargs)
    except (ValueError, TypeError):
        return
    if isinstance(built, BasePolicy):
        asyncio.run(_works(built))


async def _one() -> int:
    return 1


async def _works(policy: BasePolicy) -> None:
    """One call through ``policy``: 1, or a rejection / timeout of the policy itself."""
    try:
        async with asyncio.timeout(5):
            assert await policy.call(_one) == 1 or isinstance(policy, Fallback)
    except ResilienceError:
        pass


@pytest.mark.parametrize("store", [False, 1, "redis://localhost"])
def test_breaker_with_a_non_store_raises_type_error(store: object) -> None:
    """CircuitBreaker(store=<not a store>) is a TypeError at construction, like every policy."""
    with pytest.raises(TypeError):
        CircuitBreaker("b", store=store)  # type: ignore[arg-type]


@pytest.mark.parametrize("option", ["timeout", "retry_after", "max_deadline"])
def test_middleware_huge_int_seconds_raise_value_error(option: str) -> None:
    """ResilienceMiddleware(timeout=10**400) is a ValueError, as in every policy."""
    with pytest.raises(ValueError, match=option):
        ResilienceMiddleware(_ok_app, **{option: 10**400})


@pytest.mark.parametrize("overrides", [True, 1, "/a", ["/a"]])
def test_middleware_overrides_not_a_mapping_raise_type_error(overrides: object) -> None:
    """ResilienceMiddleware(overrides=<not a mapping>) is a TypeError at construction."""
    with pytest.raises(TypeError):
        ResilienceMiddleware(_ok_app, overrides=overrides)  # type: ignore[arg-type]


def test_time_window_huge_int_seconds_raise_value_error() -> None:
    """TimeWindow(seconds=10**400) is a ValueError, like check_seconds everywhere else."""
    with pytest.raises(ValueError, match="seconds"):
        TimeWindow(10**400)


@settings(max_examples=200, deadline=None)
@given(
    prefix=JUNK | st.text(max_size=20),
    numbers=st.dictionaries(st.sampled_from(["sync_interval", "timeout", "ttl"]), JUNK),
)
def test_redis_store_options_construct_or_raise_value_or_type_error(
    prefix: Any, numbers: dict[str, Any]
) -> None:
    """RedisStore's own options fed junk: built, or ValueError / TypeError; nothing else."""
    client = aioredis.Redis()  # never connected: construction does no I/O
    try:
        RedisStore(client, prefix=prefix, **numbers)
    except (ValueError, TypeError):
        pass
    finally:
        asyncio.run(client.aclose())


# --- names on a RedisStore ---------------------------------------------------------------

NAMES = st.one_of(
    st.text(min_size=1, max_size=40),
    st.text(alphabet="{}:\n\r\t %*?[]\\ \x00", min_size=1, max_size=12),
    st.sampled_from(["{", "}", "{}", "}{", "a}{b", ":", "x:{y}:state", "%7B", "\U0001f600"]),
    st.text(min_size=1, max_size=3).map(lambda s: s * 3000),
)
TAG = re.compile(r"^soak-names:\{([^{}]*)\}:[a-z]+$")


def tag_of(key: str) -> str:
    """The hash tag of a key, checking the key's whole shape."""
    match = TAG.match(key)
    assert match, key
    return match.group(1)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(names=st.lists(NAMES, min_size=2, max_size=4, unique=True))
def test_any_breaker_name_works_in_one_hash_tag_without_collisions(
    redis_url: str, names: list[str]
) -> None:
    """Any name (braces, colons, newlines, NUL, 10,000 chars, emoji) works on a RedisStore:
    its keys share one hash tag (one slot), and tripping one name leaves the others closed."""

    async def check() -> None:
        async with RedisStore.from_url(redis_url, prefix="soak-names") as store:
            client = store.client
            await client.flushdb()
            breakers = [
                CircuitBreaker(n, store=store, window=CountWindow(4), minimum_calls=4)
                for n in names
            ]
            for b in breakers:
                await b.call(ok)
            await store.sync()
            tags = set()
            for n in names:
                keys = [store.key(n, s) for s in ("state", "win", "probes", "replicas")]
                assert len({tag_of(k) for k in keys}) == 1
                assert len({key_slot(k.encode()) for k in keys}) == 1
                tags.add(tag_of(keys[0]))
                assert await client.exists(keys[0]) == 1
            assert len(tags) == len(names)  # no two names share keys
            # trip the first name only
            first = breakers[0]
            for _ in range(2000):
                if first.state is CircuitState.OPEN:
                    break
                with pytest.raises((ValueError, CircuitOpenError)):
                    await first.call(boom)
                await asyncio.sleep(0.001)  # let the flusher run
            await store.sync()
            status = {s.name: s.state for s in await store.status() if s.kind == "circuit_breaker"}
            assert set(status) == set(names)
            assert status[names[0]] is CircuitState.OPEN
            assert all(status[n] is CircuitState.CLOSED for n in names[1:])
            assert all(b.state is CircuitState.CLOSED for b in breakers[1:])
            await client.flushdb()

    asyncio.run(check())


# --- malformed deadline headers at the ASGI middleware -------------------------------------

HEADER_VALUES = st.one_of(
    st.binary(max_size=30),
    st.text(max_size=20).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.sampled_from(
        [
            b"",
            b" ",
            b"NaN",
            b"nan",
            b"inf",
            b"-inf",
            b"1e3",
            b"-1",
            b"-0",
            b"0",
            b"0.0000001",
            b"9" * 400,
            b"-" + b"9" * 400,
            b"12ms",
            b"\xff\xfe",
            "\u00e9".encode("latin-1"),
            "\u20ac500".encode(),
            b"500\x00",
            b"1_000",
            b"+5",
            b"0x10",
        ]
    ),
    st.integers(min_value=-(2**70), max_value=2**70).map(lambda i: str(i).encode()),
    st.floats().map(lambda f: repr(f).encode()),
)


def _expected_spent(value: bytes) -> bool:
    """Whether `value` is a well-formed budget that is already spent (<= 0 ms)."""
    text = value.strip()
    return bool(re.fullmatch(rb"-?[0-9]{1,15}(?:\.[0-9]{1,6})?", text)) and float(text) <= 0


@settings(max_examples=300, deadline=None)
@given(values=st.lists(HEADER_VALUES, min_size=1, max_size=2), timeout=st.sampled_from([None, 5]))
def test_malformed_deadline_headers_never_crash_the_middleware(
    values: list[bytes], timeout: int | None
) -> None:
    """Garbage, huge, negative, NaN and non-latin-1 deadline headers: 200 (header ignored or
    budget left) or 504 (a well-formed spent budget); never an exception."""
    ran: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        ran.append(True)
        await _ok_app(scope, receive, send)

    middleware = ResilienceMiddleware(app, max_concurrent=4, rate=1e6, timeout=timeout)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "headers": [(b"x-deadline-ms", v) for v in values] + [(b"host", b"app")],
    }
    asyncio.run(middleware(scope, receive, send))
    status = sent[0]["status"]
    if _expected_spent(values[0]):  # the first deadline header is the one read
        assert status == 504
        assert not ran
    else:
        assert status == 200
        assert ran == [True]
    assert sent[-1]["type"] == "http.response.body"


def test_a_middleware_with_a_short_rate_period_takes_tokens_ahead_within_it() -> None:
    """A shared rate limit with a period shorter than the middleware's batch horizon builds
    (its limiter takes tokens ahead within the period) instead of refusing its own option."""

    ResilienceMiddleware(_ok_app, rate=1, per=0.01, store=MemoryStore(), name="svc")
