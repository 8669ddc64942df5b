"""The dashboard's live-settings endpoints: read, change, roll back, behind the token."""

from __future__ import annotations

import httpx
import pytest

from resilience import CircuitBreaker, MemoryStore, Timeout
from resilience.ops.dashboard import Dashboard

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def client(app: Dashboard) -> httpx.AsyncClient:
    """An HTTP client talking to ``app`` in process."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://dash")


async def test_read_change_and_roll_back() -> None:
    """GET shows version, values, base, history; POST changes; rollback goes back."""
    store = MemoryStore()
    breaker = CircuitBreaker("svc", store=store, open_for=5.0)
    timeout = Timeout(1.0, name="svc")
    async with client(Dashboard(store, allow_control=True, token=TOKEN)) as http:
        got = (await http.get("/api/config/svc")).json()
        assert (got["version"], got["values"], got["history"]) == (0, {}, [])
        assert got["base"]["timeout"] == {"seconds": 1.0}
        reply = await http.post(
            "/api/config/svc", json={"values": {"open_for": 9, "seconds": 0.5}}, headers=AUTH
        )
        assert reply.json() == {"name": "svc", "version": 1}
        assert (breaker.config.open_for, timeout.seconds) == (9, 0.5)
        got = (await http.get("/api/config/svc")).json()
        assert got["values"] == {"open_for": 9, "seconds": 0.5}
        assert got["history"][0]["origin"].startswith("dashboard on ")
        reply = await http.post("/api/config/svc/rollback", headers=AUTH)
        assert reply.json() == {"name": "svc", "version": 2}
        assert (breaker.config.open_for, timeout.seconds) == (5.0, 1.0)
        reply = await http.post("/api/config/svc/rollback", json={"version": 1}, headers=AUTH)
        assert reply.json()["version"] == 3
        assert timeout.seconds == 0.5


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"values": {"open_for": -1}}, "open_for must be finite and > 0, got -1"),
        ({"values": {"colour": "red"}}, "unknown setting 'colour'"),
        ({"values": {"origin": 9}}, "unknown setting 'origin'"),
        ({"values": {"open_for": 9, "max_concurrent": -1}}, "max_concurrent must be >= 1"),
        ({"values": {}}, 'send {"values": {"setting": value, ...}} as JSON'),
        ({"open_for": 3}, 'send {"values": {"setting": value, ...}} as JSON'),
    ],
)
async def test_a_bad_value_is_a_400_with_the_constructors_message(
    body: dict[str, object], error: str
) -> None:
    """A refused value (or a body of another shape) changes nothing and says why."""
    store = MemoryStore()
    breaker = CircuitBreaker("svc", store=store, open_for=5.0)
    async with client(Dashboard(store, allow_control=True, token=TOKEN)) as http:
        reply = await http.post("/api/config/svc", json=body, headers=AUTH)
        assert reply.status_code == 400
        assert error in reply.json()["error"]
        assert (await http.get("/api/config/svc")).json()["version"] == 0
    assert breaker.config.open_for == 5.0


async def test_changes_need_the_token() -> None:
    """Without control or without the token, POSTs are 403 and nothing changes."""
    store = MemoryStore()
    breaker = CircuitBreaker("svc", store=store, open_for=5.0)
    body = {"values": {"open_for": 9}}
    async with client(Dashboard(store)) as http:
        assert (await http.post("/api/config/svc", json=body, headers=AUTH)).status_code == 403
        assert (await http.get("/api/config/svc")).status_code == 200
    async with client(Dashboard(store, allow_control=True, token=TOKEN)) as http:
        assert (await http.post("/api/config/svc", json=body)).status_code == 403
        wrong = {"Authorization": "Bearer nope"}
        assert (await http.post("/api/config/svc/rollback", headers=wrong)).status_code == 403
    assert breaker.config.open_for == 5.0
