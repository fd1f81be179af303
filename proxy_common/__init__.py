"""Code shared by proxy-server, proxy-agent and the client library.

Nothing in this package imports `proxy_server` or `proxy_agent`.
"""

__version__ = "0.1.0"
