"""Check the Parquet page checksums of a column chunk without decoding its values.

A column chunk is a run of pages, each a Thrift compact-protocol PageHeader followed by
`compressed_page_size` bytes; the header's `crc` field (written with write_page_checksum=True)
is the CRC32 of those bytes as stored (parquet-format PageHeader.crc).  Walking the headers and
running zlib.crc32 over the bodies checks a column without decompressing it, and counts its
values (DataPageHeader.num_values) for a check against the footer.

Only what is needed is parsed: PageHeader fields 1 type, 3 compressed_page_size, 4 crc, and
num_values (field 1) of data_page_header (5), dictionary_page_header (7) and
data_page_header_v2 (8); anything else is skipped by type.
"""
from __future__ import annotations

import zlib

DATA_PAGE, INDEX_PAGE, DICTIONARY_PAGE, DATA_PAGE_V2 = 0, 1, 2, 3
_MAX_DEPTH = 16


class PageError(Exception):
    """A page header that does not parse, or a page whose checksum does not match."""


def _varint(buf, pos: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise PageError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        out |= (b & 0x7F) << shift
        if not b & 0x80:
            return out, pos
        shift += 7


def _zigzag(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


def _skip(buf, pos: int, ttype: int, depth: int) -> int:
    if depth > _MAX_DEPTH:
        raise PageError("nested too deeply")
    if ttype in (1, 2):                   # bool (value in the type nibble; in lists one byte)
        return pos
    if ttype == 3:
        return pos + 1
    if ttype in (4, 5, 6):
        return _varint(buf, pos)[1]
    if ttype == 7:
        return pos + 8
    if ttype == 8:
        n, pos = _varint(buf, pos)
        return pos + n
    if ttype in (9, 10):
        if pos >= len(buf):
            raise PageError("truncated list")
        h = buf[pos]
        pos += 1
        n, et = h >> 4, h & 0x0F
        if n == 15:
            n, pos = _varint(buf, pos)
        for _ in range(n):
            pos = pos + 1 if et in (1, 2) else _skip(buf, pos, et, depth + 1)
            if pos > len(buf):
                raise PageError("truncated list")
        return pos
    if ttype == 11:
        n, pos = _varint(buf, pos)
        if n:
            if pos >= len(buf):
                raise PageError("truncated map")
            kv = buf[pos]
            pos += 1
            for _ in range(n):
                pos = _skip(buf, pos, kv >> 4, depth + 1)
                pos = _skip(buf, pos, kv & 0x0F, depth + 1)
                if pos > len(buf):
                    raise PageError("truncated map")
        return pos
    if ttype == 12:
        return _struct(buf, pos, depth + 1, {})[1]
    raise PageError(f"unknown thrift type {ttype}")


_ABSENT = object()
LENGTH = "length"             # want[fid] = LENGTH: the number of elements of a list field


def _list_header(buf, pos: int) -> tuple[int, int, int]:
    """(elements, element type, position of the first element) of a compact-protocol list."""
    if pos >= len(buf):
        raise PageError("truncated list")
    h = buf[pos]
    pos += 1
    n = h >> 4
    if n == 15:
        n, pos = _varint(buf, pos)
    if n > len(buf):
        raise PageError("list longer than the buffer")
    return n, h & 0x0F, pos


def _struct(buf, pos: int, depth: int, want: dict) -> tuple[dict, int]:
    """Read a struct; `want` maps field id -> None (an i32 to return), a dict (a nested struct
    with its own wanted fields), [dict] (a list of such structs) or LENGTH (a list's length).
    Returns (values, position after the struct)."""
    out: dict = {}
    last = 0
    while True:
        if pos >= len(buf):
            raise PageError("truncated struct")
        b = buf[pos]
        pos += 1
        if b == 0:
            return out, pos
        delta, ttype = b >> 4, b & 0x0F
        if delta:
            fid = last + delta
        else:
            raw, pos = _varint(buf, pos)
            fid = _zigzag(raw)
        last = fid
        w = want.get(fid, _ABSENT)
        if w is None and ttype == 5:
            raw, pos = _varint(buf, pos)
            out[fid] = _zigzag(raw)
        elif isinstance(w, dict) and ttype == 12:
            out[fid], pos = _struct(buf, pos, depth + 1, w)
        elif w is LENGTH and ttype == 9:
            out[fid] = _list_header(buf, pos)[0]
            pos = _skip(buf, pos, ttype, depth)
        elif isinstance(w, list) and ttype == 9:         # [spec]: a list of such structs
            n, et, pos = _list_header(buf, pos)
            if et != 12:
                raise PageError(f"field {fid}: a list of type {et}, not of structs")
            items = []
            for _ in range(n):
                item, pos = _struct(buf, pos, depth + 1, w[0])
                items.append(item)
            out[fid] = items
        else:
            pos = _skip(buf, pos, ttype, depth)


_NUM_VALUES = {1: None}
_PAGE_HEADER = {1: None, 3: None, 4: None, 5: _NUM_VALUES, 7: _NUM_VALUES, 8: _NUM_VALUES}


def check_column_chunk(buf, start: int, size: int) -> int:
    """Walk the pages in buf[start:start+size], checking each page's CRC; returns the number of
    values in its data pages.  PageError if a header does not parse, a page has no checksum,
    a checksum does not match or the pages do not end exactly at the chunk's end."""
    end = start + size
    if start < 0 or end > len(buf):
        raise PageError(f"column chunk {start}..{end} outside the file")
    pos, values = start, 0
    while pos < end:
        hdr, body = _struct(buf, pos, 0, _PAGE_HEADER)
        n = hdr.get(3)
        if n is None or n < 0 or body + n > end:
            raise PageError(f"page at {pos}: bad size")
        crc = hdr.get(4)
        if crc is None:
            raise PageError(f"page at {pos}: no checksum")
        if zlib.crc32(memoryview(buf)[body:body + n]) != crc & 0xFFFFFFFF:
            raise PageError(f"page at {pos}: checksum mismatch")
        ptype = hdr.get(1)
        if ptype in (DATA_PAGE, DATA_PAGE_V2):
            sub = hdr.get(5 if ptype == DATA_PAGE else 8) or {}
            if sub.get(1) is None or sub[1] < 0:
                raise PageError(f"page at {pos}: no value count")
            values += sub[1]
        pos = body + n
    if pos != end:
        raise PageError("pages run past the column chunk")
    return values




def check_row_group_column(buf, rg, c: int) -> None:
    """Check column `c` of row group `rg` (pyarrow RowGroupMetaData) in the file mapped as
    `buf`: every page's CRC, and as many values in the pages as the row group has rows."""
    cc = rg.column(c)
    start = cc.dictionary_page_offset if cc.has_dictionary_page else cc.data_page_offset
    n = check_column_chunk(buf, int(start), int(cc.total_compressed_size))
    if n != rg.num_rows or cc.num_values != rg.num_rows:
        raise PageError(f"{n} values in the pages, {rg.num_rows} rows")


# parquet-format FileMetaData: 2 schema (SchemaElement 3 repetition_type, 5 num_children),
# 4 row_groups (RowGroup 1 columns: ColumnChunk 3 meta_data: ColumnMetaData 16 size_statistics:
# SizeStatistics 2 repetition_level_histogram, 3 definition_level_histogram)
_FOOTER = {2: [{3: None, 5: None}],
           4: [{1: [{3: {16: {2: LENGTH, 3: LENGTH}}}]}]}
REQUIRED, REPEATED = 0, 2


def _leaf_levels(schema: list[dict]) -> list[tuple[int, int]]:
    """(max definition level, max repetition level) of every leaf column, in order."""
    leaves: list[tuple[int, int]] = []
    at = 1

    def walk(children: int, d: int, r: int, depth: int) -> None:
        nonlocal at
        if depth > _MAX_DEPTH or children < 0:
            raise PageError("schema nested too deeply or badly")
        for _ in range(children):
            if at >= len(schema):
                raise PageError("schema has fewer elements than its groups claim")
            el = schema[at]
            at += 1
            rt = el.get(3, REQUIRED)
            dd, rr = d + (rt != REQUIRED), r + (rt == REPEATED)
            if el.get(5):
                walk(el[5], dd, rr, depth + 1)
            else:
                leaves.append((dd, rr))

    if not schema:
        raise PageError("no schema")
    walk(schema[0].get(5) or 0, 0, 0, 0)
    if at != len(schema):
        raise PageError("schema has elements outside its root")
    return leaves


def check_footer(buf) -> None:
    """The structure of a Parquet footer (FileMetaData, compact protocol: `buf` is its bytes)
    that pyarrow would otherwise only check as it builds column metadata, where a mismatch is
    fatal (a C++ exception ends the process: seen with a level histogram of the wrong size):
    every row group has one column chunk per leaf of the schema, and a chunk's level histograms
    are empty or have one entry per level (max level + 1).  PageError if not."""
    md, _end = _struct(buf, 0, 0, _FOOTER)
    leaves = _leaf_levels(md.get(2) or [])
    for g, rg in enumerate(md.get(4) or []):
        cols = rg.get(1) or []
        if len(cols) != len(leaves):
            raise PageError(f"row group {g}: {len(cols)} column chunks, {len(leaves)} columns")
        for c, (chunk, (d, r)) in enumerate(zip(cols, leaves)):
            stats = (chunk.get(3) or {}).get(16) or {}
            for fid, level, what in ((2, r, "repetition"), (3, d, "definition")):
                n = stats.get(fid)
                if n and n != level + 1:         # empty: none (Arrow writes that for level 0)
                    raise PageError(f"row group {g}, column {c}: {what} level histogram of {n} "
                                    f"entries, {level + 1} levels")


def read_footer(path) -> bytes:
    """The footer (FileMetaData) bytes of the Parquet file at `path` (PageError if none)."""
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        size = fh.tell()
        if size < 12:
            raise PageError("too short for a footer")
        fh.seek(size - 8)
        tail = fh.read(8)
        n = int.from_bytes(tail[:4], "little")
        if tail[4:] != b"PAR1" or n <= 0 or n > size - 12:
            raise PageError("no footer")
        fh.seek(size - 8 - n)
        return fh.read(n)


__all__ = ["check_column_chunk", "check_row_group_column", "check_footer", "read_footer",
           "PageError"]
