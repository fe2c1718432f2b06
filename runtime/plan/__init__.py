"""The plan format's one owner: its names (`names`), the typed, validated manifest (`Plan`), and the
plan folder on disk (`files`: reading, checksums, the manifest writer, atomic staging).
docs/ARCHITECTURE.md describes the format."""

from .files import load_manifest, load_plan
from .manifest import Plan

__all__ = ["Plan", "load_manifest", "load_plan"]
