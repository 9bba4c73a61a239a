"""The ingress's typed app keys: what handlers may reach, and nothing at import time."""
from __future__ import annotations

from aiohttp import web

from ingress.admission import CustomerLimiter
from ingress.dispatch import Dispatcher
from ingress.registry import Registry
from ingress.requestlog import RequestLog
from ingress.view import StateView
from shared.metrics import IngressMetrics
from shared.settings import IngressSettings

SETTINGS = web.AppKey("ingress_settings", IngressSettings)
REGISTRY = web.AppKey("registry", Registry)
VIEW = web.AppKey("view", StateView)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
REQUEST_LOG = web.AppKey("request_log", RequestLog)
METRICS = web.AppKey("metrics", IngressMetrics)
LIMITER = web.AppKey("limiter", CustomerLimiter)
