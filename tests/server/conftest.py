import pytest_asyncio


@pytest_asyncio.fixture
async def server(make_server):
    """A server with the tiny model on a free port (``make_server`` is in tests/conftest.py)."""
    return await make_server()
