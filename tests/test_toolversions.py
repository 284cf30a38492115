"""Recorded tool versions are the installed distributions' versions, as importlib.metadata reads them."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from llmops.core.toolversions import TOOLS, tool_versions


def test_every_tool_version_is_what_importlib_metadata_says() -> None:
    got = tool_versions(*TOOLS)
    for key, dist in TOOLS.items():
        try:
            expected = version(dist)
        except PackageNotFoundError:
            assert key not in got
            continue
        assert got[key] == expected, key
    assert "llmops" in got and "numpy" in got  # the ones every install has
