"""The demo's environment serves every registered ERP at once, including ERPs that share one
identity server (one variable, e.g. VISMA_CONNECT_URL): every connector built from it lists its
clients."""

import asyncio

from erp_pipelines import demo
from erp_pipelines.config import connector_from_environment
from erp_pipelines.registry import api_erps


async def listed(erp: str, environment: dict[str, str]) -> list:
    async with connector_from_environment(erp, environment) as connector:
        return await connector.list_clients()


def test_every_erp_lists_its_clients_from_the_demo_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "DEMO_DIR", tmp_path)
    with demo.sandbox_environment() as environment:
        for spec in api_erps():
            clients = asyncio.run(listed(spec.name, environment))
            assert len([c for c in clients if c.is_active]) >= demo.DEMO_TENANTS - 2, spec.name
