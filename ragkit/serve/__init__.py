"""`ragkit serve`: a long-running RAG server over one Pipeline (see app.py for the routes,
scheduler.py for the seam an answering engine plugs into)."""

from ragkit.serve.app import Server, create_app
from ragkit.serve.server import ServeOptions, build_server, check_listen, run

__all__ = ["Server", "ServeOptions", "build_server", "check_listen", "create_app", "run"]
