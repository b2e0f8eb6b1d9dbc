"""The exporter's files: --config.file (display names) and --web.config.file (TLS, auth).

The web config is the Prometheus exporter-toolkit format, so one file serves node_exporter
and gpuwatch alike, except for what Python's ssl cannot do (refused, naming the key). Every
problem is a ConfigError whose message names the file, the key and the fix, printed as one
line before the exporter exits with status 2.
"""

from __future__ import annotations

import datetime
import re
import ssl
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt

from gpuwatch.yamlfile import YamlFileError, load_mapping, reject_unknown_keys


class ConfigError(YamlFileError):
    """A configuration file the exporter cannot start with."""


def _load_yaml(path: Path) -> dict[str, Any]:
    return load_mapping(path, ConfigError)


def _reject_unknown_keys(path: Path, where: str, data: Mapping[str, Any],
                         known: set[str]) -> None:
    reject_unknown_keys(path, where, data, known, ConfigError)


# -- --config.file ---------------------------------------------------------------------------

def load_display_names(path: Path | None) -> dict[str, str]:
    """The exporter config's display_names: full NVML model name -> short display name,
    e.g. "NVIDIA GeForce RTX 3090": "3090"; empty without a config file."""
    if path is None:
        return {}
    data = _load_yaml(path)
    _reject_unknown_keys(path, "", data, {"display_names"})
    names = data.get("display_names") or {}
    if not isinstance(names, dict) or not all(
            isinstance(k, str) and isinstance(v, (str, int, float)) for k, v in names.items()):
        raise ConfigError(f"{path}: display_names: expected a mapping of model name to short "
                          f'name, e.g. "NVIDIA GeForce RTX 3090": "3090"')
    return {k: str(v) for k, v in names.items()}


# -- --web.config.file -----------------------------------------------------------------------
# The names, values and defaults are exporter-toolkit's (web/tls_config.go, handler.go and
# docs/web-configuration.md). What Python's ssl cannot do as Go's crypto/tls does is refused
# with one line naming the key, never accepted and ignored.

_TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                 "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_CLIENT_AUTH_TYPES = ("NoClientCert", "RequestClientCert", "RequireAnyClientCert",
                      "VerifyClientCertIfGiven", "RequireAndVerifyClientCert")
_TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version",
             "max_version", "cipher_suites", "curve_preferences", "prefer_server_cipher_suites",
             "client_allowed_sans"}

# Go's crypto/tls CipherSuites(), the only names exporter-toolkit accepts, and OpenSSL's names
# for them. Go applies cipher_suites to TLS 1.0-1.2 only: TLS 1.3 suites are not configurable
# there (nor here), so the three TLS 1.3 names are accepted and change nothing.
_TLS12_CIPHERS = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
}
_TLS13_CIPHERS = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384",
                  "TLS_CHACHA20_POLY1305_SHA256"}
# Go's curve names -> OpenSSL's.
_CURVES = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1",
           "X25519": "X25519"}
# exporter-toolkit's extraHTTPHeaders: the only headers that may be set, and for some the only
# values (none: any value). A blank value leaves the header unset.
_HEADERS: dict[str, tuple[str, ...]] = {
    "Strict-Transport-Security": (), "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"), "X-XSS-Protection": (),
    "Content-Security-Policy": ()}
_BCRYPT = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
_MAKE_HASH = "make one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`"


@dataclass(frozen=True)
class WebConfig:
    tls: ssl.SSLContext | None = None
    basic_auth_users: Mapping[str, bytes] = field(default_factory=dict)
    """user -> bcrypt hash."""
    headers: Mapping[str, str] = field(default_factory=dict)
    client_allowed_sans: tuple[str, ...] = ()
    """tls_server_config.client_allowed_sans: a verified client certificate must name one of
    these (DNS, IP, e-mail or URI SAN); empty: any verified certificate. When set, `tls`
    requires a verified client certificate (a client without one fails the check in
    exporter-toolkit too), so the server only has to match the names."""


def load_web_config(path: Path | None, now: datetime.datetime | None = None) -> WebConfig:
    if path is None:
        return WebConfig()
    data = _load_yaml(path)
    _reject_unknown_keys(path, "", data,
                        {"tls_server_config", "basic_auth_users", "http_server_config"})
    hashes = _basic_auth_users(path, data.get("basic_auth_users"))
    headers = _http_server_config(path, data.get("http_server_config"))
    tls = data.get("tls_server_config")
    if not tls:
        return WebConfig(basic_auth_users=hashes, headers=headers)
    context, sans = _tls_context(path, tls, now)
    return WebConfig(tls=context, basic_auth_users=hashes, headers=headers,
                     client_allowed_sans=sans)


def _basic_auth_users(path: Path, users: Any) -> dict[str, bytes]:
    if users is None:
        return {}
    if not isinstance(users, dict):
        raise ConfigError(f"{path}: basic_auth_users: expected a mapping of user to bcrypt hash")
    hashes = {}
    for user, hashed in users.items():
        where = f"{path}: basic_auth_users.{user}"
        if ":" in str(user):
            raise ConfigError(f"{where}: a user name cannot contain ':' in HTTP basic auth; "
                              "rename the user")
        if not isinstance(hashed, str) or not _BCRYPT.fullmatch(hashed):
            raise ConfigError(f"{where}: not a bcrypt hash ($2a$, $2b$ or $2y$, a cost of 04 "
                              f"to 31, then 53 characters of bcrypt base64); {_MAKE_HASH}")
        try:
            # At the lowest cost, so that a cost-18 hash does not delay the start by seconds:
            # the salt is parsed the same way at any cost.
            bcrypt.checkpw(b"", hashed[:4].encode() + b"04" + hashed[6:].encode())
        except ValueError as e:
            raise ConfigError(f"{where}: bcrypt refuses the hash ({e}); {_MAKE_HASH}") from None
        hashes[str(user)] = hashed.encode()
    return hashes


def _http_server_config(path: Path, http: Any) -> dict[str, str]:
    if http is None:
        return {}
    if not isinstance(http, dict):
        raise ConfigError(f"{path}: http_server_config: expected a mapping")
    _reject_unknown_keys(path, "http_server_config: ", http, {"headers", "http2"})
    http2 = http.get("http2", False)
    if not isinstance(http2, bool):
        raise ConfigError(f"{path}: http_server_config.http2: expected true or false, got "
                          f"{http2!r}")
    if http2:
        # exporter-toolkit's default; accepting it would claim HTTP/2 the server cannot speak
        raise ConfigError(f"{path}: http_server_config.http2: gpuwatch-exporter serves "
                          "HTTP/1.1 only; set http2: false or remove the key")
    headers = http.get("headers")
    if headers is None:
        return {}
    if not isinstance(headers, dict):
        raise ConfigError(f"{path}: http_server_config.headers: expected a mapping of header "
                          f"name to value, e.g. X-Frame-Options: deny; got "
                          f"{type(headers).__name__}")
    result = {}
    for name, value in headers.items():
        where = f"{path}: http_server_config.headers.{name}"
        if name not in _HEADERS:
            spelled = next((h for h in _HEADERS if h.lower() == str(name).lower()), None)
            fix = f"write it {spelled}" if spelled else f"only {', '.join(_HEADERS)} can be set"
            raise ConfigError(f"{where}: this header cannot be configured; {fix}")
        if value is None:
            continue
        if not isinstance(value, str) or "\r" in value or "\n" in value:
            raise ConfigError(f"{where}: expected one line of text, got {value!r}")
        if value and _HEADERS[name] and value not in _HEADERS[name]:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(_HEADERS[name])}")
        if value:
            result[name] = value
    return result


def _tls_context(path: Path, tls: Any, now: datetime.datetime | None
                 ) -> tuple[ssl.SSLContext, tuple[str, ...]]:
    """The server's SSLContext and client_allowed_sans of tls_server_config."""
    if not isinstance(tls, dict):
        raise ConfigError(f"{path}: tls_server_config: expected a mapping")
    _reject_unknown_keys(path, "tls_server_config: ", tls, _TLS_KEYS)
    base = path.parent
    prefix = f"{path}: tls_server_config."

    def file(key: str) -> tuple[Path, bytes]:
        value = tls.get(key)
        if not value:
            raise ConfigError(f"{prefix}{key} is required")
        if not isinstance(value, str):
            raise ConfigError(f"{prefix}{key}: expected a file name, got {value!r}")
        resolved = (base / value).resolve()
        if not resolved.is_file():
            raise ConfigError(f"{prefix}{key}: {resolved} does not exist")
        try:
            return resolved, resolved.read_bytes()
        except OSError as e:
            raise ConfigError(f"{prefix}{key}: cannot read {resolved}: {e.strerror}; let the "
                              "exporter's user read it") from None

    def choice(key: str, default: str, allowed: Collection[str]) -> str:
        value = tls.get(key, default)
        if not isinstance(value, str) or value not in allowed:
            raise ConfigError(f"{prefix}{key}: {value!r} is not one of {', '.join(allowed)}")
        return str(value)

    def names(key: str) -> list[str]:
        value = tls.get(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{prefix}{key}: expected a list of names, got {value!r}")
        if not value:
            raise ConfigError(f"{prefix}{key}: the list is empty; list names or remove the key")
        return value

    (cert, cert_pem), (key, _) = file("cert_file"), file("key_file")
    _check_not_expired(path, cert, cert_pem, now or datetime.datetime.now(datetime.timezone.utc))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # an empty password: an encrypted key fails here instead of prompting on a terminal
        context.load_cert_chain(cert, key, password=b"")
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"{prefix}key_file: cannot load {cert} with {key}: {e}; check that "
                          "the key belongs to the certificate and is not encrypted") from e

    minimum = _TLS_VERSIONS[choice("min_version", "TLS12", _TLS_VERSIONS)]
    maximum = _TLS_VERSIONS[choice("max_version", "TLS13", _TLS_VERSIONS)]
    if minimum > maximum:
        raise ConfigError(f"{prefix}min_version is above max_version; lower min_version or "
                          "raise max_version")
    context.minimum_version, context.maximum_version = minimum, maximum

    ciphers = names("cipher_suites")
    for name in ciphers:
        if name not in _TLS12_CIPHERS and name not in _TLS13_CIPHERS:
            raise ConfigError(
                f"{prefix}cipher_suites: {name!r} is not one of Go's crypto/tls CipherSuites() "
                f"(the names exporter-toolkit accepts): {', '.join(_TLS12_CIPHERS)}, "
                f"{', '.join(sorted(_TLS13_CIPHERS))}")
    tls12 = [_TLS12_CIPHERS[name] for name in ciphers if name in _TLS12_CIPHERS]
    if ciphers and not tls12 and minimum < ssl.TLSVersion.TLSv1_3:
        raise ConfigError(f"{prefix}cipher_suites: lists only TLS 1.3 suites, which cannot be "
                          "configured (they are always on); add TLS 1.2 suites or set "
                          "min_version: TLS13")
    if tls12:
        try:
            context.set_ciphers(":".join(tls12))
        except ssl.SSLError as e:
            raise ConfigError(f"{prefix}cipher_suites: this OpenSSL refuses all of them ({e}); "
                              "list others or remove the key") from None

    prefer = tls.get("prefer_server_cipher_suites", True)
    if not isinstance(prefer, bool):
        raise ConfigError(f"{prefix}prefer_server_cipher_suites: expected true or false, got "
                          f"{prefer!r}")
    if prefer:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE

    curves = names("curve_preferences")
    for name in curves:
        if name not in _CURVES:
            raise ConfigError(f"{prefix}curve_preferences: {name!r} is not one of "
                              f"{', '.join(_CURVES)}")
    if len(curves) > 1:
        # SSLContext.set_ecdh_curve sets one group; Python 3.11 has no way to set a list
        raise ConfigError(f"{prefix}curve_preferences: Python's ssl can offer only one curve; "
                          f"list one of {', '.join(curves)}, or remove the key for OpenSSL's "
                          "defaults (X25519, P-256, P-384, P-521 and others)")
    if curves:
        context.set_ecdh_curve(_CURVES[curves[0]])

    sans = tuple(names("client_allowed_sans"))
    auth = choice("client_auth_type", "NoClientCert", _CLIENT_AUTH_TYPES)
    has_ca = "client_ca_file" in tls
    if auth == "NoClientCert" and has_ca:
        raise ConfigError(f"{prefix}client_ca_file is set but client_auth_type is NoClientCert; "
                          "set client_auth_type: RequireAndVerifyClientCert or remove "
                          "client_ca_file")
    if auth == "RequireAnyClientCert":
        raise ConfigError(f"{prefix}client_auth_type: RequireAnyClientCert (a certificate "
                          "required but never verified) is not possible with Python's ssl; use "
                          "RequireAndVerifyClientCert with client_ca_file naming the CA of the "
                          "client certificates")
    verifying = auth in ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert")
    if sans and not verifying:
        raise ConfigError(f"{prefix}client_allowed_sans needs a verified client certificate; "
                          "set client_auth_type: RequireAndVerifyClientCert and client_ca_file")
    if verifying and not has_ca:
        raise ConfigError(f"{prefix}client_auth_type {auth} needs client_ca_file (the CA that "
                          "signs the client certificates)")
    if has_ca:
        _load_client_ca(context, prefix, *file("client_ca_file"))
    # RequestClientCert: Go asks for a certificate and neither requires nor verifies it, and
    # exporter-toolkit never reads it; Python cannot ask without verifying, so no certificate
    # is asked for. Every client Go lets in gets in, with or without a certificate.
    # client_allowed_sans with VerifyClientCertIfGiven: a client without a certificate fails
    # exporter-toolkit's SAN check, so a certificate is required.
    context.verify_mode = (ssl.CERT_REQUIRED if auth == "RequireAndVerifyClientCert" or sans
                           else ssl.CERT_OPTIONAL if auth == "VerifyClientCertIfGiven"
                           else ssl.CERT_NONE)
    return context, sans


def _load_client_ca(context: ssl.SSLContext, prefix: str, ca: Path, pem: bytes) -> None:
    from cryptography import x509

    try:
        x509.load_pem_x509_certificates(pem)
    except ValueError:
        holds = " (it holds a private key)" if b"PRIVATE KEY-----" in pem else ""
        raise ConfigError(f"{prefix}client_ca_file: {ca} holds no PEM certificate{holds}; it "
                          "must hold the certificate of the CA that signs the client "
                          "certificates") from None
    try:
        context.load_verify_locations(cafile=ca)
    except ssl.SSLError as e:
        raise ConfigError(f"{prefix}client_ca_file: cannot load {ca}: {e}; it must hold the "
                          "PEM certificate of the CA that signs the client certificates"
                          ) from None


def _check_not_expired(path: Path, cert: Path, pem: bytes, now: datetime.datetime) -> None:
    from cryptography import x509

    try:
        certificate = x509.load_pem_x509_certificate(pem)
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
