"""Only `pipeline/store/` builds run paths or reads manifest keys (issue 8): every other module
asks the store. This scans the source for the primitives that would do it by hand."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BY_HAND = re.compile(
    r"url_of\(|\.dir\.path\(|\brun\.path\(|read_json\(|write_json\(|(?:run|dir)\.(?:read|write)_bytes\(|"
    r"manifest\.json|\w+\.zarr\b|manifest\[|manifest\.get\(|\.dir\.fs\.|\brun\.fs\.")


def places_outside_the_store() -> list[str]:
    hits = []
    for folder in ("pipeline", "viz", "workflows"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.is_relative_to(ROOT / "pipeline" / "store"):
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if BY_HAND.search(line.split("#")[0]):
                    hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    return hits


def test_no_module_outside_the_store_builds_run_paths_or_reads_manifest_keys():
    assert places_outside_the_store() == []


def test_the_scan_finds_what_it_looks_for(tmp_path):
    assert BY_HAND.search('run.dir.read_json("manifest.json")')
    assert BY_HAND.search('zarr.open_group(run.dir.url_of("vectors.zarr"))')
    assert BY_HAND.search('spec = run.manifest["config"]["data"]')
    assert not BY_HAND.search("run.head_measurements()")
