"""OpenVDB files (hyprjax/adapters/vdb.py) against OpenVDB 10 itself: pyopenvdb, vdb_tool, vdb_print.

OpenVDB runs in Debian's interpreter (tests/adapters/vdb_reference.py): `apt-get install
python3-openvdb libopenvdb-tools`. Without it these tests skip, or fail under HYPRJAX_STRICT=1.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hyprjax.adapters.vdb import COMPRESSIONS, RESERVED, VdbError, VdbGrid, read_vdb, write_vdb
from tests.deps import missing, need

DEBIAN_PYTHON = "/usr/bin/python3.11"
REFERENCE = Path(__file__).with_name("vdb_reference.py")
APT = "apt-get install python3-openvdb libopenvdb-tools"
METADATA = {"base_digest": "sha256:9f86d081884c7d65", "rows": 150_000, "big": 2**40, "neg": -3,
            "alpha": 16.0, "scale32": np.float32(0.1), "merged": True, "shape": (4096, 11008, 36),
            "pos": (0.5, -1.25, 2.0), "v2": (3, 4), "v4": (1.0, 2.0, 3.0, 4.0)}


@functools.cache
def _openvdb_missing() -> str:
    """Why OpenVDB's reference tools cannot run here ("" when they can)."""
    if not os.path.exists(DEBIAN_PYTHON):
        return f"{DEBIAN_PYTHON} (Debian's python3) is not installed ({APT})"
    probe = subprocess.run([DEBIAN_PYTHON, "-I", "-c", "import pyopenvdb"], capture_output=True, text=True, timeout=60)
    if probe.returncode:
        return f"pyopenvdb does not import in {DEBIAN_PYTHON}: {probe.stderr.strip()[-200:]} ({APT})"
    tools = [t for t in ("vdb_print", "vdb_tool") if shutil.which(t) is None]
    return f"{', '.join(tools)} not on PATH ({APT})" if tools else ""


@pytest.fixture
def openvdb():
    """Skip (fail under HYPRJAX_STRICT=1) without Debian's python3-openvdb and libopenvdb-tools."""
    if why := _openvdb_missing():
        missing(why)


def need_blosc(compression: str) -> None:
    if "blosc" in compression or compression == "pyopenvdb":  # Debian's OpenVDB writes blosc by default
        need("blosc", "pip install blosc: the optional codec of OpenVDB's default compression")


def reference(*args: str) -> None:
    """Run vdb_reference.py in Debian's python, isolated from this interpreter's environment (-I)."""
    run = subprocess.run([DEBIAN_PYTHON, "-I", str(REFERENCE), *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def reference_read(path: Path) -> tuple[dict, dict]:
    out = path.with_suffix(".ref.npz")
    reference("read", str(path), str(out))
    with np.load(out) as npz:
        return json.loads(str(npz["spec"])), {k: npz[k] for k in npz.files if k != "spec"}


def reference_write(path: Path, spec: dict, arrays: dict) -> None:
    spec_path = path.with_suffix(".spec.npz")
    np.savez(spec_path, spec=np.array(json.dumps(spec)), **arrays)
    reference("write", str(path), str(spec_path))


def vdb_tool_rewrite(src: Path, dst: Path, codec: str, bits: int) -> None:
    """OpenVDB re-encodes `src` (codec: zip, blosc, active, none; bits 16 saves half floats)."""
    run = subprocess.run(["vdb_tool", "-read", str(src), "-write", f"codec={codec}", f"bits={bits}", str(dst)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and dst.exists(), run.stderr + run.stdout


def plain(value):
    """Metadata as JSON brings it back: tuples as lists, numpy scalars as Python's."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return [plain(v) for v in value] if isinstance(value, (tuple, list)) else getattr(value, "item", lambda: value)()


def voxel_keys(coords: np.ndarray) -> np.ndarray:
    """One int64 per voxel (coords within +-2^20), to compare voxel sets by sorting."""
    c = np.asarray(coords, np.int64) + (1 << 20)
    assert ((c >= 0) & (c < 1 << 21)).all()
    return c[:, 0] << 42 | c[:, 1] << 21 | c[:, 2]


def assert_same_voxels(coords, values, want_coords, want_values) -> None:
    assert len(coords) == len(values) and len(want_coords) == len(want_values)
    keys, want = voxel_keys(coords), voxel_keys(want_coords)
    a, b = np.argsort(keys), np.argsort(want)
    np.testing.assert_array_equal(keys[a], want[b])
    np.testing.assert_array_equal(np.asarray(values, np.float32)[a], np.asarray(want_values, np.float32)[b])


def as_half(values) -> np.ndarray:
    return np.asarray(values, np.float32).astype(np.float16).astype(np.float32)


def spread_grid(name: str, seed: int) -> VdbGrid:
    """Never-zero values on voxels spread over leaves, 16^3 and 32^3 nodes, root children, rows ~150000."""
    rng = np.random.default_rng(seed)
    parts = [rng.integers(0, 8, (40, 3)),  # one leaf, many voxels
             rng.integers(0, 300, (400, 3)),  # several leaves and 16^3 nodes
             rng.integers(0, 5000, (60, 3)),  # past 4096: several root children
             np.c_[rng.integers(149_900, 150_100, 30), rng.integers(0, 4096, 30), rng.integers(0, 36, 30)],
             rng.integers(-5000, 0, (30, 3))]  # negative coordinates (not ours, but OpenVDB's)
    coords = np.unique(np.concatenate(parts), axis=0).astype(np.int32)
    rng.shuffle(coords)  # any order
    values = rng.uniform(0.5, 2.0, len(coords)) * rng.choice([-1.0, 1.0], len(coords))
    return VdbGrid(name, coords, values.astype(np.float32), dict(METADATA))


def dense_grid(name: str) -> VdbGrid:
    """Every voxel of the leaf at (8, 16, 24), plus part of the leaf beside it."""
    axis = np.arange(8)
    full = np.stack(np.meshgrid(axis + 8, axis + 16, axis + 24, indexing="ij"), -1).reshape(-1, 3)
    coords = np.concatenate([full, full[:100] + [8, 0, 0]]).astype(np.int32)
    return VdbGrid(name, coords, np.linspace(-3, 3, len(coords), dtype=np.float32) + 0.01, {"kind": "dense"},
                   background=0.25, grid_class="fog volume")


def empty_grid(name: str) -> VdbGrid:
    return VdbGrid(name, np.zeros((0, 3), np.int32), np.zeros(0, np.float32), {"kind": "empty"})


# ---------------------------------------------------------------- our writer -> OpenVDB

@pytest.mark.parametrize("half", [False, True], ids=["f32", "half"])
@pytest.mark.parametrize("compression", sorted(COMPRESSIONS))
def test_openvdb_reads_our_files(tmp_path, openvdb, compression, half):
    need_blosc(compression)
    grids = [spread_grid("model.layers.0.self_attn.q_proj", 0), dense_grid("dense"), empty_grid("empty")]
    path = tmp_path / "ours.vdb"
    write_vdb(path, grids, compression=compression, half=half, metadata={"format": "hyprjax-sparse", "version": 1})
    top, arrays = reference_read(path)
    assert top["metadata"] == {"format": "hyprjax-sparse", "version": 1}
    by_name = {g["name"]: (i, g) for i, g in enumerate(top["grids"])}  # OpenVDB lists them by name
    assert sorted(by_name) == sorted(g.name for g in grids)
    for grid in grids:
        i, ref = by_name[grid.name]
        assert ref["type"] == "float" and ref["half"] == half and ref["class"] == grid.grid_class
        assert ref["background"] == grid.background and ref["activeVoxelCount"] == len(grid.coords)
        assert ref["metadata"]["file_voxel_count"] == len(grid.coords)
        assert {k: v for k, v in ref["metadata"].items() if k not in RESERVED} == plain(grid.metadata)
        assert_same_voxels(arrays[f"coords_{i}"], arrays[f"values_{i}"], grid.coords,
                           as_half(grid.values) if half else grid.values)
    # And our own reader gets back what it wrote.
    ours, file_meta = read_vdb(path)
    assert file_meta == {"format": "hyprjax-sparse", "version": 1}
    for got, grid in zip(ours, grids):
        assert (got.name, got.background, got.grid_class) == (grid.name, grid.background, grid.grid_class)
        assert plain(got.metadata) == plain(grid.metadata)
        assert_same_voxels(got.coords, got.values, grid.coords, as_half(grid.values) if half else grid.values)


def test_vdb_print_lists_our_grids(tmp_path, openvdb):
    grids = [spread_grid("model.layers.0.mlp.down_proj", 1), dense_grid("dense"), empty_grid("empty")]
    path = tmp_path / "ours.vdb"
    write_vdb(path, grids, half=True, metadata={"format": "hyprjax-sparse"})
    run = subprocess.run(["vdb_print", "-l", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "ERROR" not in run.stderr, run.stderr
    assert "VDB version: 10.0/224" in run.stdout and "format: hyprjax-sparse" in run.stdout
    names = re.findall(r"^Name: (.*)$", run.stdout, re.M)
    counts = [int(c.replace(",", "")) for c in re.findall(r"Number of active voxels:\s+([\d,]+)", run.stdout)]
    assert dict(zip(names, counts)) == {g.name: len(g.coords) for g in grids} and len(names) == 3
    assert run.stdout.count("Type: Tree_float_5_4_3") == 3 and run.stdout.count("is_saved_as_half_float: true") == 3


# ---------------------------------------------------------------- OpenVDB -> our reader

def inactive_leaves() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(active coords, values, inactive coords, values): one leaf per per-node compression code.

    Background 0.5. Leaves at x = 0, 16, ...: inactive values all -bg (NO_MASK_AND_MINUS_BG), bg
    and 9 (MASK_AND_ONE_INACTIVE_VAL), all 9 (NO_MASK_AND_ONE_INACTIVE_VAL), 9 and 7
    (MASK_AND_TWO_INACTIVE_VALS), bg and -bg (MASK_AND_NO_INACTIVE_VALS), three values (NO_MASK_AND_ALL_VALS).
    """
    axis = np.arange(8)
    leaf = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)[1:]  # all but (0, 0, 0)
    half_leaf = np.arange(len(leaf)) % 2 == 0
    patterns = [np.full(len(leaf), -0.5), np.where(np.arange(len(leaf)) < 5, 9.0, np.nan), np.full(len(leaf), 9.0),
                np.where(half_leaf, 9.0, 7.0), np.where(half_leaf, -0.5, np.nan),
                np.where(half_leaf, 9.0, np.where(np.arange(len(leaf)) % 3 == 0, -0.5, np.nan))]
    on, on_values, off, off_values = [], [], [], []
    for k, pattern in enumerate(patterns):
        origin = np.array([16 * k, 0, 0])
        on.append(origin[None])
        on_values.append(1.0 + k)
        off.append(leaf[~np.isnan(pattern)] + origin)
        off_values.append(pattern[~np.isnan(pattern)])
    return (np.concatenate(on), np.array(on_values), np.concatenate(off), np.concatenate(off_values))


@pytest.fixture(scope="module")
def openvdb_file(tmp_path_factory):
    """A file pyopenvdb writes (its default, blosc + active mask), and the grids it should hold."""
    if why := _openvdb_missing():
        missing(why)
    path = tmp_path_factory.mktemp("vdb") / "openvdb.vdb"
    sparse, half_grid = spread_grid("sparse", 2), spread_grid("half", 3)
    rng = np.random.default_rng(4)
    loose = np.unique(rng.integers(300, 600, (200, 3)), axis=0)
    on, on_values, off, off_values = inactive_leaves()
    meta = plain(METADATA)
    spec = {"metadata": {"format": "openvdb", "n": 7}, "grids": [
        {"name": "sparse", "metadata": meta},
        {"name": "tiles", "fills": [[[0, 0, 0], [7, 7, 7], 2.0],  # a whole 8^3 leaf: a tile of a 16^3 node
                                    [[128, 0, 0], [255, 127, 127], 3.5],  # a whole 16^3 node: a tile of a 32^3 node
                                    [[20, 20, 20], [29, 21, 21], 1.5],  # leaf voxels
                                    [[512, 0, 0], [519, 7, 7], 9.0, False]]},  # an inactive tile, not background
        {"name": "inactive", "background": 0.5},
        {"name": "half", "half": True, "class": "fog volume"},
        {"name": "empty"},
        {"name": "twin", "copy_of": 0}]}  # shares the tree of "sparse": an instance in the file
    arrays = {"coords_0": sparse.coords, "values_0": sparse.values, "coords_1": loose,
              "values_1": np.linspace(1, 2, len(loose)), "coords_2": on, "values_2": on_values,
              "off_coords_2": off, "off_values_2": off_values, "coords_3": half_grid.coords,
              "values_3": half_grid.values, "coords_4": np.zeros((0, 3), np.int32), "values_4": np.zeros(0)}
    reference_write(path, spec, arrays)
    axis8, axis128 = np.arange(8), np.arange(128)
    tile8 = np.stack(np.meshgrid(axis8, axis8, axis8, indexing="ij"), -1).reshape(-1, 3)
    tile128 = np.stack(np.meshgrid(axis128 + 128, axis128, axis128, indexing="ij"), -1).reshape(-1, 3)
    box = np.stack(np.meshgrid(np.arange(20, 30), [20, 21], [20, 21], indexing="ij"), -1).reshape(-1, 3)
    tiles = (np.concatenate([loose, tile8, tile128, box]),
             np.concatenate([np.linspace(1, 2, len(loose)), np.full(512, 2.0), np.full(128**3, 3.5), np.full(40, 1.5)]))
    want = {"sparse": (sparse.coords, sparse.values, meta, 0.0, "unknown"),
            "tiles": (*tiles, {}, 0.0, "unknown"),
            "inactive": (on, on_values, {}, 0.5, "unknown"),
            "half": (half_grid.coords, as_half(half_grid.values), {}, 0.0, "fog volume"),
            "empty": (np.zeros((0, 3)), np.zeros(0), {}, 0.0, "unknown"),
            "twin": (sparse.coords, sparse.values, meta, 0.0, "unknown")}
    return path, want


@pytest.mark.parametrize("codec, bits", [("pyopenvdb", 32), *((c, b) for c in ("zip", "blosc", "active", "none")
                                                                  for b in (32, 16))])
def test_we_read_openvdb_files(tmp_path, openvdb_file, codec, bits):
    """pyopenvdb's file as written (blosc + active mask), then as vdb_tool re-encodes it (bits=16: half)."""
    src, want = openvdb_file
    if codec in ("pyopenvdb", "blosc"):
        need_blosc(codec)
    path = src
    if codec != "pyopenvdb":
        path = tmp_path / f"{codec}{bits}.vdb"
        vdb_tool_rewrite(src, path, codec, bits)
    grids, file_meta = read_vdb(path)
    assert file_meta == ({"format": "openvdb", "n": 7} if codec == "pyopenvdb" else {})  # vdb_tool drops it
    assert sorted(g.name for g in grids) == sorted(want)
    for grid in grids:
        coords, values, meta, background, grid_class = want[grid.name]
        assert (grid.background, grid.grid_class) == (background, grid_class)
        assert plain(grid.metadata) == meta
        assert_same_voxels(grid.coords, grid.values, coords, as_half(values) if bits == 16 else values)


def test_tile_expansion_limit(tmp_path, openvdb_file):
    path = tmp_path / "zip.vdb"
    vdb_tool_rewrite(openvdb_file[0], path, "zip", 32)
    with pytest.raises(VdbError, match=r"'tiles'.*max_tile_voxels=1000"):
        read_vdb(path, max_tile_voxels=1000)


@pytest.mark.parametrize("grid_type", ["bool", "vec3s"])
def test_other_value_types_are_refused(tmp_path, openvdb, grid_type):
    path = tmp_path / f"{grid_type}.vdb"
    spec = {"grids": [{"name": "other", "type": grid_type}, {"name": "float"}]}
    reference_write(path, spec, {"coords_0": np.zeros((1, 3), np.int32), "values_0": np.ones(1),
                                 "coords_1": np.zeros((1, 3), np.int32), "values_1": np.ones(1)})
    with pytest.raises(VdbError, match=rf"{re.escape(str(path))}: grid 'other' has type Tree_{grid_type}_5_4_3"):
        read_vdb(path)


# ---------------------------------------------------------------- our own round trip and bad files (no OpenVDB)

@pytest.mark.parametrize("half", [False, True], ids=["f32", "half"])
@pytest.mark.parametrize("compression", sorted(COMPRESSIONS))
def test_round_trip(tmp_path, compression, half):
    need_blosc(compression)
    extremes = VdbGrid("extremes", np.array([[-2**31, -2**31, -2**31], [2**31 - 1, 2**31 - 1, 2**31 - 1],
                                             [-1, 0, 1], [4095, 4096, -4097]], np.int32),
                       np.array([1.5, -2.5, 3.25, -0.125], np.float32), {"kind": "edge"}, background=-1.0)
    grids = [spread_grid("a", 5), extremes, empty_grid("empty")]
    write_vdb(tmp_path / "x.vdb", grids, compression=compression, half=half)
    got, meta = read_vdb(tmp_path / "x.vdb")
    assert meta == {} and [g.name for g in got] == ["a", "extremes", "empty"]
    assert got[1].background == -1.0 and got[2].coords.shape == (0, 3) and got[0].coords.dtype == np.int32
    for g, w in zip(got, grids):
        order_g, order_w = np.lexsort(g.coords.T), np.lexsort(w.coords.T)
        np.testing.assert_array_equal(g.coords[order_g], w.coords[order_w])
        np.testing.assert_array_equal(g.values[order_g], (as_half(w.values) if half else w.values)[order_w])


def test_truncated_and_corrupt_files_raise_vdb_error(tmp_path):
    path = tmp_path / "good.vdb"
    write_vdb(path, [spread_grid("a", 6), dense_grid("dense")], metadata={"format": "x"})
    data = path.read_bytes()
    bad = tmp_path / "bad.vdb"
    for cut in sorted({*range(0, 200, 7), *np.linspace(200, len(data) - 1, 60).astype(int).tolist()}):
        bad.write_bytes(data[:cut])
        with pytest.raises(VdbError, match=re.escape(str(bad))):
            read_vdb(bad)
    bad.write_bytes(b"NOT A VDB" + data[9:])
    with pytest.raises(VdbError, match="not a VDB file"):
        read_vdb(bad)
    bad.write_bytes(data[:8] + (219).to_bytes(4, "little") + data[12:])
    with pytest.raises(VdbError, match="file format version 219"):
        read_vdb(bad)
    rng = np.random.default_rng(0)
    for position in rng.integers(0, len(data), 150):  # any single corrupt byte: a result or a VdbError
        corrupt = bytearray(data)
        corrupt[position] ^= 1 << int(rng.integers(8))
        bad.write_bytes(bytes(corrupt))
        try:
            read_vdb(bad)
        except VdbError:
            pass


def test_writer_rejects_bad_grids(tmp_path):
    path = tmp_path / "x.vdb"
    write_vdb(path, [dense_grid("kept")])
    grid = spread_grid("a", 7)
    with pytest.raises(ValueError, match="compression='lzma'"):
        write_vdb(path, [grid], compression="lzma")
    with pytest.raises(ValueError, match="duplicate voxels"):
        write_vdb(path, [VdbGrid("dup", np.zeros((2, 3), np.int32), np.ones(2, np.float32))])
    with pytest.raises(ValueError, match="unique"):
        write_vdb(path, [grid, grid])
    with pytest.raises(ValueError, match="OpenVDB's own"):
        write_vdb(path, [VdbGrid("a", grid.coords, grid.values, {"class": "x"})])
    with pytest.raises(TypeError, match=r"metadata\['obj'\]"):
        write_vdb(path, [VdbGrid("a", grid.coords, grid.values, {"obj": object()})])
    with pytest.raises(ValueError, match=r"metadata\['huge'\]"):
        write_vdb(path, [grid], metadata={"huge": 2**70})
    with pytest.raises(ValueError, match="coords but"):
        write_vdb(path, [VdbGrid("a", grid.coords, grid.values[:-1])])
    # Nothing was replaced or left behind.
    assert [g.name for g in read_vdb(path)[0]] == ["kept"] and os.listdir(tmp_path) == ["x.vdb"]


def test_blosc_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "blosc", None)
    with pytest.raises(VdbError, match="pip install blosc"):
        write_vdb(tmp_path / "x.vdb", [dense_grid("a")], compression="blosc")
