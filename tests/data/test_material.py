"""Where the real material is cached."""
from __future__ import annotations

from pathlib import Path

from megatron_hdpissa.data import material

REPO = Path(__file__).resolve().parents[2]


def test_source_checkout_caches_under_the_repository(monkeypatch):
    # The README promises `.cache/` next to setup.py; the module sits two folders below it.
    monkeypatch.delenv(material.CACHE_ENV, raising=False)
    assert material.cache_dir() == REPO / ".cache"


def test_cache_env_wins(monkeypatch, tmp_path):
    monkeypatch.setenv(material.CACHE_ENV, str(tmp_path / "c"))
    assert material.cache_dir() == tmp_path / "c"
    assert (tmp_path / "c").is_dir()
