"""Dataset sources: where a stage's labelled images come from.

Built-in types: ``ham10000`` (:class:`Ham10000Source`), ``coco`` (:class:`CocoSource`) and
``folder`` (:class:`FolderSource`) and ``outliers`` (:class:`OutlierSource`, generated negatives for outlier
exposure). A plugin adds a type by subclassing :class:`Source` and
registering the class through the ``register_sources`` hook (docs/plugins.md).
"""
from __future__ import annotations

from hierarchy.data.sources.base import Source, scan_images
from hierarchy.data.sources.coco import CocoSource
from hierarchy.data.sources.folder import FolderSource
from hierarchy.data.sources.ham10000 import Ham10000Source
from hierarchy.data.sources.outliers import OutlierSource
from hierarchy.data.sources.items import (PROBLEM_KINDS, Item, Problems, check_labels, dedupe, meta_columns,
                                          subsample, verify)
from hierarchy.data.sources.table import (parse_source, register_source_type, source_type_name,
                                          source_type_problem, source_types, unregister_source_type)

BUILTIN_SOURCES = (CocoSource, FolderSource, Ham10000Source, OutlierSource)
for _cls in BUILTIN_SOURCES:
    register_source_type(_cls)

__all__ = ["BUILTIN_SOURCES", "PROBLEM_KINDS", "CocoSource", "FolderSource", "Ham10000Source", "Item", "OutlierSource", "Problems",
           "Source", "check_labels", "dedupe", "meta_columns", "parse_source", "register_source_type", "scan_images",
           "source_type_name", "source_type_problem", "source_types", "subsample", "unregister_source_type",
           "verify"]
