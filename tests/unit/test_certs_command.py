"""`proxy-server certs` makes what the documentation makes with openssl and kubectl: the
konnectivity-server client certificate in a kubeconfig, signed by the cluster CA, and
(on request) the agent port's serving certificate; with safe file modes."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from proxy_server import certs_command
from proxy_server import cli as server_cli

URL = "https://10.96.0.1:6443"


def kubeadm_like_ca(directory: Path) -> tuple[Path, Path, x509.Certificate]:
    """An RSA-2048 CA shaped like kubeadm's /etc/kubernetes/pki/ca.{crt,key}."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, key_cert_sign=True,
                                     crl_sign=False, content_commitment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "ca.crt", directory / "ca.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path, cert


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load_kubeconfig(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def client_cert(config: dict) -> x509.Certificate:
    return x509.load_pem_x509_certificate(base64.b64decode(config["users"][0]["user"]["client-certificate-data"]))


def usages(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_with_the_cluster_ca_it_writes_only_the_kubeconfig(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca_cert, ca_key, ca = kubeadm_like_ca(tmp_path / "pki")
    out = tmp_path / "out"
    code = server_cli.main(["certs", "--out", str(out), "--ca-cert", str(ca_cert), "--ca-key", str(ca_key),
                            "--apiserver-url", URL])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["konnectivity-server.conf"]
    assert mode(out) == 0o700 and mode(out / "konnectivity-server.conf") == 0o600
    assert "konnectivity-server.conf" in capsys.readouterr().out

    config = load_kubeconfig(out / "konnectivity-server.conf")
    assert config["current-context"] == "system:konnectivity-server@kubernetes"
    assert config["contexts"] == [{"name": "system:konnectivity-server@kubernetes",
                                   "context": {"cluster": "kubernetes", "user": "system:konnectivity-server"}}]
    (cluster,) = config["clusters"]
    assert cluster["cluster"]["server"] == URL
    assert base64.b64decode(cluster["cluster"]["certificate-authority-data"]) == ca_cert.read_bytes()

    cert = client_cert(config)
    cert.verify_directly_issued_by(ca)  # an RSA signature by the cluster CA
    assert cert.subject.rfc4514_string() == "CN=system:konnectivity-server"
    assert usages(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    assert aki == ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    now = dt.datetime.now(dt.UTC)
    assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 375  # as the documentation's openssl
    key = serialization.load_pem_private_key(base64.b64decode(config["users"][0]["user"]["client-key-data"]), None)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)


def test_kubeconfig_loads_with_the_kubernetes_client(tmp_path: Path) -> None:
    ca_cert, ca_key, _ca = kubeadm_like_ca(tmp_path / "pki")
    out = tmp_path / "out"
    assert certs_command.main(["--out", str(out), "--ca-cert", str(ca_cert), "--ca-key", str(ca_key),
                               "--apiserver-url", URL]) == 0
    configuration = k8s.Configuration()
    k8s_config.load_kube_config(config_file=str(out / "konnectivity-server.conf"), client_configuration=configuration)
    assert configuration.host == URL
    assert Path(configuration.ssl_ca_cert).read_bytes() == ca_cert.read_bytes()
    written = client_cert(load_kubeconfig(out / "konnectivity-server.conf"))
    loaded = x509.load_pem_x509_certificate(Path(configuration.cert_file).read_bytes())
    assert loaded == written
    assert Path(configuration.key_file).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_without_a_ca_it_makes_one_and_the_agent_port_certificate(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = certs_command.main(["--out", str(out), "--apiserver-url", URL, "--server-host", "127.0.0.1",
                               "--server-host", "konnectivity.kube-system.svc", "--days", "30"])
    assert code == 0
    modes = {p.name: mode(p) for p in out.iterdir()}
    assert modes == {"ca.crt": 0o644, "ca.key": 0o600, "konnectivity-server.conf": 0o600,
                     "konnectivity-agent-port.crt": 0o644, "konnectivity-agent-port.key": 0o600}
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    served = x509.load_pem_x509_certificate((out / "konnectivity-agent-port.crt").read_bytes())
    assert usages(served) == [ExtendedKeyUsageOID.SERVER_AUTH]
    store = verification.Store([ca])
    for name in (x509.DNSName("konnectivity.kube-system.svc"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        chain = verification.PolicyBuilder().store(store).build_server_verifier(name).verify(served, [])
        assert chain[-1] == ca
    with pytest.raises(verification.VerificationError):
        verification.PolicyBuilder().store(store).build_server_verifier(x509.DNSName("elsewhere")).verify(served, [])
    client = client_cert(load_kubeconfig(out / "konnectivity-server.conf"))
    client.verify_directly_issued_by(ca)
    assert (client.not_valid_after_utc - client.not_valid_before_utc).days == 30


def test_existing_files_are_kept_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert certs_command.main(["--out", str(out)]) == 0
    before = (out / "konnectivity-server.conf").read_bytes()
    assert certs_command.main(["--out", str(out)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (out / "konnectivity-server.conf").read_bytes() == before
    (out / "konnectivity-server.conf").chmod(0o644)
    assert certs_command.main(["--out", str(out), "--force"]) == 0
    assert (out / "konnectivity-server.conf").read_bytes() != before
    assert mode(out / "konnectivity-server.conf") == 0o600


@pytest.mark.parametrize(("case", "reason"), [("half", "go together"), ("mismatch", "is not the private key of"),
                                              ("not-a-ca", "is not a CA certificate"), ("plain-http", "https://")])
def test_unusable_inputs_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, reason: str) -> None:
    ca_cert, _ca_key, _ = kubeadm_like_ca(tmp_path / "a")
    _other_cert, other_key, _ = kubeadm_like_ca(tmp_path / "b")
    args = {"half": ["--ca-cert", str(ca_cert)],
            "mismatch": ["--ca-cert", str(ca_cert), "--ca-key", str(other_key)],
            "not-a-ca": [],
            "plain-http": ["--apiserver-url", "http://10.0.0.1:8080"]}[case]
    if case == "not-a-ca":
        assert certs_command.main(["--out", str(tmp_path / "leaf"), "--server-host", "x"]) == 0
        args = ["--ca-cert", str(tmp_path / "leaf/konnectivity-agent-port.crt"),
                "--ca-key", str(tmp_path / "leaf/konnectivity-agent-port.key")]
    capsys.readouterr()
    out = tmp_path / "out"
    assert certs_command.main(["--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("proxy-server certs: ") and reason in err
    assert not out.exists()


def test_server_flags_are_unchanged_by_the_subcommand() -> None:
    with pytest.raises(SystemExit):
        server_cli.build_parser().parse_args(["certs"])
    assert "certs" not in server_cli.build_parser().format_help()
