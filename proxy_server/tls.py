"""TLS for proxy-server's TCP listeners (the agent port and the TCP frontend), through Python's ssl."""

from __future__ import annotations

import ssl

# TLS 1.2 suites offered when --cipher-suites is not given: forward-secret AEAD suites only,
# as grpc's default list and Go's secure defaults (no CBC suites).
DEFAULT_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def server_tls_context(
    cert: str, key: str, ca: str | None, tls_min_version: str = "", ciphers: str = "", *, alpn: str
) -> ssl.SSLContext:
    """Client certificates signed by `ca` required (none asked for when `ca` is None); ALPN
    `alpn` ("h2" for gRPC, "http/1.1" for HTTP-CONNECT). `ciphers` (an OpenSSL list, from
    --cipher-suites) limits the TLS 1.2 suites, as the reference's --cipher-suites does; TLS
    1.3 suites are always on, as in Go."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3 if tls_min_version == "VersionTLS13" else ssl.TLSVersion.TLSv1_2
    context.set_ciphers(ciphers or DEFAULT_TLS12_CIPHERS)
    context.load_cert_chain(cert, key)
    if ca is not None:
        context.load_verify_locations(cafile=ca)
        context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols([alpn])
    return context
