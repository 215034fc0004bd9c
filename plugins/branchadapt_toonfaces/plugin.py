"""Entry point of this plugin set (group ``branchadapt``): registers its implementations."""

from __future__ import annotations

from branchadapt.hookspecs import Register, hookimpl


@hookimpl
def register_backbones(register: Register) -> None:
    """The identity encoder judge, usable as the face-ID recognizer on toonfaces data."""
    from .judges import IdentityEncoder

    register(IdentityEncoder, name="toonfaces_id")
