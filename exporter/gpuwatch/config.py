"""The exporter's files: --config.file (display names) and --web.config.file (TLS, auth).

The web config is the Prometheus exporter-toolkit format, so one file serves node_exporter
and gpuwatch alike. Every problem is a ConfigError whose message names the file, the key and
the fix, printed as one line before the exporter exits with status 2.
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration file the exporter cannot start with."""


def parse_yaml(text: str, source: object, error: type[ValueError] = ConfigError) -> Any:
    """The YAML document in text; `error` naming the source and the line when it is not
    YAML. The files gpuwatch reads from its users go through here."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise error(f"{source}: not valid YAML{where}: "
                    f"{getattr(e, 'problem', None) or e}") from None


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    data = parse_yaml(text, path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def reject_unknown_keys(source: object, where: str, data: Mapping[str, Any], known: set[str],
                        error: type[ValueError] = ConfigError) -> None:
    """`error` naming the source, the place and the first key that is not one of `known`."""
    unknown = sorted(set(data) - known)
    if unknown:
        raise error(f"{source}: {where}unknown key {unknown[0]!r}; known keys: "
                    f"{', '.join(sorted(known))}")


# -- --config.file ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ExporterConfig:
    display_names: Mapping[str, str] = field(default_factory=dict)
    """Full NVML model name -> short display name, e.g. "NVIDIA GeForce RTX 3090": "3090"."""


def load_exporter_config(path: Path | None) -> ExporterConfig:
    if path is None:
        return ExporterConfig()
    data = _load_yaml(path)
    reject_unknown_keys(path, "", data, {"display_names"})
    names = data.get("display_names") or {}
    if not isinstance(names, dict) or not all(
            isinstance(k, str) and isinstance(v, (str, int, float)) for k, v in names.items()):
        raise ConfigError(f"{path}: display_names: expected a mapping of model name to short "
                          f'name, e.g. "NVIDIA GeForce RTX 3090": "3090"')
    return ExporterConfig(display_names={k: str(v) for k, v in names.items()})


# -- --web.config.file -----------------------------------------------------------------------

_TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                 "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_CLIENT_AUTH = {"NoClientCert": ssl.CERT_NONE, "RequestClientCert": ssl.CERT_OPTIONAL,
                "RequireAnyClientCert": ssl.CERT_REQUIRED,
                "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
                "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}
_TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version",
             "max_version", "cipher_suites", "curve_preferences", "prefer_server_cipher_suites",
             "client_allowed_sans"}


@dataclass(frozen=True)
class WebConfig:
    tls: ssl.SSLContext | None = None
    basic_auth_users: Mapping[str, bytes] = field(default_factory=dict)
    """user -> bcrypt hash."""
    headers: Mapping[str, str] = field(default_factory=dict)
    client_allowed_sans: tuple[str, ...] = ()
    """tls_server_config.client_allowed_sans: a verified client certificate must name one of
    these (DNS, IP, e-mail or URI SAN); empty: any verified certificate."""


def load_web_config(path: Path | None, now: datetime.datetime | None = None) -> WebConfig:
    if path is None:
        return WebConfig()
    data = _load_yaml(path)
    reject_unknown_keys(path, "", data,
                        {"tls_server_config", "basic_auth_users", "http_server_config"})
    users = data.get("basic_auth_users") or {}
    if not isinstance(users, dict):
        raise ConfigError(f"{path}: basic_auth_users: expected a mapping of user to bcrypt hash")
    hashes = {}
    for user, hashed in users.items():
        if not isinstance(hashed, str) or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise ConfigError(f"{path}: basic_auth_users.{user}: not a bcrypt hash; make one "
                              "with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`")
        hashes[str(user)] = hashed.encode()
    http = data.get("http_server_config") or {}
    if not isinstance(http, dict):
        raise ConfigError(f"{path}: http_server_config: expected a mapping")
    reject_unknown_keys(path, "http_server_config: ", http, {"headers", "http2"})
    headers = {str(k): str(v) for k, v in (http.get("headers") or {}).items()}
    tls = data.get("tls_server_config")
    context = _tls_context(path, tls, now) if tls else None
    return WebConfig(tls=context, basic_auth_users=hashes, headers=headers)


def _tls_context(path: Path, tls: Any, now: datetime.datetime | None) -> ssl.SSLContext:
    if not isinstance(tls, dict):
        raise ConfigError(f"{path}: tls_server_config: expected a mapping")
    reject_unknown_keys(path, "tls_server_config: ", tls, _TLS_KEYS)
    base = path.parent

    def file(key: str) -> Path:
        value = tls.get(key)
        if not value:
            raise ConfigError(f"{path}: tls_server_config.{key} is required")
        resolved = (base / str(value)).resolve()
        if not resolved.is_file():
            raise ConfigError(f"{path}: tls_server_config.{key}: {resolved} does not exist")
        return resolved

    cert, key = file("cert_file"), file("key_file")
    _check_not_expired(path, cert, now or datetime.datetime.now(datetime.timezone.utc))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"{path}: tls_server_config: cannot load {cert} with {key}: {e}; "
                          "check that the key belongs to the certificate") from e
    for bound, attr in (("min_version", "minimum_version"), ("max_version", "maximum_version")):
        if bound in tls:
            if tls[bound] not in _TLS_VERSIONS:
                raise ConfigError(f"{path}: tls_server_config.{bound}: {tls[bound]!r} is not "
                                  f"one of {', '.join(_TLS_VERSIONS)}")
            setattr(context, attr, _TLS_VERSIONS[tls[bound]])
    if "min_version" not in tls:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    auth = tls.get("client_auth_type", "NoClientCert")
    if auth not in _CLIENT_AUTH:
        raise ConfigError(f"{path}: tls_server_config.client_auth_type: {auth!r} is not one of "
                          f"{', '.join(_CLIENT_AUTH)}")
    context.verify_mode = _CLIENT_AUTH[auth]
    if auth != "NoClientCert":
        if "client_ca_file" in tls:
            context.load_verify_locations(file("client_ca_file"))
        elif "Verify" in auth:
            raise ConfigError(f"{path}: tls_server_config: client_auth_type {auth} needs "
                              "client_ca_file")
    return context


def _check_not_expired(path: Path, cert: Path, now: datetime.datetime) -> None:
    from cryptography import x509

    try:
        certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    except ValueError as e:
        raise ConfigError(f"{path}: tls_server_config.cert_file: {cert} is not a PEM "
                          f"certificate: {e}") from e
    expires = certificate.not_valid_after_utc
    if expires <= now:
        raise ConfigError(f"{path}: tls_server_config.cert_file: {cert} expired on "
                          f"{expires:%Y-%m-%d %H:%M} UTC; renew it and restart the exporter")
    if certificate.not_valid_before_utc > now:
        raise ConfigError(f"{path}: tls_server_config.cert_file: {cert} is not valid before "
                          f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check the "
                          "clock or the certificate")
