import pytest_asyncio

from stream_engine.config import ServerConfig
from stream_engine.server.app import Server


@pytest_asyncio.fixture
async def make_server(tiny):
    """Start servers on free ports with the tiny model; stop them after the test."""
    started = []

    async def make(**config):
        srv = Server(tiny, ServerConfig(port=0, **config))
        await srv.start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        await srv.stop(timeout=0)


@pytest_asyncio.fixture
async def server(make_server):
    return await make_server()
