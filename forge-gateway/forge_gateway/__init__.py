"""FORGE gateway: app functions over HTTP (Litestar + uvicorn) with JSON-RPC 2.0, OpenAPI, auth and rate limits."""

from .auth import Verifier
from .config import ApiKey, GatewayConfig
from .openapi import build_document

__all__ = ["ApiKey", "GatewayConfig", "Verifier", "build_document"]
