"""OpenVDB's own library as the reference for hyprjax/adapters/vdb.py (run under Debian's python3).

    /usr/bin/python3.11 tests/adapters/vdb_reference.py write OUT.vdb SPEC.npz
    /usr/bin/python3.11 tests/adapters/vdb_reference.py read IN.vdb OUT.npz

A .npz holds "spec" (a JSON string: file metadata, and per grid its name, metadata, background,
class, saveFloatAsHalf, type, fills, copy_of, and after `read` activeVoxelCount and leafCount) and, per grid
i, "coords_i" (i32[n, 3]) and "values_i" (f32[n]), for `write` optionally "off_coords_i" and
"off_values_i" (inactive voxels with their own value). `write` sets the voxels one by one, then applies
the fills (`grid.fill(min, max, value)`, which makes tiles where a fill covers whole nodes); `read`
expands active tiles to voxels. JSON lists become tuples (OpenVDB vec metadata). Needs Debian's
python3-openvdb (module `pyopenvdb`, OpenVDB 10) and its numpy 1.x.
"""

import json
import sys

import numpy as np
import pyopenvdb as vdb

TYPES = {"float": vdb.FloatGrid, "bool": vdb.BoolGrid, "vec3s": vdb.Vec3SGrid}
CAST = {"float": float, "bool": bool, "vec3s": lambda v: (v, v, v)}


def plain(value):
    return list(value) if isinstance(value, tuple) else value


def write(path, spec_path):
    spec = np.load(spec_path)
    top = json.loads(str(spec["spec"]))
    grids = []
    for i, g in enumerate(top["grids"]):
        # "copy_of": j shares grid j's tree (a shallow copy), which OpenVDB writes as an instance.
        grid = grids[g["copy_of"]].copy() if "copy_of" in g else TYPES[g.get("type", "float")]()
        if "background" in g:
            grid.background = CAST[g.get("type", "float")](g["background"])
        grid.name = g["name"]
        if g.get("class"):
            grid.gridClass = g["class"]
        for key, value in g.get("metadata", {}).items():
            grid[key] = tuple(value) if isinstance(value, list) else value
        grid.saveFloatAsHalf = bool(g.get("half", False))
        acc, cast = grid.getAccessor(), CAST[g.get("type", "float")]
        if f"coords_{i}" in spec:
            for xyz, value in zip(spec[f"coords_{i}"].tolist(), spec[f"values_{i}"].tolist()):
                acc.setValueOn(tuple(xyz), cast(value))
        if f"off_coords_{i}" in spec:  # inactive voxels holding a value of their own
            for xyz, value in zip(spec[f"off_coords_{i}"].tolist(), spec[f"off_values_{i}"].tolist()):
                acc.setValueOff(tuple(xyz), cast(value))
        for lo, hi, value, *active in g.get("fills", []):  # [min, max, value, active=True]
            grid.fill(tuple(lo), tuple(hi), cast(value), active[0] if active else True)
        grids.append(grid)
    meta = {k: tuple(v) if isinstance(v, list) else v for k, v in top.get("metadata", {}).items()}
    vdb.write(path, grids=grids, metadata=meta)


def read(path, out_path):
    grids, meta = vdb.readAll(path)
    top = {"metadata": {k: plain(v) for k, v in meta.items()}, "grids": []}
    arrays = {}
    for i, grid in enumerate(grids):
        coords, values = [], []
        for item in grid.iterOnValues():
            lo, hi = np.array(item["min"]), np.array(item["max"])
            axes = [np.arange(a, b + 1) for a, b in zip(lo, hi)]
            block = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
            coords.append(block)
            values.append(np.full(len(block), item["value"], np.float32))
        arrays[f"coords_{i}"] = np.concatenate(coords).astype(np.int32) if coords else np.zeros((0, 3), np.int32)
        arrays[f"values_{i}"] = np.concatenate(values) if values else np.zeros(0, np.float32)
        top["grids"].append({
            "name": grid.name, "class": grid.gridClass, "background": grid.background,
            "half": grid.saveFloatAsHalf, "type": grid.valueTypeName,
            "metadata": {k: plain(v) for k, v in grid.metadata.items()},
            "activeVoxelCount": grid.activeVoxelCount(), "leafCount": grid.leafCount()})
    np.savez(out_path, spec=np.array(json.dumps(top)), **arrays)


if __name__ == "__main__":
    {"write": write, "read": read}[sys.argv[1]](sys.argv[2], sys.argv[3])
