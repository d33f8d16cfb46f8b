"""Typed dependencies shared by the API routes: the store, a checked run, the write token."""
from __future__ import annotations

import hmac
from typing import Annotated

import pandas as pd
from fastapi import Depends, Header, HTTPException, Request, Response

from moescope.collector.store import Store, UnknownRun
from moescope.settings import Settings


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


StoreDep = Annotated[Store, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_run(run: str, store: StoreDep) -> str:
    """The `run` path parameter, known to the store (404 otherwise)."""
    try:
        return store.require_run(run)
    except UnknownRun as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None


RunDep = Annotated[str, Depends(get_run)]


def has_token(settings: SettingsDep, authorization: Annotated[str | None, Header()] = None) -> bool:
    """True when no token is configured or the request carries it (reads use it to decide what to reveal)."""
    expected = settings.api_token
    if not expected:
        return True
    scheme, _, given = (authorization or "").partition(" ")
    # Constant-time comparison so the token cannot be guessed byte by byte from timings.
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected.encode())


Authenticated = Annotated[bool, Depends(has_token)]


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def require_token(authenticated: Authenticated, settings: SettingsDep) -> None:
    """Writes need `Authorization: Bearer <api_token>` when a token is configured; reads stay open.

    With no token configured, writes are accepted only from a server bound to loopback:
    on any other address anyone who can reach the port could change alert rules.
    """
    if not settings.api_token and not is_loopback(settings.host):
        raise HTTPException(status_code=403, detail=f"writes are disabled: the server listens on {settings.host} and no "
                                                    "MOESCOPE_API_TOKEN is configured")
    if not authenticated:
        raise HTTPException(status_code=401, detail="missing or wrong bearer token (Authorization: Bearer <MOESCOPE_API_TOKEN>)",
                            headers={"WWW-Authenticate": "Bearer"})


WriteAccess = Depends(require_token)


def records(df: pd.DataFrame) -> Response:
    """A DataFrame as a JSON array of records (NaN -> null, list columns -> arrays)."""
    return Response(content=df.to_json(orient="records", date_format="iso", double_precision=15),
                    media_type="application/json")
