"""Serving the dashboard: Solara's Starlette app under uvicorn, in this process.

``check_port`` runs before any model is built, so a port in use is one line. Solara's telemetry
and version check stay off, and its CDN proxy never reaches out: every asset the page needs
comes with the solara packages (``tests/test_dashboard.py`` checks that no request went to the
CDN path).
"""

from __future__ import annotations

import os
import socket
import warnings

from agorasim.errors import UserInputError

CDN_PATH = "/_solara/cdn/"


def check_port(host: str, port: int) -> None:
    """One line unless ``host:port`` can be listened on."""
    if not 0 < port < 65536:
        raise UserInputError(f"--port {port}: give a port between 1 and 65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as error:
            reason = "in use" if error.errno == 98 else (error.strerror or str(error)).lower()
            raise UserInputError(f"--port {port}: cannot listen on {host}:{port} ({reason}); choose another port") from None


def quiet_solara() -> None:
    """Solara's settings for a local tool, before solara is imported (``agorasim/viz/__init__.py``
    sets the others): no Font Awesome stylesheet (Mesa's page uses Material icons)."""
    os.environ.setdefault("SOLARA_ASSETS_FONTAWESOME_ENABLED", "false")


def serve(host: str, port: int, ready=None) -> None:
    """Serve ``agorasim.viz.dashboard:Page`` until interrupted (``set_page`` is called first)."""
    quiet_solara()
    os.environ["SOLARA_APP"] = "agorasim.viz.dashboard:Page"
    os.environ["SERVER_NAME"], os.environ["SERVER_PORT"] = host, str(port)
    import solara.server.settings as settings
    import uvicorn

    # served on 127.0.0.1 over http, so solara's session cookie is samesite=lax: that is what we want
    warnings.filterwarnings("ignore", message="Cookies with samesite=none require https")
    settings.main.mode = "production"
    settings.telemetry.mixpanel_enable = False
    config = uvicorn.Config("solara.server.starlette:app", host=host, port=port, log_level="warning",
                            access_log=bool(os.environ.get("AGORASIM_DASHBOARD_ACCESS_LOG")))
    uvicorn.Server(config).run()
