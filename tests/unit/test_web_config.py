"""--web.config.file as exporter-toolkit defines it: every key does what it says, or is refused.

TLS is checked on the SSLContext load_web_config builds, by a handshake in memory against a
client context (no server, no sockets): what a client of the exporter would see.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from certs import certificate_authority, self_signed, signed_by

from gpuwatch.exporter.webconfig import ConfigError, WebConfig, load_web_config
from gpuwatch.yamlfile import YamlFileError, load_mapping, parse_yaml, reject_unknown_keys


def write(folder: Path, config: dict[str, Any]) -> Path:
    path = folder / "web.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def tls_config(folder: Path, *, rsa: bool = False, **settings: Any) -> Path:
    """A web config serving a certificate for localhost signed by folder's server CA."""
    authority = certificate_authority(folder, "server-ca")
    cert, key = signed_by(folder, authority, "server", ["DNS:localhost", "IP:127.0.0.1"],
                          rsa_key=rsa)
    return write(folder, {"tls_server_config": {
        "cert_file": str(cert), "key_file": str(key), **settings}})


def refused(path: Path) -> str:
    """The one-line message load_web_config refuses path with."""
    with pytest.raises(ConfigError) as raised:
        load_web_config(path)
    message = str(raised.value)
    assert str(path) in message and "\n" not in message
    return message


def client(folder: Path, cert: tuple[Path, Path] | None = None, maximum: str = "TLSv1_3",
           ciphers: str | None = None, curve: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=folder / "server-ca.crt")
    context.maximum_version = ssl.TLSVersion[maximum]
    if ciphers:
        context.set_ciphers(ciphers)
    if curve:
        context.set_ecdh_curve(curve)
    if cert:
        context.load_cert_chain(*cert)
    return context


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLObject:
    """The server's end of a finished handshake; ssl.SSLError when either end refuses."""
    server_in, server_out, client_in, client_out = (ssl.MemoryBIO() for _ in range(4))
    server_end = server.wrap_bio(server_in, server_out, server_side=True)
    client_end = client.wrap_bio(client_in, client_out, server_hostname="localhost")
    ends = ((client_end, client_in, server_out), (server_end, server_in, client_out))
    done: set[ssl.SSLObject] = set()
    for _ in range(10):
        for end, incoming, outgoing in ends:
            incoming.write(outgoing.read())
            if end not in done:
                try:
                    end.do_handshake()
                    done.add(end)
                except ssl.SSLWantReadError:
                    pass
        if len(done) == 2:
            # TLS 1.3: the server judges the client's certificate after the client is done
            client_end.write(b"x")
            server_in.write(client_out.read())
            assert server_end.read(1) == b"x"
            return server_end
    raise AssertionError("the handshake did not finish")


def context_of(path: Path) -> ssl.SSLContext:
    tls = load_web_config(path).tls
    assert tls is not None
    return tls


# -- client_auth_type -------------------------------------------------------------------------

@pytest.fixture
def clients(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    """Client certificates: one signed by the clients' CA, one by a CA nobody trusts."""
    ours = certificate_authority(tmp_path, "client-ca")
    theirs = certificate_authority(tmp_path, "other-ca")
    return {"ca": ours,
            "signed": signed_by(tmp_path, ours, "alice", ["DNS:alice.example", "IP:10.0.0.7"]),
            "stranger": signed_by(tmp_path, theirs, "mallory", ["DNS:alice.example"])}


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_require_and_verify_client_cert(tmp_path: Path, clients: dict[str, tuple[Path, Path]],
                                        version: str) -> None:
    server = context_of(tls_config(tmp_path, client_auth_type="RequireAndVerifyClientCert",
                                   client_ca_file=str(clients["ca"][0])))
    peer = handshake(server, client(tmp_path, clients["signed"], version)).getpeercert()
    assert peer and ("DNS", "alice.example") in peer["subjectAltName"]
    for cert in (None, clients["stranger"]):
        with pytest.raises(ssl.SSLError):
            handshake(server, client(tmp_path, cert, version))


def test_verify_client_cert_if_given(tmp_path: Path, clients: dict[str, tuple[Path, Path]]
                                     ) -> None:
    server = context_of(tls_config(tmp_path, client_auth_type="VerifyClientCertIfGiven",
                                   client_ca_file=str(clients["ca"][0])))
    assert handshake(server, client(tmp_path)).getpeercert() is None
    assert handshake(server, client(tmp_path, clients["signed"])).getpeercert()
    with pytest.raises(ssl.SSLError):
        handshake(server, client(tmp_path, clients["stranger"]))


@pytest.mark.parametrize("settings", [{}, {"client_auth_type": "NoClientCert"}])
def test_no_client_cert_asks_for_none(tmp_path: Path, clients: dict[str, tuple[Path, Path]],
                                      settings: dict[str, Any]) -> None:
    server = context_of(tls_config(tmp_path, **settings))
    assert handshake(server, client(tmp_path, clients["stranger"])).getpeercert() is None


@pytest.mark.parametrize("with_ca", [False, True])
def test_request_client_cert_lets_in_every_client_as_go_does(
        tmp_path: Path, clients: dict[str, tuple[Path, Path]], with_ca: bool) -> None:
    """Go asks and never verifies; exporter-toolkit never reads the certificate."""
    settings: dict[str, Any] = {"client_auth_type": "RequestClientCert"}
    if with_ca:
        settings["client_ca_file"] = str(clients["ca"][0])
    server = context_of(tls_config(tmp_path, **settings))
    for cert in (None, clients["signed"], clients["stranger"]):
        handshake(server, client(tmp_path, cert))


@pytest.mark.parametrize("name", ["RequireAnyClientCert", "RequireClientCert"])
def test_require_any_client_cert_is_refused_with_the_alternative(tmp_path: Path,
                                                                 name: str) -> None:
    message = refused(tls_config(tmp_path, client_auth_type=name))
    if name == "RequireAnyClientCert":
        assert "client_auth_type: RequireAnyClientCert" in message
        assert "use RequireAndVerifyClientCert with client_ca_file" in message
    else:
        assert "is not one of NoClientCert, RequestClientCert" in message


@pytest.mark.parametrize(("settings", "message"), [
    ({"client_auth_type": "RequireAndVerifyClientCert"}, "needs client_ca_file"),
    ({"client_auth_type": "VerifyClientCertIfGiven"}, "needs client_ca_file"),
    ({"client_ca_file": "ca.crt"}, "client_ca_file is set but client_auth_type is NoClientCert"),
    ({"client_auth_type": ["RequireAndVerifyClientCert"]}, "client_auth_type: ['Require"),
    ({"client_auth_type": "requireandverifyclientcert"}, "is not one of NoClientCert"),
])
def test_client_auth_mistakes(tmp_path: Path, settings: dict[str, Any], message: str) -> None:
    self_signed(tmp_path, "ca")
    assert message in refused(tls_config(tmp_path, **settings))


@pytest.mark.parametrize(("content", "message"), [
    ("key", "holds no PEM certificate (it holds a private key)"),
    (b"\x00\xffgarbage", "holds no PEM certificate"),
    ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "PEM certificate"),
])
def test_a_client_ca_file_without_a_certificate_is_one_line(tmp_path: Path, content: str | bytes,
                                                            message: str) -> None:
    ca_file = tmp_path / "clients.pem"
    if content == "key":
        ca_file.write_bytes(certificate_authority(tmp_path)[1].read_bytes())
    else:
        ca_file.write_bytes(content.encode() if isinstance(content, str) else content)
    path = tls_config(tmp_path, client_auth_type="RequireAndVerifyClientCert",
                      client_ca_file=str(ca_file))
    message_seen = refused(path)
    assert "tls_server_config.client_ca_file" in message_seen and message in message_seen


# -- client_allowed_sans ----------------------------------------------------------------------

def test_client_allowed_sans_reach_the_server(tmp_path: Path,
                                              clients: dict[str, tuple[Path, Path]]) -> None:
    path = tls_config(tmp_path, client_auth_type="RequireAndVerifyClientCert",
                      client_ca_file=str(clients["ca"][0]),
                      client_allowed_sans=["alice.example", "10.0.0.7"])
    assert load_web_config(path).client_allowed_sans == ("alice.example", "10.0.0.7")


def test_client_allowed_sans_need_a_certificate_even_if_only_verified_when_given(
        tmp_path: Path, clients: dict[str, tuple[Path, Path]]) -> None:
    """exporter-toolkit's SAN check fails a client that sends no certificate."""
    server = context_of(tls_config(tmp_path, client_auth_type="VerifyClientCertIfGiven",
                                   client_ca_file=str(clients["ca"][0]),
                                   client_allowed_sans=["alice.example"]))
    with pytest.raises(ssl.SSLError):
        handshake(server, client(tmp_path))
    assert handshake(server, client(tmp_path, clients["signed"])).getpeercert()


@pytest.mark.parametrize(("settings", "message"), [
    ({}, "client_allowed_sans needs a verified client certificate; set client_auth_type: "
         "RequireAndVerifyClientCert"),
    ({"client_auth_type": "RequestClientCert"}, "client_allowed_sans needs a verified"),
    ({"client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": "ca.crt",
      "client_allowed_sans": "alice.example"}, "client_allowed_sans: expected a list"),
    ({"client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": "ca.crt",
      "client_allowed_sans": [1, 2]}, "client_allowed_sans: expected a list of names"),
    ({"client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": "ca.crt",
      "client_allowed_sans": []}, "client_allowed_sans: the list is empty"),
])
def test_client_allowed_sans_mistakes(tmp_path: Path, settings: dict[str, Any],
                                      message: str) -> None:
    self_signed(tmp_path, "ca")
    settings = {"client_allowed_sans": ["alice.example"], **settings}
    assert message in refused(tls_config(tmp_path, **settings))


# -- cipher_suites, prefer_server_cipher_suites, curve_preferences ----------------------------

def test_cipher_suites_limit_tls12(tmp_path: Path) -> None:
    server = context_of(tls_config(tmp_path, cipher_suites=[
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384"]))
    assert handshake(server, client(tmp_path, maximum="TLSv1_2")).cipher() == (
        "ECDHE-ECDSA-AES128-GCM-SHA256", "TLSv1.2", 128)
    with pytest.raises(ssl.SSLError):
        handshake(server, client(tmp_path, maximum="TLSv1_2",
                                 ciphers="ECDHE-ECDSA-AES256-GCM-SHA384"))
    # TLS 1.3 suites are not configurable, in Go as here
    assert handshake(server, client(tmp_path)).version() == "TLSv1.3"


def test_cipher_suites_for_an_rsa_certificate(tmp_path: Path) -> None:
    server = context_of(tls_config(tmp_path, rsa=True, max_version="TLS12",
                                   cipher_suites=["TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256"]))
    assert handshake(server, client(tmp_path))


@pytest.mark.parametrize(("prefer", "chosen"), [
    (True, "ECDHE-ECDSA-AES128-GCM-SHA256"), (False, "ECDHE-ECDSA-AES256-GCM-SHA384")])
def test_prefer_server_cipher_suites(tmp_path: Path, prefer: bool, chosen: str) -> None:
    server = context_of(tls_config(tmp_path, prefer_server_cipher_suites=prefer, cipher_suites=[
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"]))
    offered = "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256"
    cipher = handshake(server, client(tmp_path, maximum="TLSv1_2", ciphers=offered)).cipher()
    assert cipher and cipher[0] == chosen


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_one_curve(tmp_path: Path, version: str) -> None:
    # an RSA certificate: a TLS 1.2 client offering only P-256 could not use an ECDSA P-384 one
    server = context_of(tls_config(tmp_path, rsa=True, curve_preferences=["CurveP384"]))
    handshake(server, client(tmp_path, maximum=version, curve="secp384r1"))
    with pytest.raises(ssl.SSLError):
        handshake(server, client(tmp_path, maximum=version, curve="prime256v1"))
    handshake(server, client(tmp_path, maximum=version))


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_one_curve_other_than_the_certificates(tmp_path: Path, version: str) -> None:
    """The curve is the key exchange's; a P-256 ECDSA certificate still serves."""
    server = context_of(tls_config(tmp_path, curve_preferences=["X25519"]))
    handshake(server, client(tmp_path, maximum=version))


@pytest.mark.parametrize(("settings", "message"), [
    ({"cipher_suites": ["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA25"]},
     "cipher_suites: 'TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA25' is not one of Go's crypto/tls "
     "CipherSuites() (the names exporter-toolkit accepts): TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA"),
    ({"cipher_suites": ["TLS_RSA_WITH_AES_128_GCM_SHA256"]}, "is not one of Go's"),
    ({"cipher_suites": ["ECDHE-RSA-AES128-GCM-SHA256"]}, "is not one of Go's"),
    ({"cipher_suites": "TLS_AES_128_GCM_SHA256"}, "cipher_suites: expected a list"),
    ({"cipher_suites": ["TLS_AES_128_GCM_SHA256"]}, "lists only TLS 1.3 suites"),
    ({"prefer_server_cipher_suites": "yes"}, "prefer_server_cipher_suites: expected true or"),
    ({"curve_preferences": ["CurveP256", "X25519"]},
     "curve_preferences: Python's ssl can offer only one curve; list one of CurveP256, X25519"),
    ({"curve_preferences": ["P256"]}, "curve_preferences: 'P256' is not one of CurveP256"),
    ({"min_version": ["TLS12"]}, "min_version: ['TLS12'] is not one of TLS10"),
    ({"min_version": "TLS13", "max_version": "TLS12"}, "min_version is above max_version"),
])
def test_tls_setting_mistakes(tmp_path: Path, settings: dict[str, Any], message: str) -> None:
    assert message in refused(tls_config(tmp_path, **settings))


def test_every_go_cipher_name_is_accepted(tmp_path: Path) -> None:
    """web/testdata/web_config_noAuth_allCiphers.good.yml of exporter-toolkit."""
    names = ["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
             "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
             "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
             "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256", "TLS_AES_128_GCM_SHA256",
             "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256",
             "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA", "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
             "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA", "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA"]
    server = context_of(tls_config(tmp_path, cipher_suites=names))
    offered = {c["name"] for c in server.get_ciphers() if c["protocol"] != "TLSv1.3"}
    assert len(offered) == 10


# -- files ------------------------------------------------------------------------------------

def test_an_encrypted_key_is_refused_without_a_prompt(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    cert, key = self_signed(tmp_path)
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    key.write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"hunter2")))
    message = refused(write(tmp_path, {"tls_server_config": {
        "cert_file": str(cert), "key_file": str(key)}}))
    assert "key_file" in message and "not encrypted" in message


@pytest.mark.parametrize("key", ["cert_file", "key_file", "client_ca_file"])
def test_an_unreadable_file_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        clients: dict[str, tuple[Path, Path]], key: str) -> None:
    path = tls_config(tmp_path, client_auth_type="RequireAndVerifyClientCert",
                      client_ca_file=str(clients["ca"][0]))
    target = Path(yaml.safe_load(path.read_text())["tls_server_config"][key])
    read_bytes = Path.read_bytes

    def denied(self: Path) -> bytes:
        if self == target:
            raise PermissionError(13, "Permission denied")
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", denied)  # the tests run as root: chmod would not do
    assert f"tls_server_config.{key}: cannot read {target}: Permission denied" in refused(path)


# -- http_server_config -----------------------------------------------------------------------

def test_headers_are_those_exporter_toolkit_allows(tmp_path: Path) -> None:
    path = write(tmp_path, {"http_server_config": {"http2": False, "headers": {
        "X-Frame-Options": "deny", "Content-Security-Policy": "default-src 'self'",
        "Strict-Transport-Security": ""}}})
    assert load_web_config(path).headers == {
        "X-Frame-Options": "deny", "Content-Security-Policy": "default-src 'self'"}


@pytest.mark.parametrize(("http", "message"), [
    ({"headers": ["X-Frame-Options: deny"]},
     "http_server_config.headers: expected a mapping of header name to value"),
    ({"headers": {"X-Frame-Options": ["deny"]}},
     "headers.X-Frame-Options: expected one line of text"),
    ({"headers": {"X-XSS-Protection": 1}}, "headers.X-XSS-Protection: expected one line"),
    ({"headers": {"X-XSS-Protection": "1\r\nSet-Cookie: a=b"}}, "expected one line of text"),
    ({"headers": {"Authorization": "Basic x"}},
     "headers.Authorization: this header cannot be configured; only Strict-Transport-Security"),
    ({"headers": {"x-frame-options": "deny"}}, "write it X-Frame-Options"),
    ({"headers": {"X-Frame-Options": "allow"}}, "'allow' is not one of deny, sameorigin"),
    ({"headers": {"X-Content-Type-Options": "sniff"}}, "is not one of nosniff"),
    ({"http2": True}, "http_server_config.http2: gpuwatch-exporter serves HTTP/1.1 only; set "
                      "http2: false"),
    ({"http2": "false"}, "http_server_config.http2: expected true or false"),
    ([], "http_server_config: expected a mapping"),
])
def test_http_server_config_mistakes(tmp_path: Path, http: Any, message: str) -> None:
    assert message in refused(write(tmp_path, {"http_server_config": http}))


# -- basic_auth_users -------------------------------------------------------------------------

GOOD = "$2b$04$gpuwatchtestsaltgpuwa.36dBckAtrQjh3LkZ1mRg.TKGGvp4SNu"
"""bcrypt of "pw"; fixed, so that the test ids are the same on every run."""


@pytest.mark.parametrize("hashed", [GOOD, GOOD.replace("$2b$", "$2y$"),
                                    GOOD.replace("$2b$", "$2a$")])
def test_bcrypt_hashes_as_htpasswd_and_python_make_them(tmp_path: Path, hashed: str) -> None:
    config = load_web_config(write(tmp_path, {"basic_auth_users": {"prometheus": hashed}}))
    assert config == WebConfig(basic_auth_users={"prometheus": hashed.encode()})


@pytest.mark.parametrize("hashed", [
    GOOD[:-1],                                 # cut short: fails every request
    GOOD + "x",
    GOOD[:-1] + "!",                           # not bcrypt's alphabet
    GOOD.replace("$2b$04$", "$2b$03$"),        # cost below 4
    GOOD.replace("$2b$04$", "$2b$32$"),        # cost above 31
    GOOD.replace("$2b$04$", "$2b$4$"),
    GOOD.replace("$2b$", "$2x$"),
    GOOD[:7] + "." * 21 + "/" + GOOD[29:],     # a salt bcrypt refuses
    "$2y$10$",
    "hunter2",
])
def test_a_malformed_bcrypt_hash_is_refused_at_start(tmp_path: Path, hashed: str) -> None:
    message = refused(write(tmp_path, {"basic_auth_users": {"prometheus": hashed}}))
    assert "basic_auth_users.prometheus: " in message and "htpasswd -nBC 10" in message


def test_a_user_name_with_a_colon_can_never_log_in(tmp_path: Path) -> None:
    message = refused(write(tmp_path, {"basic_auth_users": {"a:b": GOOD}}))
    assert "basic_auth_users.a:b: a user name cannot contain ':'" in message


# -- the YAML helpers every reader shares (gpuwatch.yamlfile) ------------------------------

def test_the_yaml_helpers_name_the_file_the_line_and_the_key(tmp_path: Path) -> None:
    with pytest.raises(YamlFileError, match=r"^scenario\.yml: not valid YAML at line 3: "):
        parse_yaml("a: 1\nb: [\n", "scenario.yml")
    path = tmp_path / "list.yml"
    path.write_text("- a\n")
    with pytest.raises(YamlFileError, match="expected a mapping of settings, got list"):
        load_mapping(path)
    with pytest.raises(YamlFileError, match=r"cannot read: No such file"):
        load_mapping(tmp_path / "absent.yml")
    assert load_mapping(write(tmp_path, {})) == {}
    with pytest.raises(KeyError, match="f: unknown key 'c'; known keys: a, b"):
        reject_unknown_keys("f", "", {"a": 1, "c": 2}, {"a", "b"}, KeyError)  # type: ignore[arg-type]


def test_the_exporters_config_error_is_a_yaml_file_error(tmp_path: Path) -> None:
    path = tmp_path / "web.yml"
    path.write_text("tls_server_config: {cert: x}\n")
    with pytest.raises(YamlFileError):  # ConfigError, as the exporter catches it
        load_web_config(path)


def test_the_reservations_and_the_simulator_read_yaml_without_the_exporters_web_config(
        ) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import sys, gpuwatch.reservations, gpuwatch.sim; "
         "print(sorted(m for m in sys.modules if m.startswith('gpuwatch')))"],
        capture_output=True, text=True, timeout=60, check=True)
    assert "gpuwatch.yamlfile" in done.stdout, done.stdout  # the check sees what loads
    assert "gpuwatch.exporter.webconfig" not in done.stdout, done.stdout
