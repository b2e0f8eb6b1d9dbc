"""HTTP serving as Prometheus meets it: paths, TLS, basic auth, with a real HTTPS client."""

from __future__ import annotations

import base64
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest
from certs import self_signed
from simnode import build

from gpuwatch.exporter.web import App, Server, parse_listen_address, serve
from gpuwatch.exporter.webconfig import ConfigError, load_web_config

PASSWORD = "s3cret-scrape"


def start(web_config: Path | None = None, telemetry_path: str = "/metrics") -> Server:
    node = build("workstation")
    app = App(node.registry, telemetry_path, load_web_config(web_config))
    server = serve(app, "127.0.0.1:0")
    server.start()
    return server


@pytest.fixture
def plain() -> Iterator[Server]:
    server = start()
    yield server
    server.stop()


def get(url: str, context: ssl.SSLContext | None = None, auth: tuple[str, str] | None = None
        ) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_paths(plain: Server) -> None:
    base = f"http://127.0.0.1:{plain.port}"
    status, body = get(base + "/metrics")
    assert status == 200 and 'nvidia_gpu_users_info{gpu="1",users="alice,bob"' in body
    status, body = get(base + "/")
    assert status == 200 and 'href="/metrics"' in body
    assert get(base + "/-/healthy") == (200, "Healthy\n")
    assert get(base + "/nope")[0] == 404


def test_custom_telemetry_path() -> None:
    server = start(telemetry_path="/gpu/metrics")
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert get(base + "/gpu/metrics")[0] == 200
        assert get(base + "/metrics")[0] == 404
        assert 'href="/gpu/metrics"' in get(base + "/")[1]
    finally:
        server.stop()


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[Server, ssl.SSLContext]]:
    cert, key = self_signed(tmp_path)
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    config = tmp_path / "web.yml"
    config.write_text(f"tls_server_config:\n  cert_file: {cert.name}\n  key_file: {key.name}\n"
                      f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    server = start(config)
    client = ssl.create_default_context(cafile=str(cert))
    yield server, client
    server.stop()


def test_tls_with_the_right_password(secured: tuple[Server, ssl.SSLContext]) -> None:
    server, client = secured
    status, body = get(f"https://127.0.0.1:{server.port}/metrics", client,
                       ("prometheus", PASSWORD))
    assert status == 200 and "nvidia_gpu_utilization_ratio" in body
    # a second scrape is answered from the verified-credentials cache, same result
    assert get(f"https://127.0.0.1:{server.port}/metrics", client,
               ("prometheus", PASSWORD))[0] == 200


@pytest.mark.parametrize("auth", [("prometheus", "wrong"), ("mallory", PASSWORD), None])
def test_tls_with_a_wrong_or_no_password_is_refused(
        secured: tuple[Server, ssl.SSLContext], auth: tuple[str, str] | None) -> None:
    server, client = secured
    status, body = get(f"https://127.0.0.1:{server.port}/metrics", client, auth)
    assert status == 401 and "nvidia_gpu" not in body


def test_plain_http_to_a_tls_port_gets_nothing(secured: tuple[Server, ssl.SSLContext]) -> None:
    server, _ = secured
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        get(f"http://127.0.0.1:{server.port}/metrics", auth=("prometheus", PASSWORD))


def test_a_client_that_does_not_trust_the_certificate_fails(
        secured: tuple[Server, ssl.SSLContext]) -> None:
    server, _ = secured
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        get(f"https://127.0.0.1:{server.port}/metrics", ssl.create_default_context())


def test_health_needs_auth_too_when_auth_is_on(secured: tuple[Server, ssl.SSLContext]) -> None:
    server, client = secured
    assert get(f"https://127.0.0.1:{server.port}/-/healthy", client)[0] == 401


@pytest.mark.parametrize(("text", "message"), [
    ("tls_server_config: [\n", "not valid YAML at line"),
    ("basic_auth_user: {}\n", "unknown key 'basic_auth_user'"),
    ("basic_auth_users:\n  alice: plain\n", "not a bcrypt hash"),
    ("tls_server_config:\n  key_file: k\n", "cert_file is required"),
    ("tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n",
     "does not exist"),
    ("tls_server_config:\n  cert_file: x\n  key_file: x\n  min_version: TLS99\n", None),
])
def test_a_bad_web_config_is_one_clear_error(tmp_path: Path, text: str, message: str | None
                                            ) -> None:
    config = tmp_path / "web.yml"
    config.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_web_config(config)
    assert str(config) in str(raised.value)
    assert "\n" not in str(raised.value)
    if message:
        assert message in str(raised.value)


def test_an_expired_certificate_is_refused_with_the_fix(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, days=1, start_days=-3)
    config = tmp_path / "web.yml"
    config.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n")
    with pytest.raises(ConfigError, match=r"expired on .* renew it"):
        load_web_config(config)


def test_a_key_that_does_not_match_the_certificate(tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path, "one")
    _, other_key = self_signed(tmp_path, "two")
    config = tmp_path / "web.yml"
    config.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {other_key}\n")
    with pytest.raises(ConfigError, match="key belongs to the certificate"):
        load_web_config(config)


@pytest.mark.parametrize(("address", "parsed"), [
    (":9839", ("", 9839)), ("127.0.0.1:9839", ("127.0.0.1", 9839)), ("[::1]:80", ("::1", 80))])
def test_listen_addresses(address: str, parsed: tuple[str, int]) -> None:
    assert parse_listen_address(address) == parsed


@pytest.mark.parametrize("address", ["9839", "host:", "host:http", ":70000"])
def test_bad_listen_addresses(address: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen_address(address)
