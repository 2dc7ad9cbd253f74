"""Several API server processes on one port in front of one engine process: the launcher
(``launcher.ApiServers``), one API process's main (``worker``), and the status file through which each
API process's ``/health`` reports them all (``status``)."""

from .launcher import ApiServers, start_api_servers
from .worker import API_SERVER_HEADER

__all__ = ["ApiServers", "API_SERVER_HEADER", "start_api_servers"]
