"""The result layer: what every entrance returns, and the version of its JSON form.

``SCHEMA_VERSION`` is written as ``schema_version`` into every ``--json`` object; it changes
when a key is renamed or removed or its meaning changes (adding keys does not change it).
"""
from __future__ import annotations

SCHEMA_VERSION = 1
