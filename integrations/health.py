"""``http_check``: a health check that GETs a URL with httpx.

::

    check = HealthCheck(http_check("http://inventory:8080/healthz"), name="inventory")

The returned coroutine function raises unless the status is expected, so a ``HealthCheck``
counts it as a failure; a transport error (refused, reset, DNS) fails it the same way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Container

from ._deadline import missing_extra

try:
    import httpx
except ImportError as exc:  # pragma: no cover - tested in a fresh interpreter
    raise ImportError(missing_extra("health", "httpx")) from exc

__all__ = ["http_check"]


def http_check(
    url: str | httpx.URL,
    *,
    client: httpx.AsyncClient | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    expect: Container[int] = range(200, 300),
) -> Callable[[], Awaitable[None]]:
    """An async callable that GETs ``url`` and raises ``httpx.HTTPStatusError`` unless the
    response's status is in ``expect`` (default: any 2xx).

    With ``client`` the request goes through that ``httpx.AsyncClient`` (its connection pool,
    headers, TLS settings and transport); with ``transport`` it is handed straight to that
    ``httpx.AsyncBaseTransport`` (its pool; the response is closed, its body unread).
    Closing either stays the caller's business. With neither, each run opens and closes a
    client of its own, so nothing is left open. The run's time limit is the
    ``HealthCheck``'s ``timeout``.
    """
    if not isinstance(url, (str, httpx.URL)) or not str(url):
        raise TypeError(f"url must be a non-empty str or httpx.URL, got {url!r}")
    target = http_url(url, "url")
    if client is not None and not isinstance(client, httpx.AsyncClient):
        raise TypeError(f"client must be an httpx.AsyncClient, got {client!r}")
    if transport is not None and not isinstance(transport, httpx.AsyncBaseTransport):
        raise TypeError(f"transport must be an httpx.AsyncBaseTransport, got {transport!r}")
    if client is not None and transport is not None:
        raise ValueError("give http_check a client or a transport, not both")
    if isinstance(expect, int) or not isinstance(expect, Container):
        raise TypeError(f"expect must be a container of status codes, got {expect!r}")

    def judge(response: httpx.Response) -> None:
        if response.status_code not in expect:
            raise httpx.HTTPStatusError(
                f"health check of {target} answered {response.status_code}",
                request=response.request,
                response=response,
            )

    async def check() -> None:
        if transport is not None:
            response = await transport.handle_async_request(httpx.Request("GET", target))
            try:
                judge(response)
            finally:
                await response.aclose()
        elif client is not None:
            judge(await client.get(target))
        else:
            async with httpx.AsyncClient() as own:
                judge(await own.get(target))

    check.__qualname__ = check.__name__ = f"http_check({str(target)!r})"
    return check


def http_url(value: str | httpx.URL, what: str) -> httpx.URL:
    """``value`` as an ``http://`` or ``https://`` URL with a host and, if it names one, a
    port a socket can have; else a ``ValueError`` naming ``what`` and the value."""
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL as exc:
        raise ValueError(
            f"{what} must be an http:// or https:// URL, got {value!r}: {exc}"
        ) from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{what} must be an http:// or https:// URL, got {value!r}")
    if url.port is not None and not 1 <= url.port <= 65535:
        raise ValueError(f"{what}'s port must be in 1..65535, got {value!r}")
    return url
