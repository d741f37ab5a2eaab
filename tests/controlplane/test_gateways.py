"""The gateways call: the environment's revision and its live workers."""

from __future__ import annotations

from gateway.store import Store, WorkerInfo
from tests.controlplane.conftest import Client, call


async def test_gateways_lists_live_workers_with_rfc3339_last_seen(
    api: Client, store: Store
) -> None:
    await call(api, "PUT", "/environments/dev", {"gateway_url": "http://g"})
    assert await call(api, "GET", "/environments/dev/gateways") == (
        200,
        {"revision": 0, "workers": []},
    )

    await store.commit("dev", records={"probe/x": b"1"})
    for name, revision in (("w2", 1), ("w1", 0)):
        info = WorkerInfo(
            id=name, host="h", pid=7, revision=revision, last_seen=1796328861.5
        )
        await store.heartbeat("dev", info, 30)

    status, answer = await call(api, "GET", "/environments/dev/gateways")
    assert status == 200
    assert answer["revision"] == 1
    assert [w["id"] for w in answer["workers"]] == ["w1", "w2"]
    assert answer["workers"][1] == {
        "id": "w2",
        "host": "h",
        "pid": 7,
        "revision": 1,
        "last_seen": "2026-12-03T20:14:21Z",
    }


async def test_gateways_unknown_environment_is_404(api: Client) -> None:
    status, answer = await call(api, "GET", "/environments/nope/gateways")
    assert (status, answer["details"]) == (404, {"kind": "environment", "name": "nope"})
