"""The tenant dashboard, served by the API under ``/dashboard``."""

from api.dashboard.pages import STATIC_DIR, router

__all__ = ["STATIC_DIR", "router"]
