"""Entry point of this plugin set (group ``branchadapt``): registers its implementations."""

from __future__ import annotations
