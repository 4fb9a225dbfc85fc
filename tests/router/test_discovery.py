"""A gateway whose endpoint set changes while it serves (agora.cluster's replicas joining and leaving):
requests keep succeeding, new endpoints get traffic, and one that left gets none."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx

from agora.router.config import parse_config
from agora.router.endpoints import Endpoint, EndpointPool
from agora.router.gateway import Gateway
from tests.router.conftest import Procs


def test_pool_update_adds_and_drops_by_name() -> None:
    a, b = Endpoint("a", "http://127.0.0.1:1"), Endpoint("b", "http://127.0.0.1:2")
    pool = EndpointPool([a])
    left: list[str] = []
    pool.on_leave.append(lambda ep: left.append(ep.name))
    a.healthy = True
    joined, gone = pool.update([Endpoint("a", "http://127.0.0.1:1"), b])
    assert joined == [b] and gone == [] and pool.endpoints == [a, b] and a.healthy  # a kept as it was
    joined, gone = pool.update([b])
    assert joined == [] and gone == [a] and pool.endpoints == [b] and not a.healthy and left == ["a"]


async def test_endpoints_join_and_leave_while_serving(procs: Procs) -> None:
    a, b = procs.fake("a", tokens=3), procs.fake("b", tokens=3)
    current = [Endpoint("a", a.url)]

    async def discover() -> list[Endpoint]:
        return [Endpoint(ep.name, ep.url) for ep in current]

    config = parse_config({"gateway": {"scrape_interval_s": 0.05}, "profile": "round-robin"}, "test")
    gw = Gateway(config, [], discover=discover)
    await gw.startup()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw), base_url="http://gw") as client:

            async def burst(n: int) -> Counter[str]:
                body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
                rs = await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(n)))
                assert [r.status_code for r in rs] == [200] * n, [r.text for r in rs if r.status_code != 200]
                return Counter(r.headers["x-agora-endpoint"] for r in rs)

            assert await burst(4) == {"a": 4}
            current.append(Endpoint("b", b.url))
            await asyncio.sleep(0.3)  # a few discovery passes
            assert set(await burst(8)) == {"a", "b"}  # b joined and gets its share
            current.pop(0)
            await asyncio.sleep(0.3)
            assert await burst(6) == {"b": 6}  # a left: nothing more goes there
            assert [ep.name for ep in gw.pool] == ["b"]
    finally:
        await gw.shutdown()


def test_dns_endpoints_are_one_per_address(procs: Procs) -> None:
    import asyncio as aio

    from agora.router.endpoints import resolve_endpoints

    a = procs.fake("a", tokens=2)
    port = a.url.rsplit(":", 1)[1]
    found = aio.run(resolve_endpoints(f"http://localhost:{port}/v1", "engines", "k", ["m"]))
    assert "engines@127.0.0.1" in {ep.name for ep in found}
    assert all(ep.url.endswith(f":{port}/v1") and ep.api_key == "k" and ep.models == {"m"} for ep in found)
    # a gateway over a name: what a Kubernetes headless Service gives (deploy/k8s)
    gw = procs.gateway({"endpoints": [{"url": f"http://localhost:{port}", "discover": "dns"}]})
    r = httpx.post(f"{gw.url}/v1/chat/completions", timeout=10,
                   json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert r.status_code == 200 and r.headers["x-agora-endpoint"] == "localhost@127.0.0.1"
