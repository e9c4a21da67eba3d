"""OpenVDB files of sparse float grids: the subset of the format that sparse adapters need.

One `FloatGrid` per module name; a voxel (x, y, z) is (row, col, layer) of a weight delta. The tree is
OpenVDB's standard `Tree4<float, 5, 4, 3>`: root -> internal 32^3 -> internal 16^3 -> leaf 8^3, so
the nodes below the root cover 4096^3, 128^3 and 8^3 voxels. Layout of a file (little-endian; as
OpenVDB 10 writes it, file format version 224; io/Archive.cc, GridDescriptor.cc, tree/*.h):

    header      int64 magic 0x56444220 ("VDB "), uint32 file_version, uint32 library major, minor,
                uint8 has_grid_offsets, char[36] uuid (ASCII, with dashes)
    MetaMap     uint32 count, then per item: string name, string type_name, uint32 size, value bytes
    uint32 grid_count, then per grid:
      descriptor  string unique_name, string grid_type ("Tree_float_5_4_3", plus "_HalfFloat" when
                  saved as half), string instance_parent, int64 grid_pos, block_pos, end_pos
      uint32 compression flags (COMPRESS_ZIP 1 | ACTIVE_MASK 2 | BLOSC 4), MetaMap grid metadata,
      transform (string map type, then the map's doubles), int32 buffer_count (1)
      topology    root: float background, uint32 num_tiles, num_children, tiles (int32[3] origin,
                  float value, uint8 active), children (int32[3] origin, internal 32^3 topology);
                  internal: child_mask, value_mask, compressed values (one per slot), child
                  topologies in mask order; leaf: value_mask
      buffers     per leaf, root children in origin order: value_mask, compressed values (8^3)

A string is uint32 length + bytes; a mask is uint64 words, bit n = slot n; slot n of a node holds
local (x, y, z) with n = (x * dim + y) * dim + z. Compressed values (io/Compression.h) start with
an int8 per-node code saying how the inactive values are rebuilt (background, -background, one or
two stored floats, a selection mask); with ACTIVE_MASK only active values follow, else all. The
values are float32, or float16 when saved as half; with ZIP or BLOSC they are an int64 size plus a
zlib / blosc chunk (a size <= 0 means -size raw bytes).

Limits: FloatGrids with the 5-4-3 tree only; blosc needs the optional `blosc` package; active
tiles are expanded to voxels up to `max_tile_voxels`; inactive voxels (whatever their value) and
the transform are dropped on read (we always write the identity, voxel size 1). Our writer writes
leaf voxels only, never tiles, and float metadata as double (np.float32 values as "float").
"""

from __future__ import annotations

import os
import struct
import uuid
import zlib
from dataclasses import dataclass, field

import numpy as np

from hyprjax.errors import HyprjaxError

MAGIC = 0x56444220
FILE_VERSION = 224  # OpenVDB 10's OPENVDB_FILE_VERSION (MULTIPASS_IO)
MIN_FILE_VERSION, MAX_FILE_VERSION = 222, 225  # per-grid compression (NODE_MASK_COMPRESSION) .. HALF_GRID
LIBRARY_VERSION = (10, 0)
TREE_TYPE, HALF_SUFFIX, SEP = "Tree_float_5_4_3", "_HalfFloat", "\x1e"
COMPRESS_ZIP, COMPRESS_ACTIVE_MASK, COMPRESS_BLOSC = 0x1, 0x2, 0x4
COMPRESSIONS = {"none": 0, "active_mask": COMPRESS_ACTIVE_MASK, "zip": COMPRESS_ZIP | COMPRESS_ACTIVE_MASK,
                "blosc": COMPRESS_BLOSC | COMPRESS_ACTIVE_MASK, "zip_only": COMPRESS_ZIP, "blosc_only": COMPRESS_BLOSC}
# Per-node codes (io/Compression.h): NO_MASK_OR_INACTIVE_VALS, NO_MASK_AND_MINUS_BG,
# NO_MASK_AND_ONE_INACTIVE_VAL, MASK_AND_NO_INACTIVE_VALS, MASK_AND_ONE_INACTIVE_VAL,
# MASK_AND_TWO_INACTIVE_VALS, NO_MASK_AND_ALL_VALS.
NO_MASK_OR_INACTIVE_VALS, NO_MASK_AND_ALL_VALS = 0, 6
LOG2 = {2: 5, 1: 4, 0: 3}  # log2 of each node's dim, by level (2: internal 32^3, 1: internal 16^3, 0: leaf)
TOTAL = {2: 12, 1: 7, 0: 3}  # log2 of the voxels a node spans per axis
MAP_BYTES = {"UniformScaleMap": 120, "ScaleMap": 120, "UniformScaleTranslateMap": 144,
             "ScaleTranslateMap": 144, "TranslationMap": 24, "AffineMap": 128, "UnitaryMap": 128}
# Grid metadata OpenVDB keeps itself: read into VdbGrid fields, or file statistics it rewrites on save.
RESERVED = {"name", "class", "is_saved_as_half_float", "file_bbox_min", "file_bbox_max",
            "file_compression", "file_mem_bytes", "file_voxel_count", "file_delayed_load"}
SCALARS = {"bool": "?", "int8": "b", "uint8": "B", "int16": "h", "uint16": "H", "int32": "i",
           "uint32": "I", "int64": "q", "float": "f", "double": "d"}
VECS = {f"vec{n}{t}": (n, c) for n in (2, 3, 4) for t, c in (("i", "i"), ("s", "f"), ("d", "d"))}


class VdbError(HyprjaxError):
    """A VDB file that is truncated, corrupt, or uses a feature this reader does not support."""


@dataclass
class VdbGrid:
    """One FloatGrid: its active voxels, values and metadata."""

    name: str
    coords: np.ndarray  # i32[n, 3] active voxel coordinates (x, y, z), any order, unique
    values: np.ndarray  # f32[n]
    metadata: dict = field(default_factory=dict)  # str, int (int64), float (double), bool, 2-4 tuples
    background: float = 0.0
    grid_class: str = "unknown"  # OpenVDB's "class" metadata: unknown, level set, fog volume, staggered


# ---------------------------------------------------------------- metadata (MetaMap)

def _meta_item(key: str, value) -> tuple[str, bytes]:
    """(type_name, value bytes) of one metadata value."""
    if isinstance(value, (bool, np.bool_)):
        return "bool", struct.pack("<?", bool(value))
    if isinstance(value, (int, np.integer)):
        return "int64", struct.pack("<q", int(value))
    if isinstance(value, np.float32):
        return "float", struct.pack("<f", value)
    if isinstance(value, (float, np.floating)):
        return "double", struct.pack("<d", float(value))
    if isinstance(value, str):
        return "string", value.encode()
    if isinstance(value, (tuple, list)) and 2 <= len(value) <= 4:
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
            return f"vec{len(value)}i", struct.pack(f"<{len(value)}i", *value)
        if all(isinstance(v, (int, float, np.integer, np.floating)) for v in value):
            return f"vec{len(value)}d", struct.pack(f"<{len(value)}d", *value)
    raise TypeError(f"metadata[{key!r}] = {value!r}: expected str, int, float, bool or a 2-4 tuple of numbers")


def _pack_metamap(meta: dict) -> bytes:
    out = [struct.pack("<I", len(meta))]
    for key, value in meta.items():
        if not isinstance(key, str):
            raise TypeError(f"metadata key {key!r}: expected a str")
        try:
            type_name, raw = _meta_item(key, value)
        except struct.error as e:  # an int past int64, or a vec's past int32
            raise ValueError(f"metadata[{key!r}] = {value!r} is out of range ({e})") from None
        out += [_pack_string(key), _pack_string(type_name), struct.pack("<I", len(raw)), raw]
    return b"".join(out)


def _pack_string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<I", len(raw)) + raw


# ---------------------------------------------------------------- node values (io/Compression.h)

def _pack_data(values: np.ndarray, flags: int, half: bool) -> bytes:
    """writeData / HalfWriter: the values, zip- or blosc-compressed behind an int64 size."""
    if half and values.size == 0:
        return b""  # HalfWriter writes nothing at all for an empty array
    return _pack_raw(values.astype("<f2" if half else "<f4").tobytes(), flags, half)


def _pack_raw(raw: bytes, flags: int, half: bool) -> bytes:
    """`_pack_data` of values already laid out as little-endian f32 (f16 when half) bytes."""
    if half and not raw:
        return b""
    if flags & COMPRESS_BLOSC:  # bloscToStream: typesize = the element's size, level 9, shuffle, lz4
        packed = _blosc().compress(raw, typesize=2 if half else 4, clevel=9, cname="lz4") if raw else b""
        return struct.pack("<q", len(packed)) + packed  # an empty chunk reads as 0 raw bytes
    if flags & COMPRESS_ZIP:
        packed = zlib.compress(raw)  # zipToStream: Z_DEFAULT_COMPRESSION; -size + raw when it does not shrink
        return struct.pack("<q", len(packed)) + packed if len(packed) < len(raw) else struct.pack("<q", -len(raw)) + raw
    return raw


def _pack_values(values: np.ndarray, value_mask: np.ndarray, flags: int, half: bool) -> bytes:
    """writeCompressedValues for a node whose inactive slots all hold the background (or a child)."""
    if flags & COMPRESS_ACTIVE_MASK:  # MaskCompress finds one inactive value, the background
        return bytes([NO_MASK_OR_INACTIVE_VALS]) + _pack_data(values[value_mask], flags, half)
    return bytes([NO_MASK_AND_ALL_VALS]) + _pack_data(values, flags, half)


def _blosc():
    try:
        import blosc
    except ImportError:
        raise VdbError("blosc compression needs the optional `blosc` package (pip install blosc)") from None
    return blosc


# ---------------------------------------------------------------- writer

def _pack_mask(slots: np.ndarray, size: int) -> bytes:
    bits = np.zeros(size, bool)
    bits[slots] = True
    return np.packbits(bits, bitorder="little").tobytes()


def _pack_internal(level: int, slots: list[int], node_bytes: list[bytes], bg: float, flags: int,
                   half: bool) -> bytes:
    """InternalNode::writeTopology: child_mask, value_mask (no tiles), values, child topologies."""
    size = 1 << 3 * LOG2[level]
    values = np.full(size, bg, np.float32)
    values[slots] = 0.0  # child slots hold zeroVal
    return b"".join([_pack_mask(np.array(slots, np.int64), size), bytes(size // 8),
                     _pack_values(values, np.zeros(size, bool), flags, half), *node_bytes])


def _pack_grid(grid: VdbGrid, flags: int, half: bool) -> tuple[bytes, int]:
    """(metadata + transform + topology + buffers, offset of the buffers) of one grid."""
    coords = np.asarray(grid.coords, np.int32).reshape(-1, 3)
    values = np.asarray(grid.values, np.float32).reshape(-1)
    if len(coords) != len(values):
        raise ValueError(f"grid {grid.name!r}: {len(coords)} coords but {len(values)} values")
    bg = float(np.float32(np.float16(grid.background) if half else grid.background))  # RootNode truncates it
    x, y, z = coords.T.astype(np.int64)
    # Sort key: root child origin, then the slot in the 32^3 node, the 16^3 node and the leaf.
    keys = np.stack([x >> 12, y >> 12, z >> 12,
                     (x >> 7 & 31) << 10 | (y >> 7 & 31) << 5 | (z >> 7 & 31),
                     (x >> 3 & 15) << 8 | (y >> 3 & 15) << 4 | (z >> 3 & 15),
                     (x & 7) << 6 | (y & 7) << 3 | (z & 7)], 1)
    order = np.lexsort(keys.T[::-1])
    keys, values = keys[order], values[order]
    if (keys[1:] == keys[:-1]).all(1).any():
        raise ValueError(f"grid {grid.name!r}: coords has duplicate voxels")
    leaf_starts = np.r_[0, np.flatnonzero((keys[1:, :5] != keys[:-1, :5]).any(1)) + 1, len(keys)]
    tree: dict = {}  # root child key -> {32^3 slot -> {16^3 slot -> (first voxel, end)}}, in file order
    for lo, hi in zip(leaf_starts[:-1], leaf_starts[1:]):
        if lo < hi:
            *root, s2, s1 = keys[lo, :5].tolist()
            tree.setdefault(tuple(root), {}).setdefault(s2, {})[s1] = (lo, hi)

    # Every leaf's mask and value bytes at once (a 1%-dense adapter has ~10^6 leaves: numpy calls
    # per leaf made writing take tens of seconds). Voxels are sorted by leaf, then slot, so a
    # leaf's active values are one contiguous run.
    lo_of = {lo: n for n, lo in enumerate(leaf_starts[:-1])}
    counts = np.diff(leaf_starts)
    leaf_of = np.repeat(np.arange(len(counts)), counts)
    bits = np.zeros((len(counts), 512), bool)
    bits[leaf_of, keys[:, 5]] = True
    masks = np.packbits(bits, axis=1, bitorder="little").tobytes()
    size = 2 if half else 4
    if flags & COMPRESS_ACTIVE_MASK:  # MaskCompress: one inactive value, the background; active values only
        code, raw, span = bytes([NO_MASK_OR_INACTIVE_VALS]), values.astype("<f2" if half else "<f4").tobytes(), None
    else:  # every slot's value, inactive ones holding the background
        full = np.full((len(counts), 512), bg, np.float32)
        full[leaf_of, keys[:, 5]] = values
        code, raw, span = bytes([NO_MASK_AND_ALL_VALS]), full.astype("<f2" if half else "<f4").tobytes(), 512 * size
    topology, buffers = [], []
    for root, level2 in tree.items():
        nodes2 = []
        for level1 in level2.values():
            leaf_masks = []
            for lo, hi in level1.values():
                n = lo_of[lo]
                mask = masks[64 * n:64 * n + 64]
                data = raw[lo * size:hi * size] if span is None else raw[n * span:(n + 1) * span]
                leaf_masks.append(mask)  # LeafNode::writeTopology: value_mask
                buffers += [mask, code, _pack_raw(data, flags, half)]  # LeafNode::writeBuffers
            nodes2.append(_pack_internal(1, list(level1), leaf_masks, bg, flags, half))
        origin = struct.pack("<3i", *(v << 12 for v in root))
        topology += [origin, _pack_internal(2, list(level2), nodes2, bg, flags, half)]

    # An empty grid's bbox is OpenVDB's empty CoordBBox: min INT32_MAX, max INT32_MIN.
    bbox_min = tuple(coords.min(0).tolist()) if len(coords) else (2**31 - 1,) * 3
    bbox_max = tuple(coords.max(0).tolist()) if len(coords) else (-2**31,) * 3
    meta = {"name": grid.name, "class": grid.grid_class, "is_saved_as_half_float": half,
            "file_bbox_min": bbox_min, "file_bbox_max": bbox_max, "file_voxel_count": len(coords),
            "file_compression": " + ".join(w for bit, w in ((COMPRESS_ZIP, "zip"), (COMPRESS_BLOSC, "blosc"),
                                                            (COMPRESS_ACTIVE_MASK, "active values")) if flags & bit)
            or "none", **grid.metadata}  # io::compressionToString
    # Transform: UniformScaleMap with voxel size 1 (scale, voxel size, 1/scale, 1/scale^2, 1/(2 scale)).
    transform = _pack_string("UniformScaleMap") + struct.pack("<15d", *[1.0] * 12, 0.5, 0.5, 0.5)
    head = b"".join([_pack_metamap(meta), transform, struct.pack("<i", 1),  # buffer_count
                     struct.pack("<fII", bg, 0, len(tree)), *topology])  # root
    return head + b"".join(buffers), len(head)


def write_vdb(path, grids: list[VdbGrid], *, compression: str = "zip", half: bool = False,
              metadata: dict | None = None) -> None:
    """Write `grids` as FloatGrids to the .vdb file `path`, atomically (a temp file, then a rename).

    compression: "zip" (zip + active mask, OpenVDB's default without blosc), "blosc" (blosc + active
    mask, the default of an OpenVDB built with blosc), "active_mask", "none", "zip_only", "blosc_only".
    half: store the values as 16-bit floats (OpenVDB's is_saved_as_half_float).
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression={compression!r}: expected one of {sorted(COMPRESSIONS)}")
    flags = COMPRESSIONS[compression]
    if flags & COMPRESS_BLOSC:
        _blosc()
    names = [g.name for g in grids]
    if len(set(names)) != len(names) or not all(names) or any(SEP in n for n in names):
        raise ValueError(f"grid names must be unique and non-empty, without \\x1e: {names}")
    for g in grids:
        if RESERVED & set(g.metadata):
            raise ValueError(f"grid {g.name!r}: metadata keys {sorted(RESERVED & set(g.metadata))} are OpenVDB's own")
    out = bytearray(struct.pack("<qIIIB", MAGIC, FILE_VERSION, *LIBRARY_VERSION, 1))  # has_grid_offsets
    out += str(uuid.uuid4()).encode() + _pack_metamap(metadata or {}) + struct.pack("<I", len(grids))
    for g in grids:
        out += _pack_string(g.name) + _pack_string(TREE_TYPE + (HALF_SUFFIX if half else "")) + _pack_string("")
        body, block = _pack_grid(g, flags, half)
        grid_pos = len(out) + 24
        out += struct.pack("<qqq", grid_pos, grid_pos + 4 + block, grid_pos + 4 + len(body))
        out += struct.pack("<I", flags) + body
    path = os.fspath(path)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"  # beside `path`, so the rename stays on one file system
    try:
        with open(tmp, "xb") as f:
            f.write(out)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------- reader

class _Reader:
    """A cursor over the file's bytes; every short read is a VdbError naming the file and offset."""

    def __init__(self, data: bytes, path: str):
        self.data, self.pos, self.path = memoryview(data), 0, path

    def fail(self, what: str):
        raise VdbError(f"{self.path}: {what}")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            self.fail(f"truncated: {what} needs {n} bytes at offset {self.pos}, file has {len(self.data)}")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))

    def string(self, what: str) -> str:
        return bytes(self.take(*self.unpack("I", what), what)).decode("utf-8", "replace")

    def mask(self, size: int, what: str) -> np.ndarray:
        """bool[size] from a NodeMask's uint64 words."""
        return np.unpackbits(np.frombuffer(self.take(size // 8, what), np.uint8), bitorder="little").astype(bool)


def _read_metamap(rd: _Reader, what: str) -> dict:
    """MetaMap::readMeta; unknown types (matrices, __delayedload) are skipped."""
    meta = {}
    for _ in range(*rd.unpack("I", what)):
        key, type_name = rd.string(what), rd.string(what)
        raw = rd.take(*rd.unpack("I", what), f"{what} {key!r}")
        try:
            if type_name == "string":
                meta[key] = bytes(raw).decode("utf-8", "replace")
            elif type_name in SCALARS:
                meta[key] = struct.unpack("<" + SCALARS[type_name], raw)[0]
            elif type_name in VECS:
                meta[key] = struct.unpack("<%d%s" % VECS[type_name], raw)
        except struct.error:
            rd.fail(f"{what} {key!r} of type {type_name} has {len(raw)} bytes")
    return meta


def _read_data(rd: _Reader, count: int, flags: int, half: bool, what: str) -> np.ndarray:
    """readData / HalfReader: f32[count]."""
    if half and count == 0:
        return np.zeros(0, np.float32)
    nbytes = count * (2 if half else 4)
    if flags & (COMPRESS_BLOSC | COMPRESS_ZIP):
        (size,) = rd.unpack("q", what)
        raw = rd.take(-size if size <= 0 else size, what)
        if size > 0:
            raw = _decompress(rd, raw, flags, what)
        if len(raw) != nbytes:
            rd.fail(f"{what}: expected {nbytes} bytes of values, got {len(raw)}")
    else:
        raw = rd.take(nbytes, what)
    return np.frombuffer(raw, "<f2" if half else "<f4").astype(np.float32)


def _decompress(rd: _Reader, chunk: memoryview, flags: int, what: str) -> bytes:
    """unzipFromStream / bloscFromStream of one chunk."""
    if flags & COMPRESS_BLOSC:
        blosc = _blosc()
        try:
            return blosc.decompress(bytes(chunk))
        except blosc.blosc_extension.error as e:
            rd.fail(f"{what}: corrupt blosc chunk ({e})")
    try:
        return zlib.decompress(chunk)
    except zlib.error as e:
        rd.fail(f"{what}: corrupt zip chunk ({e})")


def _read_values(rd: _Reader, value_mask: np.ndarray, flags: int, half: bool, bg: float, what: str) -> np.ndarray:
    """readCompressedValues: f32[len(value_mask)], inactive slots rebuilt from the per-node code."""
    (code,) = rd.unpack("b", what)
    if not 0 <= code <= 6:
        rd.fail(f"{what}: unknown per-node compression code {code}")
    inactive = [bg if code == NO_MASK_OR_INACTIVE_VALS else -bg, bg]
    if code in (2, 4, 5):  # NO_MASK_AND_ONE_INACTIVE_VAL, MASK_AND_ONE_INACTIVE_VAL, MASK_AND_TWO_INACTIVE_VALS
        inactive[0] = rd.unpack("f", what)[0]
        if code == 5:
            inactive[1] = rd.unpack("f", what)[0]
    selection = rd.mask(len(value_mask), what) if code in (3, 4, 5) else np.zeros(len(value_mask), bool)
    if not (flags & COMPRESS_ACTIVE_MASK and code != NO_MASK_AND_ALL_VALS):
        return _read_data(rd, len(value_mask), flags, half, what)
    out = np.where(selection, np.float32(inactive[1]), np.float32(inactive[0]))
    out[value_mask] = _read_data(rd, int(value_mask.sum()), flags, half, what)
    return out


def _read_internal(rd: _Reader, level: int, origin: np.ndarray, ctx: dict, leaves: list, tiles: list):
    """InternalNode::readTopology: masks, slot values (active ones are tiles), then the children."""
    log2, size = LOG2[level], 1 << 3 * LOG2[level]
    what = f"grid {ctx['name']!r}: internal node at {origin.tolist()}"
    child_mask, value_mask = rd.mask(size, what), rd.mask(size, what)
    values = _read_values(rd, value_mask, ctx["flags"], ctx["half"], ctx["bg"], what)
    mask_ = (1 << log2) - 1

    def child_origin(slot: int) -> np.ndarray:  # offsetToLocalCoord, scaled to the child's span
        return origin + (np.array([slot >> 2 * log2, slot >> log2 & mask_, slot & mask_]) << TOTAL[level - 1])

    for s in np.flatnonzero(value_mask & ~child_mask):
        tiles.append((child_origin(s), TOTAL[level - 1], values[s]))
    for s in np.flatnonzero(child_mask):
        if level == 2:
            _read_internal(rd, 1, child_origin(s), ctx, leaves, tiles)
        else:  # LeafNode::readTopology: the mask's 64 bytes, unpacked for all leaves at once later
            leaves.append((child_origin(s), bytes(rd.take(64, f"grid {ctx['name']!r}: leaf node"))))


def _read_grid(rd: _Reader, ctx: dict, max_tile_voxels: int) -> tuple[np.ndarray, np.ndarray]:
    """Root topology, then the leaf buffers: (i32[n, 3] coords, f32[n] values) of the active voxels."""
    what = f"grid {ctx['name']!r}"
    (buffer_count,) = rd.unpack("i", what)
    if buffer_count != 1:
        rd.fail(f"{what}: {buffer_count} buffers per node (only 1 is supported)")
    bg, num_tiles, num_children = rd.unpack("fII", f"{what}: root node")
    ctx["bg"] = float(np.float32(bg))
    tiles, children = [], []
    for _ in range(num_tiles):
        x, y, z, value, active = rd.unpack("3if?", f"{what}: root tile")
        if active:
            tiles.append((np.array([x, y, z]), 12, value))
    for _ in range(num_children):
        origin, leaves = np.array(rd.unpack("3i", f"{what}: root child")), []
        _read_internal(rd, 2, origin, ctx, leaves, tiles)
        children.append((tuple(origin), leaves))
    if sum(1 << 3 * log2 for _, log2, _ in tiles) > max_tile_voxels:
        rd.fail(f"{what}: active tiles span more than max_tile_voxels={max_tile_voxels} voxels")
    leaves = [leaf for _, ls in sorted(children, key=lambda c: c[0]) for leaf in ls]  # RootNode order: by origin
    values = [_read_leaf_values(rd, leaves, ctx, what)] if leaves else []
    coords = []
    if leaves:
        masks = np.unpackbits(np.frombuffer(b"".join(m for _, m in leaves), np.uint8), bitorder="little")
        leaf, slot = np.nonzero(masks.reshape(len(leaves), 512))  # offsetToLocalCoord: slot = (x * 8 + y) * 8 + z
        origins = np.array([o for o, _ in leaves])
        coords.append(origins[leaf] + np.stack([slot >> 6, slot >> 3 & 7, slot & 7], 1))
    for origin, log2, value in tiles:
        axis = np.arange(1 << log2)
        block = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
        coords.append(origin + block)
        values.append(np.full(len(block), value, np.float32))
    if not coords:
        return np.zeros((0, 3), np.int32), np.zeros(0, np.float32)
    return np.concatenate(coords).astype(np.int32), np.concatenate(values).astype(np.float32)


def _read_leaf_values(rd: _Reader, leaves: list, ctx: dict, what: str) -> np.ndarray:
    """Every leaf buffer's active values, in leaf and slot order: f32[active voxels].

    The per-leaf work is kept to byte slicing and one decompress (a 1%-dense adapter has ~10^6
    leaves; numpy calls per leaf made reading take ~20 s): inactive values are never rebuilt,
    since inactive voxels are dropped anyway, and every leaf's values are decoded in one
    frombuffer at the end. A leaf stored with all 512 values (no active-mask compression, or
    per-node code NO_MASK_AND_ALL_VALS) has its active ones selected by its mask."""
    flags, half = ctx["flags"], ctx["half"]
    size = 2 if half else 4
    packed = flags & (COMPRESS_BLOSC | COMPRESS_ZIP)
    data, chunks, full, counts = rd.data, [], [], []
    where = f"{what}: leaf buffer"  # one string for every leaf: building one per leaf cost as much as the read
    for n, (_, mask) in enumerate(leaves):
        rd.take(64, where)  # the topology's copy of the mask is the one OpenVDB uses
        code = rd.take(1, where)[0]
        code = code - 256 if code > 127 else code
        if not 0 <= code <= 6:
            rd.fail(f"{where}: unknown per-node compression code {code}")
        rd.take((4 if code in (2, 4) else 8 if code == 5 else 0) + (64 if code in (3, 4, 5) else 0), where)
        count = int.from_bytes(mask, "little").bit_count() if flags & COMPRESS_ACTIVE_MASK and code != 6 else 512
        counts.append(count)
        if count == 512:
            full.append((n, mask))
        nbytes = count * size
        if half and count == 0:
            continue  # HalfReader reads nothing for an empty array
        if packed:
            (stored,) = rd.unpack("q", where)
            raw = rd.take(-stored if stored <= 0 else stored, where)
            if stored > 0:
                raw = _decompress(rd, raw, flags, where)
        else:
            raw = data[rd.pos:rd.pos + nbytes]
            rd.take(nbytes, where)
        if len(raw) != nbytes:
            rd.fail(f"{where}: expected {nbytes} bytes of values, got {len(raw)}")
        chunks.append(raw)
    values = np.frombuffer(b"".join(chunks), "<f2" if half else "<f4").astype(np.float32)
    if full:  # select the active values of leaves stored whole
        keep = np.ones(values.size, bool)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        for i, m in full:
            keep[starts[i]:starts[i] + 512] = np.unpackbits(np.frombuffer(m, np.uint8), bitorder="little").astype(bool)
        values = values[keep]
    return values


def _skip_transform(rd: _Reader, what: str) -> None:
    """Transform::read: the map's type name, then its fields (all doubles)."""
    map_type = rd.string(what)
    if map_type not in MAP_BYTES:
        rd.fail(f"{what}: transform map {map_type!r} is not supported (only {sorted(MAP_BYTES)})")
    rd.take(MAP_BYTES[map_type], what)


def read_vdb(path, *, max_tile_voxels: int = 1 << 24) -> tuple[list[VdbGrid], dict]:
    """Read every FloatGrid of the .vdb file `path`: (grids, file metadata)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        rd = _Reader(f.read(), path)
    magic, version = rd.unpack("qI", "header")
    if magic != MAGIC:
        rd.fail(f"not a VDB file (magic {magic:#x}, expected {MAGIC:#x})")
    if not MIN_FILE_VERSION <= version <= MAX_FILE_VERSION:
        rd.fail(f"file format version {version} is not supported ({MIN_FILE_VERSION}..{MAX_FILE_VERSION})")
    rd.unpack("IIB", "header")  # library major, minor, has_grid_offsets
    rd.take(36, "header uuid")
    file_meta = _read_metamap(rd, "file metadata")
    grids, by_unique_name, instances = [], {}, []
    for _ in range(*rd.unpack("I", "grid count")):
        unique_name, grid_type, parent = (rd.string("grid descriptor") for _ in range(3))
        _grid_pos, _block_pos, end_pos = rd.unpack("qqq", "grid descriptor")
        what = f"grid {unique_name.split(SEP)[0]!r}"
        if grid_type.removesuffix(HALF_SUFFIX) != TREE_TYPE:
            rd.fail(f"{what} has type {grid_type}; only {TREE_TYPE} (a FloatGrid, 5-4-3 tree) is supported")
        (flags,) = rd.unpack("I", f"{what}: compression")
        meta = _read_metamap(rd, f"{what}: metadata")
        _skip_transform(rd, what)
        half = bool(meta.get("is_saved_as_half_float", grid_type.endswith(HALF_SUFFIX)))
        ctx = {"name": meta.get("name", unique_name.split(SEP)[0]), "flags": flags, "half": half}
        if flags & ~(COMPRESS_ZIP | COMPRESS_ACTIVE_MASK | COMPRESS_BLOSC):
            rd.fail(f"{what}: unknown compression flags {flags:#x}")
        coords, values, ctx["bg"] = np.zeros((0, 3), np.int32), np.zeros(0, np.float32), 0.0
        if parent:  # an instance: it shares the tree of the grid `parent`, stored once
            instances.append((len(grids), unique_name, parent))
        else:
            coords, values = _read_grid(rd, ctx, max_tile_voxels)
        if end_pos and rd.pos != end_pos:
            rd.fail(f"{what} ends at offset {rd.pos}, its descriptor says {end_pos}")
        grids.append(VdbGrid(ctx["name"], coords, values, {k: v for k, v in meta.items() if k not in RESERVED},
                             ctx["bg"], meta.get("class", "unknown")))
        by_unique_name[unique_name] = grids[-1]
    for i, _, parent in instances:
        if parent not in by_unique_name or parent in {name for _, name, _ in instances}:
            rd.fail(f"grid {grids[i].name!r} is an instance of {parent!r}, which is not a grid of the file")
        source = by_unique_name[parent]
        grids[i].coords, grids[i].values, grids[i].background = source.coords, source.values, source.background
    return grids, file_meta
