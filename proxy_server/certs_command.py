"""`proxy-server certs`: what the Kubernetes documentation builds with openssl and kubectl.

ROOT (a command; writes files). The "Set up Konnectivity service" task makes a client
certificate with CN `system:konnectivity-server`, signed by the cluster CA, and a
kubeconfig `/etc/kubernetes/konnectivity-server.conf` embedding it, the CA and the API
server URL (context `system:konnectivity-server@kubernetes`). This command does the same
with `cryptography`, and can also issue a serving certificate for the agent port
(`--cluster-cert`/`--cluster-key`) when the apiserver's own is not to be reused.

The CA is the cluster's (`--ca-cert`/`--ca-key`, e.g. /etc/kubernetes/pki/ca.crt and
ca.key; RSA or ECDSA) or, when neither is given, a new one written next to the outputs.
Private keys and the kubeconfig are created mode 0600, certificates 0644, the output
directory 0700 when it is created. Existing files are never overwritten without `--force`,
and an existing CA is never written.
"""

from __future__ import annotations

import argparse
import base64
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy_common import certs

DEFAULT_USER = "system:konnectivity-server"
CLUSTER_NAME = "kubernetes"
CA_STEM = "ca"
AGENT_PORT_STEM = "konnectivity-agent-port"


class CertsError(Exception):
    """The command cannot do what was asked; the message says why."""


@dataclass(frozen=True)
class Outputs:
    kubeconfig: Path
    ca_cert: Path
    ca_key: Path | None = None
    agent_port_cert: Path | None = None
    agent_port_key: Path | None = None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="proxy-server certs",
        description="Issue the konnectivity-server client certificate and kubeconfig (and optionally an "
        "agent-port serving certificate) from the cluster CA, as the Kubernetes documentation does with openssl.",
        allow_abbrev=False,
    )
    p.add_argument("--out", required=True, help="output directory (created with mode 0700)")
    p.add_argument("--ca-cert", default="", help="existing CA certificate, e.g. /etc/kubernetes/pki/ca.crt "
                   "(omit both CA flags to create a new CA in --out)")
    p.add_argument("--ca-key", default="", help="existing CA private key, e.g. /etc/kubernetes/pki/ca.key")
    p.add_argument("--apiserver-url", default="https://127.0.0.1:6443",
                   help="kube-apiserver URL written into the kubeconfig (default %(default)s)")
    p.add_argument("--user", default=DEFAULT_USER,
                   help="certificate common name = Kubernetes user name (default %(default)s)")
    p.add_argument("--kubeconfig-name", default="konnectivity-server.conf",
                   help="file name of the kubeconfig in --out (default %(default)s)")
    p.add_argument("--server-host", action="append", default=[], metavar="HOST",
                   help="a name or IP agents use as --proxy-server-host; repeatable. When given, also issue "
                   f"{AGENT_PORT_STEM}.crt/.key for --cluster-cert/--cluster-key")
    p.add_argument("--days", type=int, default=375, help="validity of issued certificates (default %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    return p


def load_existing_ca(cert_path: str, key_path: str) -> certs.Issued:
    """The cluster CA, RSA or ECDSA, checked to be a CA whose key matches its certificate."""
    try:
        cert_pem, key_pem = Path(cert_path).read_bytes(), Path(key_path).read_bytes()
    except OSError as exc:
        raise CertsError(f"cannot read the CA: {exc}") from exc
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CertsError(f"cannot parse the CA: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise CertsError("the CA key must be RSA or ECDSA")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise CertsError(f"{key_path} is not the private key of {cert_path}")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CertsError(f"{cert_path} is not a CA certificate (basicConstraints CA:TRUE missing)")
    return certs.Issued(cert_pem, key_pem, cert, key)  # type: ignore[arg-type]


def kubeconfig(server_url: str, ca_pem: bytes, client: certs.Issued, user: str) -> dict[str, Any]:
    """The kubeconfig `kubectl config set-credentials/set-cluster/set-context --embed-certs` builds."""
    context = f"{user}@{CLUSTER_NAME}"

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CLUSTER_NAME, "cluster": {"server": server_url, "certificate-authority-data": b64(ca_pem)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(client.cert_pem),
                                          "client-key-data": b64(client.key_pem)}}],
        "contexts": [{"name": context, "context": {"cluster": CLUSTER_NAME, "user": user}}],
        "current-context": context,
        "preferences": {},
    }


def run(args: argparse.Namespace) -> Outputs:
    out = Path(args.out)
    if bool(args.ca_cert) != bool(args.ca_key):
        raise CertsError("--ca-cert and --ca-key go together (or omit both to create a new CA)")
    if args.days <= 0:
        raise CertsError("--days must be positive")
    if not args.apiserver_url.startswith("https://"):
        raise CertsError("--apiserver-url must be an https:// URL")
    planned = [out / args.kubeconfig_name]
    if not args.ca_cert:
        planned += [out / f"{CA_STEM}.crt", out / f"{CA_STEM}.key"]
    if args.server_host:
        planned += [out / f"{AGENT_PORT_STEM}.crt", out / f"{AGENT_PORT_STEM}.key"]
    existing = [str(path) for path in planned if path.exists()]
    if existing and not args.force:
        raise CertsError(f"refusing to overwrite {', '.join(existing)} (use --force)")
    existing_ca = load_existing_ca(args.ca_cert, args.ca_key) if args.ca_cert else None
    if not out.exists():
        out.mkdir(mode=0o700, parents=True)

    if existing_ca is not None:
        ca, ca_cert_path, ca_key_path = existing_ca, Path(args.ca_cert), None
    else:
        ca = certs.make_ca("konnectivity-ca")
        ca_cert_path, ca_key_path = certs.write_pair(out, CA_STEM, ca)
    client = certs.issue(ca, args.user, client=True, days=args.days)
    config_path = out / args.kubeconfig_name
    certs.write_secret(config_path, yaml.safe_dump(kubeconfig(args.apiserver_url, ca.cert_pem, client, args.user),
                                                   sort_keys=False).encode())
    outputs = Outputs(config_path, ca_cert_path, ca_key_path)
    if args.server_host:
        served = certs.issue(ca, "konnectivity-server", sans=tuple(args.server_host), server=True, days=args.days)
        cert_path, key_path = certs.write_pair(out, AGENT_PORT_STEM, served)
        outputs = Outputs(config_path, ca_cert_path, ca_key_path, cert_path, key_path)
    return outputs


def summary(outputs: Outputs, user: str) -> str:
    lines = [f"kubeconfig for {user}: {outputs.kubeconfig}  (proxy-server --kubeconfig=...)"]
    if outputs.ca_key is not None:
        lines.append(f"new CA: {outputs.ca_cert}, key {outputs.ca_key}  (agents trust it with --ca-cert=...)")
    if outputs.agent_port_cert is not None:
        lines.append(f"agent port: --cluster-cert={outputs.agent_port_cert} --cluster-key={outputs.agent_port_key}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        outputs = run(args)
    except CertsError as exc:
        sys.stderr.write(f"proxy-server certs: {exc}\n")
        return 2
    sys.stdout.write(summary(outputs, args.user))
    return 0
