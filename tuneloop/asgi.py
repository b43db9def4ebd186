"""ASGI factory for uvicorn (``--factory``): settings are read from the environment here, in
the process that serves, never at import time."""

from __future__ import annotations

from fastapi import FastAPI

from api.app import create_app
from core.settings import ApiSettings


def app_from_env() -> FastAPI:
    return create_app(ApiSettings())
