"""HF model directories on disk: config.json plus safetensors (single file or sharded), read and written."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import jax.numpy as jnp
import numpy as np

from flexmoe_jax.config import ModelConfig
from flexmoe_jax.hf.config_map import HFFormatError, config_from_hf, config_to_hf
from flexmoe_jax.hf.tensor_map import Source, check_exportable, convert_in, hf_tensors

Params = dict[str, Any]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

_SAFETENSORS_FLOATS = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16}


@contextlib.contextmanager
def _safetensors_source(path: Path) -> Iterator[Source]:
    """The tensors of a single-file or sharded safetensors checkpoint, read lazily per tensor."""
    from safetensors import safe_open

    if (path / INDEX_NAME).exists():
        try:
            weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise HFFormatError(f"{path / INDEX_NAME} is not a valid safetensors index ({e})") from e
        files = sorted(set(weight_map.values()))
    elif (path / WEIGHTS_NAME).exists():
        weight_map, files = None, [WEIGHTS_NAME]
    else:
        other = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = (f" It holds {other[:3]}: re-save with save_pretrained(..., safe_serialization=True)."
                if other else "")
        raise HFFormatError(f"no weights in {path}: expected {WEIGHTS_NAME} or {INDEX_NAME}.{hint}")
    for f in files:
        if not (path / f).exists():
            raise HFFormatError(f"shard {f} listed in {path / INDEX_NAME} is missing; the download or copy "
                                "is incomplete")
    with contextlib.ExitStack() as stack:
        handles, keys = {}, {}
        for f in files:
            try:
                handles[f] = stack.enter_context(safe_open(str(path / f), framework="np"))
            except Exception as e:  # safetensors raises its own error types for a damaged header
                raise HFFormatError(f"{path / f} is not a readable safetensors file ({e}); "
                                    "re-download or re-save it") from e
            keys[f] = set(handles[f].keys())
        if weight_map is None:
            weight_map = dict.fromkeys(keys[WEIGHTS_NAME], WEIGHTS_NAME)
        for name, f in weight_map.items():
            if name not in keys[f]:
                raise HFFormatError(f"{path / INDEX_NAME} says {name} is in {f}, but it is not there")

        def shape(n):
            return tuple(handles[weight_map[n]].get_slice(n).get_shape())

        def dtype(n):
            code = handles[weight_map[n]].get_slice(n).get_dtype()
            if code not in _SAFETENSORS_FLOATS:
                raise HFFormatError(f"tensor {n} in {path} has dtype {code}; only float tensors can be imported")
            return _SAFETENSORS_FLOATS[code]

        yield Source(weight_map, shape, dtype, lambda n: handles[weight_map[n]].get_tensor(n), str(path))


def from_hf(path: str | Path, *, dtype=None) -> tuple[ModelConfig, Params]:
    """Load a local HF FlexOlmoForCausalLM / Olmo2ForCausalLM directory as ``(config, params)``.

    Params are host numpy arrays in the dtype stored on disk (bf16 stays bf16),
    or ``dtype`` if given; place them with ``jax.device_put``. The config's
    ``param_dtype`` says which; its compute ``dtype`` stays float32.
    """
    path = Path(path)
    if not path.is_dir():
        raise HFFormatError(f"{path} is not a directory; from_hf needs a local HF model directory "
                            "(download it first, e.g. with huggingface_hub.snapshot_download)")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.exists():
        raise HFFormatError(f"no {CONFIG_NAME} in {path}; is this an HF transformers model directory?")
    try:
        hf = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise HFFormatError(f"{cfg_file} is not valid JSON: {e}") from e
    config = config_from_hf(hf, str(cfg_file))
    with _safetensors_source(path) as src:
        return convert_in(config, src, dtype)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or an HF-style string ("5GB" = 5e9 bytes, "500MiB" = 500 * 2**20)."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        value = int(size)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _UNITS:
            raise HFFormatError(f"max_shard_size {size!r} is not a size; use bytes or e.g. '5GB', '500MB'")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise HFFormatError(f"max_shard_size must be positive, got {size!r}")
    return value


def _plan_shards(entries, max_bytes: int | None) -> list[list]:
    """Greedy, in order (as transformers does): a new shard when the next tensor would overflow."""
    shards, size = [[]], 0
    for entry in entries:
        nbytes = math.prod(entry[1]) * np.dtype(entry[2]).itemsize
        if max_bytes is not None and shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _tokenizer_files(spm_model: Path, out: Path, config: ModelConfig) -> None:
    """The anchor's SentencePiece model as an HF tokenizer (``tokenizer.model`` + ``tokenizer_config.json``,
    the Llama SentencePiece tokenizer: same pieces, no BOS, no added prefix space, byte fallback) that
    ``AutoTokenizer.from_pretrained`` loads and that encodes exactly as SentencePiece does (tested)."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    if sp.get_piece_size() > config.vocab_size:
        raise HFFormatError(f"the tokenizer {spm_model} has {sp.get_piece_size()} pieces but the model's vocabulary is "
                            f"{config.vocab_size}: export with the tokenizer the model was trained with")
    shutil.copyfile(spm_model, out / "tokenizer.model")
    special = {"pad_token": sp.id_to_piece(0), "eos_token": sp.id_to_piece(1), "unk_token": sp.id_to_piece(2)}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False, "bos_token": None,
        "add_prefix_space": False, "legacy": False, "model_max_length": config.max_seq_len, **special},
        indent=2, sort_keys=True) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")


def _generation_config(config: ModelConfig) -> dict:
    eos = 1 if config.eos_token_id is None else config.eos_token_id
    return {"eos_token_id": eos, "pad_token_id": 0 if config.pad_token_id is None else config.pad_token_id,
            "bos_token_id": None, "do_sample": False, "max_length": config.max_seq_len}


def _normal_modes(root: Path) -> None:
    """Directories 0777 and files 0666, less the umask (mkdtemp made them private)."""
    umask = os.umask(0)
    os.umask(umask)
    for d, _, files in os.walk(root):
        os.chmod(d, 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(d, f), 0o666 & ~umask)


def to_hf(config: ModelConfig, params: Params, path: str | Path, *, max_shard_size: int | str | None = None,
          overwrite: bool = False, tokenizer: str | Path | None = None) -> Path:
    """Write ``(config, params)`` as an HF model directory transformers loads with from_pretrained.

    MoE configs become FlexOlmoForCausalLM, dense ones Olmo2ForCausalLM; our
    expert names ride along in config.json as ``flexmoe_expert_names``. With
    ``max_shard_size`` (bytes or "5GB") the weights are split into shards plus
    ``model.safetensors.index.json``. Everything is written into a temporary
    directory beside ``path`` and renamed into place, so a crash never leaves a
    half-written model. An existing non-empty ``path`` is replaced only with
    ``overwrite=True``. ``tokenizer``: the anchor's ``spm.model``, written as an HF tokenizer
    (:func:`_tokenizer_files`); ``generation_config.json`` is always written (greedy, the model's
    EOS and padding ids). Files get the usual modes (0644 / 0755 under umask 022).
    """
    path = Path(path)
    params = check_exportable(config, params)
    max_bytes = None if max_shard_size is None else parse_size(max_shard_size)
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise HFFormatError(f"{path} already exists and is not empty; pass overwrite=True or pick a new path")
    from safetensors.numpy import save_file

    entries = list(hf_tensors(config, params))
    shards = _plan_shards(entries, max_bytes)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        hf_cfg = config_to_hf(config, np.dtype(entries[0][2]).name)
        (tmp / CONFIG_NAME).write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
        weight_map, total = {}, 0
        for n, shard in enumerate(shards, 1):
            fname = WEIGHTS_NAME if len(shards) == 1 else f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            tensors = {name: thunk() for name, _, _, thunk in shard}
            # transformers refuses safetensors files whose metadata format is not "pt".
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            total += sum(t.nbytes for t in tensors.values())
            weight_map.update({name: fname for name in tensors})
            del tensors
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(_generation_config(config), indent=2) + "\n")
        if tokenizer is not None:
            _tokenizer_files(Path(tokenizer), tmp, config)
        _normal_modes(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            path.rename(old / "x")
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path

