"""The JCT dashboard: `GET /dashboard` (one self-contained HTML page, router/static/
dashboard.html: inline CSS and JS, charts drawn as SVG, nothing fetched from outside the router)
and `GET /dashboard/data` (the JSON it polls every 2 s; see dashboard_data.py).

The page itself holds no data, so it is open even with an API key (a browser cannot send a
bearer header when it navigates); `/dashboard/data` needs the key like every other route. The
page sends the key it finds in its URL fragment: open `/dashboard#key=<api key>` (a fragment
never leaves the browser, so the key stays out of server and proxy logs).
"""

from __future__ import annotations

from pathlib import Path

import anyio
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse

from zipserve.router.dashboard_data import DashboardHistory, dashboard_data
from zipserve.router.metrics import RouterMetrics, read_health
from zipserve.router.serving import RouterState

DASHBOARD_PATH = "/dashboard"
OPEN_PATHS = frozenset({DASHBOARD_PATH})
"""Routes the API key does not cover (the page; its data stays behind the key)."""


def dashboard_html() -> str:
    """The page, read from the package on each request (20 KB; edits show without a restart)."""
    return (Path(__file__).parent / "static" / "dashboard.html").read_text(encoding="utf-8")


def install_dashboard(app: FastAPI, state: RouterState, metrics: RouterMetrics) -> DashboardHistory:
    """Add `GET /dashboard` and `GET /dashboard/data` to `app` and start recording jobs."""
    history = DashboardHistory()
    state.registry.add_listener(history.observe_job)

    @app.get(DASHBOARD_PATH, include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        # no-store: a stale page polling a newer router would misread its data
        return HTMLResponse(dashboard_html(), headers={"Cache-Control": "no-store"})

    @app.get(DASHBOARD_PATH + "/data", include_in_schema=False)
    async def data() -> JSONResponse:
        health = await anyio.to_thread.run_sync(read_health, state.backend)
        return JSONResponse(
            dashboard_data(state, history, metrics, health), headers={"Cache-Control": "no-store"}
        )

    return history
