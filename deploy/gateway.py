"""The SuperLink's public address: a TLS gateway that forwards the Fleet API and nothing else.

Flower 1.42's ``flower-superlink`` serves all of its HTTP APIs on ONE address (``--host``/``--port``): the
Fleet API (SuperNodes), the Control API (``flwr run``, ``flwr ls``, ``flwr supernode register``) and the
Runtime API (the ServerApp). ``--control-api-address`` and ``--fleet-api-address`` are deprecated and bind
nothing, and the Control API has no authentication outside Flower Enterprise. A SuperLink bound to a public
address therefore lets anyone holding the public ``ca.crt`` register a key of their own and join as a site.

So radfed binds the SuperLink to 127.0.0.1 and puts this gateway on the public address. It terminates TLS
with the SuperLink's certificate and forwards ``POST /v1/fleet/*`` (each call is node-authenticated by the
SuperLink itself) to the SuperLink over TLS, except the Fleet API's own ``register-node`` and
``unregister-node`` (registration is the coordinator's, over the local Control API). Every other request is
answered 404 and logged. While the SuperLink is down (a restart) the gateway answers 503, which SuperNodes
retry.

    python -m deploy.gateway --listen-host 0.0.0.0 --listen-port 9092 --upstream 127.0.0.1:41234 \\
        --ca pki/ca.crt --cert pki/server.crt --key pki/server.key
"""

from __future__ import annotations

import argparse
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import httpx
import uvicorn

log = logging.getLogger("radfed.gateway")

FLEET_PREFIX = "/v1/fleet/"
# Fleet routes a node-authenticated SuperNode never needs; refused here as well as by Flower (which
# rejects them while --enable-supernode-auth is on), so registration can only happen over the Control API.
REFUSED_FLEET = frozenset({"/v1/fleet/register-node", "/v1/fleet/unregister-node"})
# hop-by-hop headers (RFC 9110 7.6.1) and the ones httpx/uvicorn set for their own connection
REQUEST_DROP = frozenset({b"host", b"content-length", b"connection", b"keep-alive", b"proxy-authorization",
                          b"te", b"trailer", b"transfer-encoding", b"upgrade"})
RESPONSE_DROP = frozenset({"connection", "keep-alive", "proxy-authenticate", "te", "trailer",
                           "transfer-encoding", "upgrade"})

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def forwarded(method: str, path: str) -> bool:
    """Whether the public address forwards this request to the SuperLink."""
    return method == "POST" and path.startswith(FLEET_PREFIX) and path not in REFUSED_FLEET


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class FleetGateway:
    """ASGI app: forward the Fleet API to ``upstream`` (host:port of the SuperLink, TLS with ``ca``)."""

    def __init__(self, upstream: str, ca: str, timeout: float = 300.0) -> None:
        self.base = f"https://{upstream}"
        self.ca = ca
        self.timeout = timeout
        self.client: httpx.AsyncClient | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                context = ssl.create_default_context(cafile=self.ca)
                self.client = httpx.AsyncClient(verify=context, timeout=httpx.Timeout(self.timeout, connect=5.0),
                                                follow_redirects=False)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    @staticmethod
    async def _reply(send: Send, status: int, detail: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), *(extra or [])]})
        await send({"type": "http.response.body", "body": body})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        client = scope.get("client") or ("?", 0)
        if not forwarded(method, path):
            log.warning("refused %s %s from %s:%s: only the Fleet API is served on this address", method, path,
                        *client)
            await self._reply(send, 404, "not served on the SuperLink's public address: it forwards the Fleet "
                                         "API only; the Control API is local to the coordinator")
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in REQUEST_DROP]
        query = f"?{scope['query_string'].decode()}" if scope.get("query_string") else ""
        assert self.client is not None
        request = self.client.build_request(method, f"{self.base}{path}{query}", headers=headers,
                                            content=b"".join(chunks))
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TransportError as exc:
            # the SuperLink is down or restarting: 503 is what SuperNodes retry
            log.warning("SuperLink %s unreachable (%s) for %s", self.base, type(exc).__name__, path)
            await self._reply(send, 503, "the SuperLink is not reachable (restarting?); retry",
                              [(b"retry-after", b"5")])
            return
        try:
            out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.multi_items()
                   if k.lower() not in RESPONSE_DROP]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.gateway", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen-host", required=True, help="the public address SuperNodes connect to")
    parser.add_argument("--listen-port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the SuperLink's own (local) host:port")
    parser.add_argument("--ca", required=True, help="CA that signed the SuperLink's certificate")
    parser.add_argument("--cert", required=True, help="TLS certificate served on the public address")
    parser.add_argument("--key", required=True, help="its private key")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per forwarded call otherwise
    log.info("Fleet gateway on %s -> SuperLink %s (Fleet API only)",
             host_port(args.listen_host, args.listen_port), args.upstream)
    uvicorn.run(FleetGateway(args.upstream, args.ca), host=args.listen_host, port=args.listen_port,
                ssl_certfile=args.cert, ssl_keyfile=args.key, access_log=False, server_header=False,
                date_header=False, log_level="info", lifespan="on")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
