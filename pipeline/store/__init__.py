"""The run store: the one owner of a run directory's format (local path or fsspec URL).

    layout    every path of a run, and atomic small writes        (RunDir)
    manifest  the typed manifest                                   (Manifest, load/save)
    lock      one writer per run                                   (writing)
    writer    parts, projections, thumbnails, regions, head tables, each committed by a marker
    reader    Run: checked reads, and `verify`                     (open_run)

Other modules never build a run path or read a manifest key: they call these."""

from pipeline.store.layout import FORMAT, RunDir, head_name, layout_name, part_name
from pipeline.store.lock import writing
from pipeline.store.manifest import (AttentionRules, ExtractionState, Manifest, ModelInfo, StoreError, is_run,
                                     load_manifest)
from pipeline.store.reader import Damage, Run, open_run
from pipeline.store.writer import (SEQUENCE_SCHEMA, TOKEN_SCHEMA, PartWriter, VectorSpec, check_writable,
                                   collect_garbage, commit_part, committed_head_layers, committed_parts,
                                   committed_projection, committed_projections, create_run, leftovers, mark_damaged,
                                   mark_extraction_complete, part_damage, projection_damage, recover, staging_for,
                                   swap_in, trim_heap, update_manifest, write_head_layer, write_head_tables,
                                   write_projection, write_regions, write_thumbnail)

__all__ = [
    "FORMAT", "RunDir", "head_name", "layout_name", "part_name", "writing", "AttentionRules", "ExtractionState",
    "Manifest", "ModelInfo", "StoreError", "is_run", "load_manifest", "Damage", "Run", "open_run",
    "SEQUENCE_SCHEMA", "TOKEN_SCHEMA", "PartWriter", "VectorSpec", "check_writable", "collect_garbage",
    "commit_part", "committed_head_layers", "committed_projection", "committed_parts", "committed_projections",
    "create_run", "leftovers", "mark_damaged", "mark_extraction_complete", "part_damage", "projection_damage",
    "recover", "staging_for", "swap_in", "trim_heap", "update_manifest", "write_head_layer", "write_head_tables",
    "write_projection", "write_regions", "write_thumbnail",
]
