"""Every example configuration in configs/ validates."""

from pathlib import Path

import pytest

from pipeline.config import load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_is_valid(path):
    config = load_config(path)
    assert config.extract.model and config.extract.out
