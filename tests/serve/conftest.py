"""Fixtures: a live uvicorn server on 127.0.0.1 (a free port, a background thread) for any engine.

`make_server(engine, **create_app_kwargs)` works with the fake engine here and with a real
`AsyncEngine`; `make_client(base_url)` is the real OpenAI client pointed at it; `serve(app)` runs
one app on a server of its own.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import time

import pytest

from tests.deps import need

need("starlette")
uvicorn = need("uvicorn")
openai = need("openai")

from hyprjax.serve.app import create_app  # noqa: E402
from tests.serve.fake_engine import FakeEngine  # noqa: E402


@contextlib.contextmanager
def serve(app, *, startup_timeout: float = 10.0):
    """Run `app` under uvicorn on 127.0.0.1 in a daemon thread; yields the base URL (no /v1)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # the OS picks a free port and we keep it: no race with other tests
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=f"uvicorn-{port}")
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on port {port}")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


_app_numbers = itertools.count()


class _Mux:
    """One ASGI app in front of many: each test's app answers under its own path prefix, so one
    uvicorn server serves the whole session (starting and stopping one per test costs ~0.2 s)."""

    def __init__(self):
        self.apps: dict[str, object] = {}

    async def __call__(self, scope, receive, send):
        prefix = "/" + scope["path"].split("/", 2)[1]
        app = self.apps.get(prefix)
        if app is None:
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b"no app mounted here"})
            return
        # ASGI: path keeps root_path; Starlette routes on the part after it.
        await app({**scope, "root_path": scope.get("root_path", "") + prefix}, receive, send)


@pytest.fixture(scope="session")
def _shared_server():
    mux = _Mux()
    with serve(mux) as url:
        yield mux, url


@pytest.fixture
def make_server(_shared_server):
    """make_server(engine, api_key=None, served_model_names=None) -> base URL (no /v1) of a live
    server for `engine`, the fake here or a real AsyncEngine; unmounted after the test."""
    mux, url = _shared_server
    mounted = []

    def make(engine, **kw):
        prefix = f"/app{next(_app_numbers)}"
        mux.apps[prefix] = create_app(engine, **kw)
        mounted.append(prefix)
        return url + prefix

    yield make
    for prefix in mounted:
        mux.apps.pop(prefix)


@pytest.fixture
def make_client():
    """make_client(base_url, api_key="unused") -> the OpenAI client on it, without retries (so a 503
    surfaces) and with a short timeout; closed after the test."""
    with contextlib.ExitStack() as stack:
        yield lambda base_url, api_key="unused", timeout=20: stack.enter_context(
            openai.OpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=timeout))


@pytest.fixture
def fake():
    return FakeEngine()


@pytest.fixture
def base_url(make_server, fake):
    return make_server(fake)


@pytest.fixture
def client(make_client, base_url):
    return make_client(base_url)
