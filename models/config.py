"""Model configuration: read llava-hf or original LLaVA config.json, fill the defaults they omit."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .jsonfile import read_json_object


class ConfigError(ValueError):
    """A config.json that is missing, unreadable, or asks for something this engine does not support."""


@dataclass
class TextConfig:
    """LLaMA decoder shape. Defaults are transformers' LlamaConfig defaults (llava-hf relies on them)."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0  # linear RoPE scaling; 1.0 = none
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: list[int] = field(default_factory=lambda: [2])

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads


@dataclass
class VisionConfig:
    """CLIP vision tower shape. Defaults are transformers' CLIPVisionConfig defaults."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# What LlavaConfig uses when config.json has no vision_config at all (CLIP ViT-L/14-336).
LLAVA_DEFAULT_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                            num_attention_heads=16, image_size=336, patch_size=14)


@dataclass
class LlavaConfig:
    """Everything the engine needs to build and feed a LLaVA-1.5 model."""
    text: TextConfig
    vision: VisionConfig
    image_token_index: int = 32000
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: str = "default"
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    image_aspect_ratio: str = "crop"   # "pad" = original LLaVA-1.5 pad-to-square preprocessing
    layout: str = "llava-hf"          # "llava-hf" or "original"
    vision_tower_path: str | None = None  # original LLaVA: where the CLIP checkpoint lives
    checkpoint_dtype: str | None = None   # config.json's dtype / torch_dtype: what the weights were saved in

    @property
    def image_seq_length(self) -> int:
        """Visual tokens each image contributes (576 at 336/14 with CLS dropped)."""
        extra = 1 if self.vision_feature_select_strategy == "full" else 0
        return self.vision.num_patches + extra

    @property
    def feature_layers(self) -> list[int]:
        layers = self.vision_feature_layer
        return [layers] if isinstance(layers, int) else list(layers)


_TEXT_FIELDS = set(TextConfig.__dataclass_fields__)
_VISION_FIELDS = set(VisionConfig.__dataclass_fields__)
_COUNTS = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "max_position_embeddings", "num_channels", "image_size", "patch_size"}
_POSITIVE_REALS = {"rms_norm_eps", "rope_theta", "layer_norm_eps"}
_FLAGS = {"attention_bias", "mlp_bias"}


def _check_fields(kw: dict, where: str) -> None:
    """ConfigError for a field of the wrong type or range, before it can fail deep inside the model."""
    for k, v in kw.items():
        if v is None and k in ("num_key_value_heads", "head_dim"):
            continue
        if k in _COUNTS and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"config.json: {where}{k} must be a positive integer, got {v!r}")
        if k in _POSITIVE_REALS and (isinstance(v, bool) or not isinstance(v, (int, float))
                                     or not 0 < v < float("inf")):
            raise ConfigError(f"config.json: {where}{k} must be a positive number, got {v!r}")
        if k in _FLAGS and not isinstance(v, bool):
            raise ConfigError(f"config.json: {where}{k} must be true or false, got {v!r}")


def _int_field(v, name: str, allow_list: bool = False) -> None:
    ok = lambda x: isinstance(x, int) and not isinstance(x, bool)  # noqa: E731
    if not (ok(v) or allow_list and isinstance(v, list) and v and all(map(ok, v))):
        raise ConfigError(f"config.json: {name} must be an integer{' or a list of integers' if allow_list else ''}, "
                          f"got {v!r}")


def _rope(d: dict) -> tuple[float, float]:
    """(theta, linear factor) from rope_theta / rope_scaling (old) or rope_parameters (transformers 5)."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ConfigError("config.json: rope_parameters / rope_scaling must be objects")
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    _check_fields({"rope_theta": theta}, "")
    theta = float(theta)
    spec = params if params.get("rope_type", params.get("type")) not in (None, "default") else scaling
    kind = spec.get("rope_type", spec.get("type", "default")) if spec else "default"
    if kind == "default":
        return theta, 1.0
    if kind == "linear":
        factor = spec.get("factor")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < float("inf"):
            raise ConfigError(f"config.json: linear rope scaling needs a positive 'factor', got {factor!r}")
        return theta, float(factor)
    raise ConfigError(f"config.json: rope scaling type {kind!r} is not supported (only 'default' and 'linear')")


def _text_config(d: dict, check_model_type: bool = True) -> TextConfig:
    kw = {k: v for k, v in d.items() if k in _TEXT_FIELDS and k not in ("rope_theta", "eos_token_id")}
    kw["rope_theta"], kw["rope_scaling_factor"] = _rope(d)
    eos = d.get("eos_token_id", 2)
    if eos is not None:
        _int_field(eos, "eos_token_id", allow_list=True)
    kw["eos_token_id"] = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    _check_fields(kw, "text ")
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json: text hidden_act {d['hidden_act']!r} is not supported (only 'silu')")
    mt = d.get("model_type", "llama")
    if check_model_type and mt not in ("llama", "vicuna"):
        raise ConfigError(f"config.json: text model_type {mt!r} is not supported (only 'llama')")
    return TextConfig(**kw)


def _vision_config(d: dict | None) -> VisionConfig:
    if d is None:
        return VisionConfig(**LLAVA_DEFAULT_VISION)
    kw = {k: v for k, v in d.items() if k in _VISION_FIELDS}
    for k in ("image_size", "patch_size"):
        if isinstance(kw.get(k), (list, tuple)):
            kw[k] = kw[k][0]
    _check_fields(kw, "vision ")
    mt = d.get("model_type", "clip_vision_model")
    if mt not in ("clip_vision_model", "clip"):
        raise ConfigError(f"config.json: vision model_type {mt!r} is not supported (only CLIP)")
    if kw.get("hidden_act", "quick_gelu") not in ("quick_gelu", "gelu"):
        raise ConfigError(f"config.json: vision hidden_act {kw['hidden_act']!r} is not supported")
    return VisionConfig(**kw)


def _checkpoint_dtype(d: dict) -> str | None:
    """The saved weights' dtype: `dtype` (transformers 5) or `torch_dtype`, top level or text_config."""
    for src in (d, d.get("text_config") or {}):
        for k in ("dtype", "torch_dtype"):
            if isinstance(src.get(k), str):
                return src[k].removeprefix("torch.")
    return None


def _read_json(path: Path) -> dict:
    return read_json_object(path, ConfigError)


def _original_config(d: dict, model_dir: Path) -> LlavaConfig:
    """Original haotian-liu/LLaVA config: a LlamaConfig plus mm_* fields; CLIP lives in its own checkpoint."""
    if d.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise ConfigError(f"config.json: mm_projector_type {d.get('mm_projector_type')!r} is not supported "
                          "(only 'mlp2x_gelu', the LLaVA-1.5 projector)")
    if d.get("mm_use_im_start_end"):
        raise ConfigError("config.json: mm_use_im_start_end=true is not supported")
    select = d.get("mm_vision_select_feature", "patch")
    strategies = {"patch": "default", "cls_patch": "full"}
    if select not in strategies:
        raise ConfigError(f"config.json: mm_vision_select_feature {select!r} is not supported")
    tower = d.get("mm_vision_tower")
    if not tower:
        raise ConfigError("config.json: original LLaVA config has no mm_vision_tower")
    tower_dir = Path(tower) if Path(tower).is_absolute() else model_dir / tower
    if not tower_dir.is_dir():
        from .hub_cache import find_snapshot, is_repo_id  # here: hub_cache imports this module
        # The released configs name the hub id (openai/clip-vit-large-patch14-336): use its cached snapshot.
        snap = find_snapshot(tower)[0] if is_repo_id(tower) else None
        tower_dir = snap or tower_dir
    vision_json = tower_dir / "config.json"
    vd = _read_json(vision_json) if vision_json.exists() else None
    if vd is not None and "vision_config" in vd:  # a full CLIPModel config
        vd = vd["vision_config"]
        if not isinstance(vd, dict):
            raise ConfigError(f"{vision_json}: vision_config must be an object")
    # The top-level model_type is LLaVA's own ("llava" / "llava_llama"), not the text model's.
    text = _text_config(d, check_model_type=False)
    text.vocab_size = d.get("vocab_size", 32000)
    return LlavaConfig(
        text=text, vision=_vision_config(vd) if vd is not None else VisionConfig(**LLAVA_DEFAULT_VISION),
        # Original LLaVA splices features in place of a sentinel (-200) rather than a vocab token;
        # the engine uses an id past the vocabulary for the same role.
        image_token_index=d.get("image_token_index", -200),
        vision_feature_layer=d.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=strategies[select],
        tie_word_embeddings=d.get("tie_word_embeddings", False),
        pad_token_id=d.get("pad_token_id"),
        image_aspect_ratio=d.get("image_aspect_ratio", "pad"),
        layout="original", vision_tower_path=str(tower_dir), checkpoint_dtype=_checkpoint_dtype(d))


def load_config(model_dir: str | Path) -> LlavaConfig:
    """Read <model_dir>/config.json (llava-hf or original LLaVA) into a validated LlavaConfig."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir}: model directory not found")
    d = _read_json(model_dir / "config.json")
    if "mm_projector_type" in d or "mm_vision_tower" in d:
        cfg = _original_config(d, model_dir)
    else:
        mt = d.get("model_type", "llava")
        if mt != "llava":
            raise ConfigError(f"config.json: model_type {mt!r} is not supported (only 'llava')")
        for key in ("text_config", "vision_config"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise ConfigError(f"config.json: {key} must be an object, got {type(d[key]).__name__}")
        text = _text_config(d.get("text_config") or {})
        tie = d.get("tie_word_embeddings", (d.get("text_config") or {}).get("tie_word_embeddings", False))
        cfg = LlavaConfig(
            text=text, vision=_vision_config(d.get("vision_config")),
            image_token_index=d.get("image_token_index", d.get("image_token_id", 32000)),
            projector_hidden_act=d.get("projector_hidden_act", "gelu"),
            projector_bias=d.get("multimodal_projector_bias", True),
            vision_feature_layer=d.get("vision_feature_layer", -2),
            vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
            tie_word_embeddings=tie, pad_token_id=d.get("pad_token_id"), checkpoint_dtype=_checkpoint_dtype(d))
    _validate(cfg)
    return cfg


def _validate(cfg: LlavaConfig) -> None:
    t, v = cfg.text, cfg.vision
    _int_field(cfg.image_token_index, "image_token_index")
    _int_field(cfg.vision_feature_layer, "vision_feature_layer", allow_list=True)
    if cfg.pad_token_id is not None:
        _int_field(cfg.pad_token_id, "pad_token_id")
    if cfg.vision_feature_select_strategy not in ("default", "full"):
        raise ConfigError(f"config.json: vision_feature_select_strategy "
                          f"{cfg.vision_feature_select_strategy!r} is not supported ('default' or 'full')")
    if cfg.projector_hidden_act != "gelu":
        raise ConfigError(f"config.json: projector_hidden_act {cfg.projector_hidden_act!r} is not supported")
    for layer in cfg.feature_layers:
        if not -v.num_hidden_layers - 1 <= layer <= v.num_hidden_layers:
            raise ConfigError(f"config.json: vision_feature_layer {layer} is out of range "
                              f"for a {v.num_hidden_layers}-layer vision tower")
    if t.num_attention_heads % t.num_key_value_heads:
        raise ConfigError(f"config.json: num_attention_heads {t.num_attention_heads} is not a multiple "
                          f"of num_key_value_heads {t.num_key_value_heads}")
    if v.hidden_size % v.num_attention_heads:
        raise ConfigError("config.json: vision hidden_size is not a multiple of its attention heads")
    if v.image_size % v.patch_size:
        raise ConfigError(f"config.json: image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
