"""Where files live: a local path or any URI pyarrow reads (s3://, gs://, file://), as one (filesystem, path) pair.

Datasets, catalogs, scan outputs and their reports all go through here, so a bucket works wherever a folder does.
"""

from __future__ import annotations

import posixpath

import pyarrow.fs as pafs


def is_uri(location: str) -> bool:
    return "://" in location


def filesystem_of(location: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem for a URI, or the local one with the path made absolute.

    Raises what pyarrow raises for an unknown scheme or missing credentials (several types); callers that face a
    user word it for them.
    """
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), posixpath.abspath(location)
