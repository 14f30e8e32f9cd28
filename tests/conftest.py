import sys
from pathlib import Path

import pytest
import pytest_asyncio

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py


@pytest.fixture(scope="session")
def tiny():
    from stream_engine import Engine

    return Engine.load("random:tiny", device="cpu")


@pytest.fixture
def sdpa_flags():
    """Put torch's process-wide attention-kernel switches back after a test that probes them."""
    import torch

    b = torch.backends.cuda
    saved = [b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.cudnn_sdp_enabled()]
    saved.append(b.math_sdp_enabled())
    yield
    b.enable_flash_sdp(saved[0])
    b.enable_mem_efficient_sdp(saved[1])
    b.enable_cudnn_sdp(saved[2])
    b.enable_math_sdp(saved[3])


@pytest_asyncio.fixture
async def make_server(tiny):
    """Start servers on free ports with the tiny model; stop them after the test."""
    from stream_engine.config import ServerConfig
    from stream_engine.server.app import Server

    started = []

    async def make(**config):
        srv = Server(tiny, ServerConfig(port=0, **config))
        await srv.start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        await srv.stop(timeout=0)


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
