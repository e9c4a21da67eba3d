"""PEFT LoRA directories: `adapter_config.json` + `adapter_model.safetensors`.

What is read: `r`, `lora_alpha`, `use_rslora`, `rank_pattern` and `alpha_pattern` (matched
against module names as PEFT matches them: the key, or any dotted suffix of the module path, as
a regular expression), and the `lora_A` / `lora_B` tensors of the seven linear modules in each
decoder layer. Which modules are targeted comes from the tensors present (PEFT saves exactly
those), so `target_modules` need not be parsed. The rank of each module comes from its tensors (and
must agree with the config's pattern); alpha from the alpha pattern or `lora_alpha`.

PEFT's SHiRA directories (`peft_type` "SHIRA") are read and written too: per module
`shira_indices` int[2, nnz] (rows = output index, columns = input index of the torch weight)
and `shira_weight` [nnz], as `ShiraModel` saves them; the scale is 1, PEFT's default (it is not
saved). PEFT rebuilds each module with r * (in + out) entries before loading the file, so a
written SHiRA directory must hold exactly that many per module, for one r.

Refused with a one-line AdapterError: DoRA, bias training, `modules_to_save`, embedding or
lm_head targets (they change weights the slot table does not hold), pickled `.bin` files, and
tensors that name a module outside the seven.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import ModelFileError
from ..formats.safetensors_io import SafeTensorsFile
from .lora import MODULES, AdapterError, LoraAdapter, LoraModule, lora_scale

_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")
_SHIRA_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.shira_(weight|indices)(?:\.\w+)?$")


def is_peft_dir(path: Path) -> bool:
    return path.is_dir() and (path / "adapter_config.json").is_file()


def _pattern_value(patterns: dict, module_key: str, default):
    """PEFT's lookup: the first pattern that equals or regex-matches a dotted suffix of the key."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_key):
            return value
    return default


def read_peft(path: str | Path, name: str, cfg: ModelConfig) -> LoraAdapter:
    """Read a PEFT LoRA directory into a LoraAdapter checked against `cfg`."""
    path = Path(path)
    config_path = path / "adapter_config.json"
    if not path.is_dir():
        raise AdapterError(f"{path}: no such adapter directory")
    if not config_path.is_file():
        raise AdapterError(f"{path}: not a PEFT adapter (no adapter_config.json)")
    try:
        conf = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{config_path}: not valid JSON ({e})") from None
    except OSError as e:
        raise AdapterError(f"{config_path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(conf, dict):
        raise AdapterError(f"{config_path}: must hold a JSON object")
    peft_type = str(conf.get("peft_type", "LORA")).upper()
    if peft_type == "SHIRA":
        return _read_shira(path, name, cfg, conf)
    if peft_type != "LORA":
        raise AdapterError(f"{config_path}: peft_type {peft_type!r} is not LORA or SHIRA")
    if conf.get("use_dora"):
        raise AdapterError(f"{config_path}: DoRA adapters (use_dora) are not supported")
    if conf.get("bias", "none") != "none":
        raise AdapterError(f"{config_path}: bias={conf['bias']!r} trains biases; only bias='none' is supported")
    if conf.get("modules_to_save"):
        raise AdapterError(f"{config_path}: modules_to_save={conf['modules_to_save']} replaces whole modules; "
                           f"not supported")
    weights = path / "adapter_model.safetensors"
    st = _open_weights(path)
    try:
        alpha = float(conf.get("lora_alpha", conf.get("r", 8)))
        rank = int(conf.get("r", 8))
    except (TypeError, ValueError):
        raise AdapterError(f"{config_path}: r and lora_alpha must be numbers") from None
    rslora = bool(conf.get("use_rslora", False))
    rank_pattern, alpha_pattern = conf.get("rank_pattern") or {}, conf.get("alpha_pattern") or {}
    for key, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if not isinstance(pattern, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                    for v in pattern.values()):
            raise AdapterError(f"{config_path}: {key} must map module patterns to numbers, got {pattern!r}")
        for p in pattern:
            try:
                re.compile(p)
            except re.error as e:
                raise AdapterError(f"{config_path}: {key} pattern {p!r} is not a regular expression ({e})") from None

    halves: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key in st.names():
        m = _KEY.match(key)
        if m is None:
            what = "embedding or lm_head" if ("embed" in key or "lm_head" in key) else "unrecognised"
            raise AdapterError(f"{weights}: tensor {key!r} is an {what} target; only LoRA on "
                               f"{', '.join(MODULES)} is supported")
        layer, block, module, half = int(m[1]), m[2], m[3], m[4]
        if module not in MODULES:
            raise AdapterError(f"{weights}: tensor {key!r} targets {module!r}; supported: {', '.join(MODULES)}")
        halves.setdefault((layer, module), {})[half] = np.asarray(st.get(key), np.float32)

    modules = {}
    for (layer, module), ab in sorted(halves.items()):
        block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        module_key = f"model.layers.{layer}.{block}.{module}"
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise AdapterError(f"{weights}: {module_key} has no {missing} tensor")
        a, b = ab["A"], ab["B"]  # [r, in], [out, r]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{weights}: {module_key} lora_A {a.shape} and lora_B {b.shape} do not share a rank")
        r = a.shape[0]
        want_r = int(_pattern_value(rank_pattern, module_key, rank))
        if r != want_r:
            raise AdapterError(f"{weights}: {module_key} has rank {r} but adapter_config.json says {want_r}")
        mod_alpha = float(_pattern_value(alpha_pattern, module_key, alpha))
        modules[(layer, module)] = LoraModule(np.ascontiguousarray(a.T), np.ascontiguousarray(b.T),
                                              lora_scale(mod_alpha, r, rslora))
    adapter = LoraAdapter(name, str(path), modules)
    adapter.check_fits(cfg)
    return adapter


def write_peft(path: str | Path, adapter: LoraAdapter, cfg: ModelConfig, *, base_model: str = "") -> None:
    """Write `adapter` as a PEFT LoRA directory that `PeftModel.from_pretrained` loads (and
    `read_peft` reads back exactly): `r` and `lora_alpha` from the most common (rank, scale),
    `rank_pattern` / `alpha_pattern` for modules that differ. Written to a temporary sibling and
    renamed, so `path` holds either the old directory or the whole new one."""
    from safetensors.numpy import save_file

    if adapter.sparse:
        if adapter.modules:
            raise AdapterError(f"adapter {adapter.name!r} is {adapter.kind}: PEFT has no low-rank + sparse "
                               f"format (write a .vdb instead)")
        return write_shira(path, adapter, base_model=base_model)
    adapter.check_fits(cfg)
    path = Path(path)
    keyed = {}
    for (layer, module), m in sorted(adapter.modules.items(), key=lambda kv: (kv[0][0], MODULES.index(kv[0][1]))):
        block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        keyed[f"model.layers.{layer}.{block}.{module}"] = m
    shapes = [(m.rank, m.scale * m.rank) for m in keyed.values()]
    rank, alpha = max(set(shapes), key=shapes.count)
    conf = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
            "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
            "use_dora": False, "init_lora_weights": True, "modules_to_save": None, "fan_in_fan_out": False,
            "target_modules": adapter.target_modules, "inference_mode": True,
            "rank_pattern": {k: m.rank for k, m in keyed.items() if m.rank != rank},
            "alpha_pattern": {k: m.scale * m.rank for k, m in keyed.items() if m.scale * m.rank != alpha}}
    tensors = {}
    for key, m in keyed.items():
        tensors[f"base_model.model.{key}.lora_A.weight"] = np.ascontiguousarray(m.a.T, np.float32)
        tensors[f"base_model.model.{key}.lora_B.weight"] = np.ascontiguousarray(m.b.T, np.float32)

    def write(tmp: Path):
        (tmp / "adapter_config.json").write_text(json.dumps(conf, indent=2) + "\n")
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})

    _replace_dir(path, write)


def _open_weights(path: Path) -> SafeTensorsFile:
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        other = " (adapter_model.bin is a pickle: re-save with safe_serialization=True)" \
            if (path / "adapter_model.bin").is_file() else ""
        raise AdapterError(f"{path}: adapter_model.safetensors is missing{other}")
    try:
        return SafeTensorsFile(weights)
    except ModelFileError as e:
        raise AdapterError(str(e)) from None
    except OSError as e:
        raise AdapterError(f"{weights}: cannot be read ({e.strerror or e})") from None


def _read_shira(path: Path, name: str, cfg: ModelConfig, conf: dict) -> LoraAdapter:
    """A PEFT SHiRA directory -> a LoraAdapter of element-sparse modules (scale 1)."""
    from .lora import module_shapes
    from .sparse import SparseModule

    if conf.get("modules_to_save"):
        raise AdapterError(f"{path}/adapter_config.json: modules_to_save={conf['modules_to_save']} replaces "
                           f"whole modules; not supported")
    st = _open_weights(path)
    weights = path / "adapter_model.safetensors"
    halves: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key in st.names():
        m = _SHIRA_KEY.match(key)
        if m is None:
            raise AdapterError(f"{weights}: tensor {key!r} is not a SHiRA weight or index of "
                               f"{', '.join(MODULES)}")
        layer, module, half = int(m[1]), m[3], m[4]
        if module not in MODULES:
            raise AdapterError(f"{weights}: tensor {key!r} targets {module!r}; supported: {', '.join(MODULES)}")
        halves.setdefault((layer, module), {})[half] = np.asarray(st.get(key))
    shapes = module_shapes(cfg)
    sparse = {}
    for (layer, module), parts in sorted(halves.items()):
        where = f"{weights}: layer {layer} {module}"
        if set(parts) != {"weight", "indices"}:
            raise AdapterError(f"{where} has no shira_{'indices' if 'weight' in parts else 'weight'} tensor")
        idx, w = parts["indices"], parts["weight"]
        if idx.ndim != 2 or idx.shape[0] != 2 or w.ndim != 1 or idx.shape[1] != w.shape[0]:
            raise AdapterError(f"{where}: shira_indices {idx.shape} and shira_weight {w.shape} do not match "
                               f"([2, nnz] and [nnz])")
        if not np.array_equal(idx, np.round(idx)):  # saved as float32 on Windows
            raise AdapterError(f"{where}: shira_indices are not integers")
        sparse[(layer, module)] = SparseModule(idx[0].astype(np.int32), idx[1].astype(np.int32),
                                               np.asarray(w, np.float32), shapes.get(module, (0, 0)))
    adapter = LoraAdapter(name, str(path), {}, sparse=sparse)
    adapter.check_fits(cfg)
    return adapter


def shira_rank(adapter: LoraAdapter) -> int | None:
    """The r of PEFT's ShiraConfig whose r * (in + out) entries every module holds, or None."""
    rs = set()
    for m in adapter.sparse.values():
        din, dout = m.shape
        rs.add(m.nnz / (din + dout))
    if len(rs) != 1:
        return None
    r = rs.pop()
    return int(r) if r == int(r) and r >= 1 else None


def write_shira(path: str | Path, adapter: LoraAdapter, *, base_model: str = "") -> None:
    """Write an element-sparse adapter as a PEFT SHiRA directory `PeftModel.from_pretrained` loads."""
    from safetensors.numpy import save_file

    if adapter.kind != "shira":
        raise AdapterError(f"adapter {adapter.name!r} is {adapter.kind}; PEFT's SHiRA format holds "
                           f"element-sparse modules only (write a .vdb instead)")
    r = shira_rank(adapter)
    if r is None:
        raise AdapterError(f"adapter {adapter.name!r}: PEFT's SHiRA format needs r * (in + out) entries in every "
                           f"module for one integer r (PEFT rebuilds the modules from r before loading); "
                           f"this adapter's modules differ: write a .vdb instead")
    tensors = {}
    for (layer, module), m in sorted(adapter.sparse.items(), key=lambda kv: (kv[0][0], MODULES.index(kv[0][1]))):
        block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        key = f"base_model.model.model.layers.{layer}.{block}.{module}"
        tensors[f"{key}.shira_weight"] = (m.values * np.float32(m.scale)).astype(np.float32)
        tensors[f"{key}.shira_indices"] = np.stack([m.rows, m.cols]).astype(np.int32)
    conf = {"peft_type": "SHIRA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
            "r": r, "mask_type": "random", "random_seed": None, "target_modules": adapter.target_modules,
            "fan_in_fan_out": False, "init_weights": True, "modules_to_save": None, "inference_mode": True}

    def write(tmp: Path):
        (tmp / "adapter_config.json").write_text(json.dumps(conf, indent=2) + "\n")
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})

    _replace_dir(Path(path), write)


def _replace_dir(path: Path, write) -> None:
    """Run `write(tmp)` on a temporary sibling, then rename it over `path` (all or nothing)."""
    import os
    import shutil
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
