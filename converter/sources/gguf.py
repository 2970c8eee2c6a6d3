"""GGUF source: a llama.cpp ``.gguf`` file read one tensor at a time under Hugging Face names.

transformers can load a GGUF (``from_pretrained(..., gguf_file=...)``), but only by dequantizing the
whole model into memory, and the result refuses ``save_pretrained``. This reader does the same
conversion per tensor, with transformers' own pieces so that names, shapes, values and config equal
what transformers would load (``tests/test_source_gguf.py`` checks that against ``from_pretrained``):

- the config: what ``AutoConfig.from_pretrained(folder, gguf_file=name)`` returns (metadata only);
- the GGUF -> HF name map: ``get_gguf_hf_weights_map`` over the architecture built on the meta device;
- the values: ``gguf.dequantize`` then the architecture's ``TensorProcessor`` from
  ``transformers.modeling_gguf_pytorch_utils``, exactly as ``load_gguf_checkpoint(return_tensors=True)``
  runs them. For Llama the processor undoes llama.cpp's rotary permutation of the q/k weights, without
  which the model produces garbage (pinned by ``test_tiny_llama_matches_transformers``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qconv.errors import SourceError
from qconv.manifest import BaseModelEntry, parse_base_model
from qconv.sources.base import Source, TensorInfo

# GGUF float types that ``read`` returns as stored; every other type is dequantized to float32.
_STORED_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Keys of transformers' GGUF mapping table that are metadata groups, not architectures.
_NOT_ARCHITECTURES = {"general", "tokenizer"}
# The metadata keys that name the Hub repo of the model in the file, first found wins: the model
# the GGUF was converted from, then the repo of the GGUF itself (gguf-py's constants.py: "Model
# Source during conversion", "Typically represents the converted GGUF repo"). Not
# general.base_model.*: llama.cpp's convert_hf_to_gguf.py fills those from the converted model's
# own card `base_model` (gguf-py metadata.py), so they name the model it was fine-tuned from (for
# SmolLM2-135M-Instruct: SmolLM2-135M), not the model whose weights the file holds.
_HUB_URL_KEYS = ("general.source.repo_url", "general.repo_url")
_HUB_MODEL_URL = re.compile(r"https?://huggingface\.co/([^/?#]+/[^/?#]+?)(?:/tree/([^/?#]+))?/?")
# Config entries that describe this machine's file, not the model: no place in a shipped config.json.
_LOCAL_CONFIG_KEYS = ("_name_or_path", "_model_name_or_path")


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' info/warning logs and progress bars for the duration; restore after."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _memoized_tensor_name_map():
    """Build gguf's TensorNameMap once per (architecture, layers) while mapping names.

    ``get_gguf_hf_weights_map`` recurses into every submodule and rebuilds the map for each: about 400
    times for a 30-layer Llama, most of the seconds it takes. The map is a pure function of its
    arguments and only read, so sharing one changes nothing but the time. It looks the function up on
    the ``gguf`` module at call time, which is where it is swapped here.
    """
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def _string_field(reader, key: str) -> str | None:
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


class GGUFSource(Source):
    """A ``.gguf`` file, streamed: each ``read`` dequantizes one tensor."""

    kind = "gguf"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.ref = str(path)
        self._reader = self._open_reader()
        self.architecture = self._gguf_architecture()
        self._processor_config = self._transformers_gguf_config()
        self._config = self._load_config()
        meta_model = self._meta_model()
        self._config.architectures = [type(meta_model).__name__]
        self._processor, self._key_map = self._name_map(meta_model)
        self._infos, self._by_name = self._plan(meta_model)
        self._quantized = any(t.tensor_type.name not in _STORED_DTYPES for t, _info in self._by_name.values())

    # --- opening -------------------------------------------------------------------------------------

    def _open_reader(self):
        """The first file's reader (the metadata); a split GGUF's other parts are opened too,
        named as gguf-split names them beside the first (``NAME-00001-of-00003.gguf``)."""
        reader = self._read(self.path)
        split = reader.fields.get("split.count")
        parts = int(split.parts[split.data[0]][0]) if split is not None and split.data else 1
        self._parts = [reader]
        self._part_paths = [self.path]
        if parts > 1:
            match = re.fullmatch(r"(.*)-(\d{5})-of-(\d{5})\.gguf", self.path.name)
            if match is None or int(match.group(2)) != 1 or int(match.group(3)) != parts:
                raise SourceError(
                    f"{self.path}: one part of a {parts}-part split GGUF; give its first part, "
                    f"NAME-00001-of-{parts:05d}.gguf"
                )
            for index in range(2, parts + 1):
                part = self.path.with_name(f"{match.group(1)}-{index:05d}-of-{parts:05d}.gguf")
                if not part.is_file():
                    raise SourceError(f"{self.path}: part {index} of {parts} is missing ({part.name})")
                self._parts.append(self._read(part))
                self._part_paths.append(part)
        return reader

    def _read(self, path: Path):
        from gguf import GGUFReader

        try:
            reader = GGUFReader(path)
        except OSError as exc:
            raise SourceError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        except Exception as exc:  # the reader raises ValueError, IndexError, struct errors... on bad bytes
            raise SourceError(f"{path}: not a valid GGUF file (truncated or corrupt?): {exc}") from exc
        for tensor in reader.tensors:
            # A file cut inside the tensor data can still parse: the memory map just ends early.
            if tensor.data.nbytes != tensor.n_bytes:
                raise SourceError(
                    f"{path}: truncated: tensor {tensor.name!r} has {tensor.data.nbytes} of its "
                    f"{tensor.n_bytes} bytes"
                )
        return reader

    def _gguf_architecture(self) -> str:
        architecture = _string_field(self._reader, "general.architecture")
        if not architecture:
            raise SourceError(f"{self.path}: GGUF file has no general.architecture (not a model file)")
        return architecture

    def _transformers_gguf_config(self) -> dict[str, Any]:
        """The config dict transformers parses from the GGUF metadata (also what its tensor processors read)."""
        from transformers.modeling_gguf_pytorch_utils import (
            GGUF_SUPPORTED_ARCHITECTURES,
            load_gguf_checkpoint,
        )

        try:
            with _quiet_transformers():
                parsed = load_gguf_checkpoint(str(self.path), return_tensors=False)
        except ValueError as exc:
            if "not supported" in str(exc):
                supported = ", ".join(
                    sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in _NOT_ARCHITECTURES)
                )
                raise SourceError(
                    f"{self.path}: GGUF architecture {self.architecture!r} is not supported "
                    f"(transformers supports: {supported})"
                ) from exc
            raise SourceError(f"{self.path}: transformers cannot read the GGUF metadata: {exc}") from exc
        except Exception as exc:
            raise SourceError(f"{self.path}: transformers cannot read the GGUF metadata: {exc}") from exc
        return parsed["config"]

    def _load_config(self):
        """The config ``AutoConfig.from_pretrained(folder, gguf_file=name)`` returns.

        For the architectures the metadata parser above handles, that call is ``from_dict`` over the
        same dict; building it from the dict already parsed spares a second pass over the file (seconds
        for a large vocabulary; ``test_config_equals_autoconfig`` pins the equality). Architectures that
        newer transformers (``integrations.gguf.GGUF_CONFIG_ARCHS``) configures another way go through
        ``AutoConfig`` itself.
        """
        from transformers import AutoConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        try:
            from transformers.integrations.gguf import GGUF_CONFIG_ARCHS  # transformers >= 5.17
        except ImportError:
            GGUF_CONFIG_ARCHS = ()
        try:
            with _quiet_transformers():
                if self.architecture in GGUF_CONFIG_ARCHS:
                    return AutoConfig.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
                config_dict = copy.deepcopy(self._processor_config)
                return CONFIG_MAPPING[config_dict["model_type"]].from_dict(config_dict)
        except Exception as exc:
            raise SourceError(
                f"{self.path}: transformers cannot build a config from the GGUF: {exc}"
            ) from exc

    def _meta_model(self):
        """The architecture with no weights (meta device): its parameter names and shapes."""
        from transformers import AutoModelForCausalLM

        try:
            with _quiet_transformers(), torch.device("meta"):
                return AutoModelForCausalLM.from_config(copy.deepcopy(self._config))
        except Exception as exc:
            raise SourceError(
                f"{self.path}: transformers cannot build a causal LM for model type "
                f"{self._config.model_type!r}: {exc}"
            ) from exc

    def _name_map(self, meta_model):
        """The architecture's tensor processor and GGUF -> HF name map, as ``load_gguf_checkpoint`` builds them."""
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
        )

        # Keyed by the file's own architecture name, not the updated model type (a Mistral GGUF says
        # "llama" and gets the Llama processor), as in transformers.
        processor = TENSOR_PROCESSORS.get(self.architecture, TensorProcessor)(config=self._processor_config)
        try:
            with _quiet_transformers(), _memoized_tensor_name_map():
                key_map = get_gguf_hf_weights_map(meta_model, processor)
        except Exception as exc:
            raise SourceError(
                f"{self.path}: transformers has no GGUF tensor names for model type "
                f"{self._config.model_type!r}: {exc}"
            ) from exc
        return processor, key_map

    def _plan(self, meta_model) -> tuple[list[TensorInfo], dict[str, tuple[Any, TensorInfo]]]:
        """HF name, shape and dtype of every file tensor that has an HF counterpart, in file order."""
        state = meta_model.state_dict()
        infos: list[TensorInfo] = []
        by_name: dict[str, tuple[Any, TensorInfo]] = {}
        for tensor in (t for part in self._parts for t in part.tensors):
            hf_name = self._key_map.get(tensor.name)
            if hf_name is None:  # no HF counterpart (rope_freqs...): transformers skips these too
                continue
            if hf_name in by_name:
                raise SourceError(
                    f"{self.path}: GGUF tensors {by_name[hf_name][0].name!r} and {tensor.name!r} both become "
                    f"{hf_name!r} in transformers (merged, as MoE experts are); qconv streams one tensor at a time and "
                    f"cannot convert this model"
                )
            param = state.get(hf_name)
            if param is None:
                raise SourceError(
                    f"{self.path}: GGUF tensor {tensor.name!r} maps to {hf_name!r}, which "
                    f"{type(meta_model).__name__} does not have; qconv cannot stream this model"
                )
            shape = tuple(param.shape)
            if param.numel() != int(tensor.n_elements):
                raise SourceError(
                    f"{self.path}: GGUF tensor {tensor.name!r} holds {int(tensor.n_elements)} values but "
                    f"{hf_name!r} has shape {list(shape)} (config and weights disagree)"
                )
            info = TensorInfo(hf_name, shape, _STORED_DTYPES.get(tensor.tensor_type.name, torch.float32))
            infos.append(info)
            by_name[hf_name] = (tensor, info)
        tied = set(getattr(meta_model, "all_tied_weights_keys", None) or ())
        missing = [name for name in state if name not in by_name and name not in tied]
        if missing:
            raise SourceError(
                f"{self.path}: no GGUF tensor for {missing[0]!r}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; the model would be incomplete"
            )
        return infos, by_name

    # --- Source --------------------------------------------------------------------------------------

    def base_model(self) -> BaseModelEntry | None:
        """The Hub model the metadata names (a ``https://huggingface.co/ORG/NAME`` URL under one of
        :data:`_HUB_URL_KEYS`), else the Hub cache repo the file sits in, else None."""
        for key in _HUB_URL_KEYS:
            match = _HUB_MODEL_URL.fullmatch((_string_field(self._reader, key) or "").strip())
            if match is None or match[1].split("/")[0] in ("datasets", "spaces"):
                continue
            try:
                entry = parse_base_model(match[1] + (f"@{match[2]}" if match[2] else ""), origin="gguf")
            except ValueError:  # a URL that is not a model id (a dataset, a space...)
                continue
            return entry
        return super().base_model()

    def config_dict(self) -> dict[str, Any]:
        config = self._config.to_dict()
        for key in _LOCAL_CONFIG_KEYS:
            config.pop(key, None)
        config["model_type"] = self._config.model_type
        return config

    def hf_config(self):
        return copy.deepcopy(self._config)

    def tensors(self) -> list[TensorInfo]:
        return list(self._infos)

    def read(self, name: str, pin_memory: bool = False) -> torch.Tensor:  # noqa: ARG002 - dequantized in numpy; pinning would cost a copy
        from gguf import dequantize

        if self._reader is None:
            raise SourceError(f"{self.path}: cannot read tensor {name!r}: the source is closed")
        entry = self._by_name.get(name)
        if entry is None:
            raise SourceError(f"{self.path}: no tensor {name!r} in this GGUF source")
        tensor, info = entry
        try:
            weights = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise SourceError(
                f"{self.path}: tensor {tensor.name!r}: cannot dequantize GGUF type {tensor.tensor_type.name}"
            ) from exc
        except (OSError, ValueError) as exc:
            raise SourceError(f"{self.path}: cannot read tensor {tensor.name!r}: {exc}") from exc

        # The same call ``load_gguf_checkpoint`` makes. A processor that stores a tensor itself under
        # parsed_parameters["tensors"] (GPT-2's lm_head) hands back no name; one that merges several GGUF
        # tensors into one (MoE experts) cannot be streamed a tensor at a time.
        parsed: dict[str, dict] = {"tensors": {}}
        try:
            result = self._processor.process(
                weights=weights, name=tensor.name, tensor_key_mapping=self._key_map, parsed_parameters=parsed
            )
        except Exception as exc:
            raise SourceError(
                f"{self.path}: tensor {tensor.name!r}: {type(self._processor).__name__} cannot convert it "
                f"on its own ({type(exc).__name__}: {exc}); qconv cannot stream this model"
            ) from exc
        if result.name is None:
            if list(parsed["tensors"]) != [name]:
                raise SourceError(
                    f"{self.path}: tensor {tensor.name!r}: transformers builds {name!r} from several GGUF "
                    f"tensors; qconv cannot stream this model"
                )
            out = parsed["tensors"][name].contiguous()
        else:
            if self._key_map.get(result.name) != name:
                raise SourceError(
                    f"{self.path}: tensor {tensor.name!r}: transformers renames it to {result.name!r}; "
                    f"qconv cannot stream this model"
                )
            # Own, writable, C-ordered memory: F32 data is a view of the read-only memory map.
            out = torch.from_numpy(np.require(result.weights, requirements=["C", "W", "O"]))
        if tuple(out.shape) != info.shape:
            raise SourceError(
                f"{self.path}: tensor {tensor.name!r} converts to shape {list(out.shape)}, but {name!r} "
                f"has shape {list(info.shape)}"
            )
        # F16/BF16 went through float32 (exactly) for the processor; give them back as stored.
        return out.to(info.dtype)

    def hashed_files(self) -> list[Path]:
        return list(self._part_paths)

    def default_dtype(self) -> torch.dtype:
        """bfloat16 for a quantized GGUF (its weights were dequantized); else the weights' stored type."""
        if self._quantized:
            return torch.bfloat16
        # Count matrices only: llama.cpp keeps norms and biases in F32 whatever the weights' type.
        weights = [i.dtype for i in self._infos if len(i.shape) >= 2] or [i.dtype for i in self._infos]
        return Counter(weights).most_common(1)[0][0]

    def write_support_files(self, dest: Path) -> list[str]:
        from transformers import AutoTokenizer, GenerationConfig

        dest = Path(dest)
        with _quiet_transformers():
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
            except Exception as exc:
                raise SourceError(
                    f"{self.path}: cannot build the tokenizer from the GGUF metadata: {exc}"
                ) from exc
            saved = tokenizer.save_pretrained(str(dest))
            GenerationConfig.from_model_config(self._config).save_pretrained(str(dest))
        # Older transformers list files it did not write (added_tokens.json when there are none).
        names = {Path(p).name for p in saved if Path(p).is_file()}
        names.add("generation_config.json")
        return sorted(names)

    def close(self) -> None:
        # Drop the memory map; names and shapes stay answerable, reads do not.
        self._reader = None
        self._parts = []
        self._by_name = {}
