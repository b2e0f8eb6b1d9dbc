"""The one rendering of alertmanager.yml: the repository's prometheus/alertmanager/alertmanager.yml
with the receivers of a deployment. The gpuwatch_alertmanager role calls it as the filter
`gpuwatch_alertmanager_config`; the local stack of the demo and the tests (tools/localstack.py)
imports this file and calls `alertmanager_config` with its own receivers.

Alertmanager has no includes, so the map of users (Unix user name -> e-mail address and/or
webhook URL) is rendered into the file: one receiver `user-NAME` per user, and one route to it
under the base's audience="user" route. Everything in the map comes from an inventory, so it
is checked here, and a bad entry stops the rendering with one line naming the entry and the
fix (ValueError), before Alertmanager ever reads the file.

Plain Python without Ansible imports (Ansible's data arrives as dicts, lists and strings).
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from typing import Any

USER_ROUTE_MATCHERS = ['audience="user"']
"""The base route that holds the users' routes (and sends the alerts of users without an
entry to the admins)."""
ADMINS = "admins"
"""The base's receiver for the admins."""
USER_RECEIVER = "user-{name}"
"""The receiver of one user."""

KEYS = ("email", "webhook_url")
"""What an entry of the map may hold (one of them at least)."""
USER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
"""A Unix user name as the nodes' accounts have them (POSIX's portable characters, as
useradd's relaxed rules and LDAP directories allow: j.doe, svc_ml, Alice); the name goes into
a matcher and a receiver name, so nothing else."""
EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@"
                   r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                   r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
"""One plain address (no display name, no list: a comma would add recipients)."""
MAX_URL = 2048
TIMINGS = ("group_wait", "group_interval", "repeat_interval")
DURATION = re.compile(r"(?:[0-9]+(?:ms|s|m|h|d|w|y))+")
"""Alertmanager's duration format (1h30m, 24h, 500ms)."""
SMTP = ("smtp_smarthost", "smtp_from")
"""The global settings without which Alertmanager cannot send e-mail."""

SEND_RESOLVED = {"user": False, "admins": True}
"""Users get one message per episode (nothing when they give the GPU back); the admins also
hear when the hardware is well again."""


def _plain(value: Any) -> Any:
    """A deep copy as dicts, lists and scalars (whatever container types came in)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _merged(base: Any, changes: Any) -> Any:
    """`changes` merged into `base`: mappings key by key, all else replaced."""
    if not (isinstance(base, dict) and isinstance(changes, Mapping)):
        return _plain(changes)
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = _merged(merged[key], value) if key in merged else _plain(value)
    return merged


def _routes(route: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """`route` and every route below it."""
    yield route  # type: ignore[misc]
    for child in route.get("routes") or []:
        yield from _routes(child)


def _email(value: object, key: str) -> str:
    if not (isinstance(value, str) and len(value) <= 254 and EMAIL.fullmatch(value)):
        raise ValueError(f"{key}: {value!r} is not an e-mail address; give one plain address "
                         f"such as alice@example.org (no name, no list)")
    return value


def _url(value: object, key: str) -> str:
    parsed = urllib.parse.urlsplit(value) if isinstance(value, str) else None
    if (parsed is None or not isinstance(value, str) or parsed.scheme not in ("http", "https")
            or not parsed.hostname or len(value) > MAX_URL
            or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value)):
        raise ValueError(f"{key}: {value!r} is not an http(s) URL; give the webhook's address "
                         f"such as https://chat.example.org/hooks/abc")
    try:
        parsed.port  # noqa: B018 (a port that is not a number raises here)
    except ValueError:
        raise ValueError(f"{key}: {value!r} has a bad port; give the webhook's address such "
                         f"as https://chat.example.org/hooks/abc") from None
    return value


def _configs(entry: object, key: str, audience: str) -> dict[str, list[dict[str, Any]]]:
    """The receiver settings of one entry of the map ({"email": ..., "webhook_url": ...})."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"{key}: not a mapping; give {{email: ADDRESS}} and/or "
                         f"{{webhook_url: URL}}")
    unknown = sorted(str(k) for k in entry if k not in KEYS)
    if unknown:
        raise ValueError(f"{key}: unknown key {', '.join(map(repr, unknown))}; an entry takes "
                         f"{' and/or '.join(KEYS)}")
    if not any(entry.get(k) for k in KEYS):
        raise ValueError(f"{key}: neither {' nor '.join(KEYS)} is set; give at least one")
    resolved = SEND_RESOLVED[audience]
    configs: dict[str, list[dict[str, Any]]] = {}
    if entry.get("email"):
        configs["email_configs"] = [{"to": _email(entry["email"], f"{key}.email"),
                                     "send_resolved": resolved}]
    if entry.get("webhook_url"):
        configs["webhook_configs"] = [{"url": _url(entry["webhook_url"], f"{key}.webhook_url"),
                                       "send_resolved": resolved}]
    return configs


def _timings(timings: Mapping[str, Any], key: str) -> dict[str, str]:
    unknown = sorted(str(k) for k in timings if k not in TIMINGS)
    if unknown:
        raise ValueError(f"{key}: unknown setting {', '.join(map(repr, unknown))}; it takes "
                         f"{', '.join(TIMINGS)}")
    for name, value in timings.items():
        if not (isinstance(value, str) and DURATION.fullmatch(value)):
            raise ValueError(f"{key}.{name}: {value!r} is not a duration; give one such as "
                             f"30s, 5m or 24h")
    return dict(timings)


def alertmanager_config(base: Mapping[str, Any], users: Mapping[str, Any] | None,
                        admins: Mapping[str, Any] | None, *,
                        timings: Mapping[str, Any] | None = None,
                        global_settings: Mapping[str, Any] | None = None,
                        users_key: str = "users", admins_key: str = "admins",
                        global_key: str = "global_settings") -> dict[str, Any]:
    """alertmanager.yml from the repository's `base` (parsed):

    - `admins` ({email: ADDRESS, webhook_url: URL}, either or both; empty: alerts only show
      in Alertmanager's UI) as the configs of the receiver ADMINS;
    - for every user NAME of `users` (a Unix user name -> the same shape), a receiver
      `user-NAME` and a route to it (matchers user="NAME", audience="user") first under the
      route whose matchers are USER_ROUTE_MATCHERS, so the users without an entry fall through
      to that route's receiver;
    - `timings` (group_wait, group_interval, repeat_interval) in place of those settings
      wherever the base sets them, the top route included (a short run's intervals);
    - `global_settings` merged into `global` (smtp_smarthost, smtp_from, ...: needed once
      there is an e-mail address).

    `users_key`, `admins_key` and `global_key` are how the errors name the two maps and the
    global settings (the inventory's variables). Raises ValueError, one line naming the
    entry and the fix, for a user name that is not a Unix user name, an e-mail address or URL
    that is not one, an entry with unknown keys or none, e-mail without an SMTP server, or a
    base without the routes and receiver above.
    """
    config: dict[str, Any] = _plain(base)
    route = config.get("route")
    if not isinstance(route, dict):
        raise ValueError("alertmanager.yml has no route; restore it from "
                         "prometheus/alertmanager/alertmanager.yml")
    holder = next((r for r in _routes(route) if r.get("matchers") == USER_ROUTE_MATCHERS), None)
    if holder is None:
        raise ValueError(f"alertmanager.yml has no route with matchers {USER_ROUTE_MATCHERS} "
                         f"to hold the users' routes; restore it from "
                         f"prometheus/alertmanager/alertmanager.yml")
    receivers = config.get("receivers") or []
    admins_receiver = next((r for r in receivers if r.get("name") == ADMINS), None)
    if admins_receiver is None:
        raise ValueError(f"alertmanager.yml has no receiver {ADMINS!r}; restore it from "
                         f"prometheus/alertmanager/alertmanager.yml")
    if admins is not None and not isinstance(admins, Mapping):
        raise ValueError(f"{admins_key}: not a mapping; give {{email: ADDRESS}} and/or "
                         f"{{webhook_url: URL}}")
    if admins:
        for kind, configs in _configs(admins, admins_key, "admins").items():
            admins_receiver[kind] = [*(admins_receiver.get(kind) or []), *configs]
    if users is not None and not isinstance(users, Mapping):
        raise ValueError(f"{users_key}: not a mapping; give one entry per user, "
                         f"NAME: {{email: ADDRESS}} and/or {{webhook_url: URL}}")
    taken = {r.get("name") for r in receivers}
    routes = []
    for name in sorted(users or {}, key=str):
        if not (isinstance(name, str) and USER_NAME.fullmatch(name)):
            raise ValueError(f"{users_key}: {name!r} is not a Unix user name; use the name the "
                             f"person logs in with on the nodes (letters, digits, '_', '.', "
                             f"'-', not starting with a digit, '.' or '-'; at most 32)")
        key = f"{users_key}.{name}"
        receiver = USER_RECEIVER.format(name=name)
        if receiver in taken:
            raise ValueError(f"{key}: the base already has a receiver {receiver!r}; remove it "
                             f"from alertmanager.yml")
        receivers.append({"name": receiver, **_configs((users or {})[name], key, "user")})
        routes.append({"matchers": [f'user="{name}"', *USER_ROUTE_MATCHERS],
                       "receiver": receiver})
    holder["routes"] = [*routes, *(holder.get("routes") or [])]
    if not holder["routes"]:
        del holder["routes"]
    config["receivers"] = receivers
    if timings:
        changed = _timings(timings, "timings")
        for r in _routes(route):
            for name, value in changed.items():
                if r is route or name in r:
                    r[name] = value
    if global_settings:
        config = {"global": _merged(config.pop("global", None) or {}, global_settings),
                  **config}
    if any("email_configs" in r for r in receivers):
        missing = [k for k in SMTP if not (config.get("global") or {}).get(k)]
        if missing:
            raise ValueError(f"an e-mail address is given but no {' or '.join(missing)}; set "
                             f"the SMTP server and sender ({', '.join(SMTP)}) in {global_key}")
    return config


class FilterModule:
    """gpuwatch_alertmanager_config."""

    def filters(self) -> dict[str, Callable[..., Any]]:
        return {"gpuwatch_alertmanager_config": alertmanager_config}
