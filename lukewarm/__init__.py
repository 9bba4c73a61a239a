"""Lukewarm for people and programs: the ``lukewarm`` command line, ``lukewarm dev``, and a Python client.

Sits above the daemons (``ingress``, ``runtime_proxy``) and ``shared``, which import nothing from here.
"""
from lukewarm.client import Client, LukewarmError

__all__ = ["Client", "LukewarmError"]
