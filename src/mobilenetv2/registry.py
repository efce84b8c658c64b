"""Named variants, ``create_model`` and ``list_models``.

``mobilenet_v2_035`` ... ``mobilenet_v2_140`` are the widths the paper reports (0.35 to 1.4), the
name carrying the width x100 as timm spells it; ``mobilenet_v2_110d`` and ``mobilenet_v2_120d`` are
timm's deeper variants (width 1.1 and 1.2, depth 1.2 and 1.4, stem and head kept at 32 and 1280);
``seed`` is the walk-through's variant.
"""

from __future__ import annotations

import contextlib
import enum
import fnmatch
import inspect
import os
import pickle
from collections.abc import Iterator, Sequence
from http.client import HTTPException
from typing import Any
from urllib.error import HTTPError, URLError

from torch import nn

from .keras_weights import KERAS_TAGS
from .model import MobileNetV2, MobileNetV2Features
from .seed import SeedMobileNetV2

WIDTHS = {"035": 0.35, "050": 0.5, "075": 0.75, "100": 1.0, "130": 1.3, "140": 1.4}

# timm's width-and-depth variants, which it has ImageNet weights for.
DEEPER = {
    "110d": {"width_mult": 1.1, "depth_mult": 1.2, "fix_stem_head": True},
    "120d": {"width_mult": 1.2, "depth_mult": 1.4, "fix_stem_head": True},
}

# name -> (class, the arguments the name fixes)
_MODELS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = (
    {f"mobilenet_v2_{suffix}": (MobileNetV2, {"width_mult": width})
     for suffix, width in WIDTHS.items()}
    | {f"mobilenet_v2_{suffix}": (MobileNetV2, fixed) for suffix, fixed in DEEPER.items()}
    | {"seed": (SeedMobileNetV2, {})}
)
# Names people bring from torchvision and timm.
_ALIASES = {"mobilenet_v2": "mobilenet_v2_100"} | {
    f"mobilenetv2_{suffix}": f"mobilenet_v2_{suffix}" for suffix in [*WIDTHS, *DEEPER]
}

# Official ImageNet-1k weights (torchvision's; same layout as ours): name -> (url, eval resize).
PRETRAINED = {
    "imagenet": ("https://download.pytorch.org/models/mobilenet_v2-b0353104.pth", 256),
    "imagenet-v2": ("https://download.pytorch.org/models/mobilenet_v2-7ebf99e0.pth", 232),
}
# timm's ImageNet-1k weights (its pretrained_cfg: crop 0.875, bicubic); the file names carry
# their SHA-256 prefix, which torch.hub checks.
_TIMM_RELEASES = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/"
TIMM_WEIGHTS = {
    "mobilenet_v2_050": _TIMM_RELEASES + "mobilenetv2_050-3d30d450.pth",
    "mobilenet_v2_100": _TIMM_RELEASES + "mobilenetv2_100_ra-b33bc2c4.pth",
    "mobilenet_v2_110d": _TIMM_RELEASES + "mobilenetv2_110d_ra-77090ade.pth",
    "mobilenet_v2_120d": _TIMM_RELEASES + "mobilenetv2_120d_ra-5987e2ed.pth",
    "mobilenet_v2_140": _TIMM_RELEASES + "mobilenetv2_140_ra-21a4e913.pth",
}
# Every tag create_model(weights=...) and train --pretrained take besides a file.
WEIGHT_TAGS = (*PRETRAINED, "timm", *KERAS_TAGS)
# torchvision's names for the same two files (``MobileNet_V2_Weights``; DEFAULT is its best),
# which create_model takes as torchvision's mobilenet_v2(weights=...) does, enum members too.
TORCHVISION_WEIGHT_NAMES = {"IMAGENET1K_V1": "imagenet", "IMAGENET1K_V2": "imagenet-v2",
                            "DEFAULT": "imagenet-v2"}


def weights_tag(weights: Any) -> Any:
    """Our tag for torchvision's name of its weights (``"IMAGENET1K_V2"``,
    ``"MobileNet_V2_Weights.DEFAULT"`` or the enum member itself); anything else unchanged."""
    if isinstance(weights, enum.Enum):
        url = getattr(weights.value, "url", None)
        for tag, (official, _) in PRETRAINED.items():
            if url == official:
                return tag
        raise ValueError(f"{weights} is not a torchvision MobileNetV2 weights file: pass "
                         f"torchvision's MobileNet_V2_Weights, a tag or a file")
    if isinstance(weights, str):
        enum_name, dot, member = weights.partition(".")
        name = member if dot and enum_name == "MobileNet_V2_Weights" else weights
        return TORCHVISION_WEIGHT_NAMES.get(name, weights)
    return weights


# How to pass a file downloaded by hand instead of a tag (said when a download fails).
_INSTEAD = "train --pretrained FILE, or --weights FILE; in Python create_model(name, weights=FILE)"


def official_preprocessing(url_or_name: str) -> dict[str, Any] | None:
    """How the official torchvision or timm weights file of this URL or file name was
    evaluated (``resize``, ``crop_pct``, ``interpolation``); None for any other file. The
    files carry no metadata, so a user's copy of one is known by its (hash-bearing) name."""
    name = url_or_name.rsplit("/", 1)[-1]
    for url, resize in PRETRAINED.values():
        if url.endswith("/" + name):
            return {"resize": resize, "crop_pct": 224 / resize, "interpolation": "bilinear"}
    if any(url.endswith("/" + name) for url in TIMM_WEIGHTS.values()):
        return {"resize": 256, "crop_pct": 224 / 256, "interpolation": "bicubic"}
    return None


class WeightsDownloadError(OSError):
    """Weights that could not be downloaded (no network, a proxy, a server error): an
    ``OSError``, as the error it replaces, whose message says what to do instead."""


@contextlib.contextmanager
def explain_download(what: str, url: str, instead: str) -> Iterator[None]:
    """Turn a failed download of ``url`` into one line: which weights (``what``), from where,
    why, and what to do instead (``instead``: how to pass a file, e.g. ``--pretrained FILE``).

    Raises:
        WeightsDownloadError: for urllib's errors (no network, HTTP errors), timeouts and
            connections cut off mid-download; a download whose hash is not the published one;
            and a copy in torch.hub's cache that cannot be read (it is never checked again).
    """
    from torch.hub import get_dir

    cached = os.path.join(get_dir(), "checkpoints", url.rsplit("/", 1)[-1])
    was_cached = os.path.isfile(cached)
    try:
        yield
    except (OSError, HTTPException) as e:
        # URLError's text is "<urlopen error [Errno -2] Name or service not known>": say why.
        why = e.reason if isinstance(e, URLError) and not isinstance(e, HTTPError) else e
        raise WeightsDownloadError(
            f"could not download {what} ({str(why) or type(why).__name__}): download the "
            f"file by hand, with a browser or curl -LO {url}, and pass its path ({instead}), "
            f"or save it as {cached}, where the tag finds it") from None
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        why = " ".join(str(e).split())[:200] or type(e).__name__
        if was_cached:  # torch.hub checks the hash of a download, never of its cache
            raise WeightsDownloadError(
                f"{cached}, the cached copy of {what}, cannot be read ({why}): delete it and run "
                "again to download it afresh") from None
        if "invalid hash value" in why:
            raise WeightsDownloadError(
                f"the download of {what} arrived damaged ({why}) and was not kept: run again, "
                f"or download it by hand (curl -LO {url}) and pass its path ({instead})") from None
        raise


def list_models(filter: str | Sequence[str] = "") -> list[str]:
    """The registered model names, sorted.

    Args:
        filter: a shell-style pattern (``"mobilenet_v2_1*"``), or several, as timm's
            ``list_models`` takes; a name matches when it or a spelling ``create_model``
            accepts for it matches (``"mobilenetv2_*"``, timm's, lists every width).
    """
    patterns = [filter] if isinstance(filter, str) else list(filter)
    if not any(patterns):
        return sorted(_MODELS)
    spellings = {name: [name] for name in _MODELS}
    for alias, name in _ALIASES.items():
        spellings[name].append(alias)
    return sorted(name for name, names in spellings.items()
                  if any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns if p))


def create_model(
    name: str,
    *,
    weights: str | os.PathLike[str] | None = None,
    features_only: bool = False,
    out_indices: int | Sequence[int] | None = None,
    out_rows: Sequence[int] | None = None,
    progress: bool = True,
    use_ema: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model by name, optionally loading weights.

    Args:
        name: one of :func:`list_models` (``mobilenet_v2`` and timm's ``mobilenetv2_100``
            spellings are accepted too).
        weights: a weights file in any format :func:`load_weights` reads, or ImageNet-1k
            weights by tag, downloaded once into the torch hub cache: ``"imagenet"`` /
            ``"imagenet-v2"`` (torchvision's, ``mobilenet_v2_100``), ``"timm"`` (timm's, for
            ``_050``, ``_100``, ``_110d``, ``_120d``, ``_140``) or ``"keras"`` (Keras', widths
            0.35 to 1.4; the model is built with the TensorFlow padding and BatchNorm epsilon
            they need); ``"keras-96"``, ``-128``, ``-160``, ``-192``: Keras' weights trained at
            that input size, which ``meta["input_size"]`` then says. torchvision's names of
            its two files are taken too: ``"IMAGENET1K_V1"``, ``"IMAGENET1K_V2"``,
            ``"DEFAULT"`` (V2) and ``torchvision.models.MobileNet_V2_Weights`` members.
        features_only: return a backbone whose forward gives a list of feature maps.
        out_indices: which of timm's five taps ``features_only`` returns (strides 2, 4, 8, 16,
            32: the last row of the table at each stride), as in timm; an int ``n`` the last
            ``n``; default: all five.
        out_rows: rows of the table (0 to 6) to return instead of taps, for the maps between
            them (e.g. ``[3, 5]``: 64 channels at stride 16, 160 at stride 32).
        progress: show a progress bar on stderr while a tag's weights download, as
            torchvision's builders' ``progress`` does.
        use_ema: load the EMA weights of a training checkpoint ``weights`` (timm's
            ``state_dict_ema``, torchvision's ``model_ema``, our ``checkpoint.pt``'s ``ema``)
            rather than its raw ones, as timm's ``load_checkpoint(use_ema=True)``.
        **kwargs: constructor arguments, e.g. ``num_classes=10, small_input=True``
            (timm's ``in_chans`` and ``drop_rate`` are taken for ``in_channels`` and
            ``dropout``; ``pretrained=False`` is accepted, ``pretrained=True`` asks to name
            the weights). With ``weights``,
            passing ``num_classes`` or ``in_channels`` means fine-tuning, as in timm: a
            classifier for other classes starts afresh (with ``num_classes``), RGB stem filters
            are adapted to the channels (with ``in_channels``; see
            :func:`mobilenetv2.weights.load_weights`'s ``adapt``); otherwise weights that do
            not fit are refused.

    Raises:
        ValueError: for an unknown name or argument, or weights that do not fit.
        TypeError: for a name that is not a string (``create_model(args.model)`` unset).
    """
    if not isinstance(name, str):
        raise TypeError(f"create_model takes a model name, one of {', '.join(list_models())}; "
                        f"got {type(name).__name__} {name!r}")
    canonical = _ALIASES.get(name, name)
    if canonical not in _MODELS:
        base, dot, tag = name.partition(".")
        if dot and _ALIASES.get(base, base) in _MODELS:  # timm's "mobilenetv2_100.ra_in1k"
            raise ValueError(f"unknown model {name!r}: name the weights apart, "
                             f"create_model({base!r}, weights='timm') for timm's {tag}")
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    cls, fixed = _MODELS[canonical]
    weights = weights_tag(weights)
    if kwargs.pop("pretrained", False) or isinstance(weights, bool):  # timm's switch
        raise ValueError("name the weights: weights='imagenet' or 'imagenet-v2' (torchvision's), "
                         f"'timm' or 'keras' (their ImageNet weights), or a file; tags: "
                         f"{', '.join(WEIGHT_TAGS)}")
    kwargs = ours_for_timms(kwargs)
    # As timm: weights for other classes or channels than those asked for are fine-tuned.
    adapt = tuple(kind for kind, arg in (("classes", "num_classes"), ("channels", "in_channels"))
                  if weights is not None and arg in kwargs)
    if isinstance(weights, str) and weights in KERAS_TAGS:
        from .keras_weights import KERAS_CONFIG

        kwargs = KERAS_CONFIG | kwargs  # the conventions Keras' weights were trained with
    _check_kwargs(canonical, cls, fixed, kwargs)
    if features_only and canonical == "seed":
        raise ValueError("the seed variant has no multi-scale stages; use a mobilenet_v2_* model")
    if (out_indices is not None or out_rows is not None) and not features_only:
        raise ValueError("out_indices and out_rows only apply with features_only=True")
    model = cls(**fixed, **kwargs)
    model.config["name"] = canonical
    if isinstance(weights, str) and weights in WEIGHT_TAGS:
        if use_ema:
            raise ValueError(f"the {weights} weights are one set of weights, with no EMA "
                             "weights beside them: drop use_ema=True (--use-ema)")
        weights = pretrained_source(canonical, weights, model, adapt="classes" in adapt,
                                    progress=progress)
    if features_only:
        # before loading: no classifier to fit
        model = MobileNetV2Features(model, out_indices, out_rows=out_rows)
    if weights is not None:
        from .weights import load_weights

        load_weights(model, weights, adapt=adapt, use_ema=use_ema)
    elif use_ema:
        raise ValueError("use_ema picks the EMA weights of a training checkpoint: pass it "
                         "as weights=")
    return model


def ours_for_timms(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with timm's spellings (``in_chans``, ``drop_rate``) taken for ours.

    Raises:
        ValueError: when both spellings are given, with different values.
    """
    kwargs = dict(kwargs)
    for timm_name, ours in (("in_chans", "in_channels"), ("drop_rate", "dropout")):
        if timm_name in kwargs:
            value = kwargs.pop(timm_name)
            if kwargs.setdefault(ours, value) != value:
                raise ValueError(f"{timm_name}={value!r} and {ours}={kwargs[ours]!r} disagree; "
                                 "pass one of them")
    return kwargs


def name_for(config: dict[str, Any]) -> str | None:
    """The registered name of the network a configuration describes (its width and depth:
    ``mobilenet_v2_050`` for timm's ``mobilenetv2_050`` state_dict), or None."""
    arch = config.get("arch", "mobilenet_v2")
    if arch != "mobilenet_v2":
        return arch if arch in _MODELS else None
    if config.get("inverted_residual_setting") or config.get("last_channel", 1280) != 1280 or (
            config.get("round_nearest", 8) != 8):
        return None  # a network of its own, which no name builds
    from .weights import CONFIG_DEFAULTS, NAMED_BY_MODEL

    defaults = {k: CONFIG_DEFAULTS[k] for k in NAMED_BY_MODEL}  # what a name fixes
    for name, (cls, fixed) in _MODELS.items():
        wanted = defaults | fixed
        if cls is MobileNetV2 and all(config.get(k, v) == wanted[k] for k, v in defaults.items()):
            return name
    return None


def build_from_config(config: dict[str, Any]) -> nn.Module:
    """Rebuild a model from the ``config`` a weights file stores (see save_weights)."""
    config = dict(config)
    arch = config.get("arch", "mobilenet_v2")
    name = str(config.pop("name", None) or name_for(config) or arch)
    config.pop("arch", None)
    features_only = bool(config.pop("features_only", False))
    # Rows of the table; files of version 0.1.0 stored them as out_indices (which now means
    # timm's taps).
    legacy_rows = config.pop("out_indices", None)
    out_rows = config.pop("out_rows", legacy_rows)
    classes: dict[str, type[nn.Module]] = {"mobilenet_v2": MobileNetV2, "seed": SeedMobileNetV2}
    if arch not in classes:
        raise ValueError(f"unknown architecture {arch!r} in the weights' configuration")
    # The stored config has every argument, width_mult included: build the class directly.
    _check_kwargs(name, classes[arch], {}, config)
    model = classes[arch](**config)
    model.config["name"] = name
    if features_only:
        return MobileNetV2Features(model, out_rows=out_rows)
    return model


def _check_kwargs(
    name: str, cls: type[nn.Module], fixed: dict[str, Any], kwargs: dict[str, Any]
) -> None:
    if set(fixed) & set(kwargs):
        raise ValueError(
            f"{name} fixes {', '.join(sorted(set(fixed) & set(kwargs)))}; pick the model name "
            "for the width you want (see list_models())"
        )
    params = [p for p in inspect.signature(cls).parameters if p not in fixed]
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(
            f"{name} takes no argument {', '.join(unknown)}; it takes: {', '.join(params)}"
        )


def pretrained_source(name: str, tag: str, model: nn.Module,
                      adapt: bool = False, progress: bool = True) -> str | dict[str, Any]:
    """The weights a tag names for model ``name``: a downloaded file or a state_dict.

    Args:
        name: the registered model name.
        tag: one of :data:`WEIGHT_TAGS`.
        model: the model they are for; its ``meta`` gets their preprocessing.
        adapt: the model may have other classes than their 1000 (it will be fine-tuned).
        progress: show a progress bar while they download.
    """
    if getattr(model, "num_classes", None) != 1000 and not adapt:
        raise ValueError(
            f"{tag} weights have 1000 classes: build with num_classes=1000, or pass num_classes=k "
            "to start a k-class classifier afresh for fine-tuning"
        )
    if tag in KERAS_TAGS:
        return _keras_file(name, model, KERAS_TAGS[tag], progress)
    return _pretrained_state_dict(name, tag, model, progress)


def _keras_file(name: str, model: nn.Module, rows: int = 224, progress: bool = True) -> str:
    """Keras' ImageNet weights for this width, trained at ``rows`` x ``rows``, downloaded once
    into the torch hub cache (the file name carries the size, which read_weights reads)."""
    from torch.hub import download_url_to_file, get_dir

    from .keras_weights import KERAS_URL, KERAS_WIDTHS

    width = getattr(model, "config", {}).get("width_mult")
    if name == "seed" or width not in KERAS_WIDTHS or model.config.get("depth_mult"):
        raise ValueError(f"Keras has ImageNet weights for mobilenet_v2_035 ... mobilenet_v2_140, "
                         f"not for {name}")
    url = KERAS_URL.format(alpha=float(width), rows=rows)
    path = os.path.join(get_dir(), "checkpoints", url.rsplit("/", 1)[1])
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with explain_download(f"Keras' ImageNet weights for {name}", url, _INSTEAD):
            download_url_to_file(url, path, progress=progress)  # Keras publishes no hash
    return path


def _pretrained_state_dict(name: str, tag: str, model: nn.Module,
                           progress: bool = True) -> dict[str, Any]:
    from torch.hub import load_state_dict_from_url

    if tag == "timm":
        if name not in TIMM_WEIGHTS:
            raise ValueError(f"timm has ImageNet weights for {', '.join(TIMM_WEIGHTS)}, "
                             f"not for {name}")
        url = TIMM_WEIGHTS[name]
    elif name != "mobilenet_v2_100":
        raise ValueError(
            f"torchvision's {tag} weights exist for mobilenet_v2_100 only; for {name}, take "
            "timm's or Keras' where they have it (--pretrained timm / keras; weights='timm' in "
            "Python), or a file"
        )
    else:
        url = PRETRAINED[tag][0]
    source = "timm's ImageNet weights" if tag == "timm" else f"torchvision's {tag} weights"
    with explain_download(f"{source} for {name}", url, _INSTEAD):
        state = load_state_dict_from_url(url, map_location="cpu", weights_only=True,
                                         check_hash=True, progress=progress)
    model.meta.update(official_preprocessing(url) or {})
    return state
