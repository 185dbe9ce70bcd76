"""CLIP for CMMD and CLIP score: the model, its weights (never downloaded), preprocessing, embeddings.

The network is OpenAI's CLIP ViT-L/14 at 336 px (``openai/clip-vit-large-patch14-336``), the model of
the CMMD paper, run through transformers' ``CLIPModel`` (``pip install racedit[clip]``). Weights come
from ``--clip-weights DIR``, then ``$RACEDIT_CLIP_WEIGHTS``, then the Hugging Face cache (looked up with
``local_files_only``); nothing here downloads. Records carry the model's name and the SHA-256 of its
weights file(s), and say whether it is the reference network (another CLIP gives other numbers).

Preprocessing, as the CMMD reference implementation does it: crop the centre square (side = the short
side), resize it to 336 x 336 with PIL's bicubic filter (antialiased), scale to [0, 1], normalise with
CLIP's mean and std. Embeddings: the projected image (or text) features, L2-normalised, in float64.

CLIP score of class-conditional samples: the text of class c is ``PROMPT_TEMPLATE.format(name of c)``
("a photo of a {name}.", CLIP's ImageNet template); per sample 100 * max(cos(image, text of its label), 0);
the score is the mean over samples.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from racedit.errors import UserError
from racedit.io import atomic_write, sha256_file

CLIP_MODEL_ID = "openai/clip-vit-large-patch14-336"
CLIP_NAME = "CLIP ViT-L/14@336px"
ENV_VAR = "RACEDIT_CLIP_WEIGHTS"
PROMPT_TEMPLATE = "a photo of a {}."
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation (RGB, [0, 1] inputs)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EMBEDDING_VERSION = 1  # bump when the way embeddings are computed changes (invalidates the cache)
# (image size, patch, width, layers, projection) of ViT-L/14@336px: the network the literature's CMMD uses
REFERENCE_ARCH = (336, 14, 1024, 24, 768)
WEIGHT_PATTERNS = ("model*.safetensors", "pytorch_model*.bin")


class ClipWeightsError(UserError, RuntimeError):
    """The CLIP weights are missing, or transformers is not installed."""


def how_to_fetch() -> str:
    return (
        f"CMMD and CLIP score need {CLIP_NAME} ({CLIP_MODEL_ID}, about 1.7 GB). Fetch it once with "
        f"`huggingface-cli download {CLIP_MODEL_ID}` (into the Hugging Face cache), or save it to a folder "
        f"and pass --clip-weights DIR or set {ENV_VAR}=DIR; nothing is downloaded during evaluation"
    )


def _check_dir(path: Path, origin: str) -> Path:
    if not (path / "config.json").is_file() or not any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
        raise ClipWeightsError(
            f"{origin} {path} is not a CLIPModel folder (config.json and model.safetensors expected). "
            + how_to_fetch()
        )
    return path


def resolve_clip_weights(path: str | os.PathLike | None = None) -> Path:
    """The local folder of the CLIP weights: ``path``, then ``$RACEDIT_CLIP_WEIGHTS``, then the HF cache."""
    if path is not None:
        return _check_dir(Path(path), "--clip-weights")
    if os.environ.get(ENV_VAR):
        return _check_dir(Path(os.environ[ENV_VAR]), f"${ENV_VAR} =")
    try:
        from huggingface_hub import snapshot_download

        return _check_dir(Path(snapshot_download(CLIP_MODEL_ID, local_files_only=True)), "the HF cache entry")
    except ClipWeightsError:
        raise
    except Exception:  # not in the cache (LocalEntryNotFoundError and friends), or no huggingface_hub
        raise ClipWeightsError(
            f"{CLIP_MODEL_ID} is not in the Hugging Face cache. " + how_to_fetch()
        ) from None


def weights_sha256(directory: str | os.PathLike) -> str:
    """SHA-256 of the weights file, or of the sorted "name sha256" lines of a sharded checkpoint."""
    files = sorted({f for p in WEIGHT_PATTERNS for f in Path(directory).glob(p)})
    if len(files) == 1:
        return sha256_file(files[0])
    lines = "".join(f"{f.name} {sha256_file(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def preprocess(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, size, size): centre square, PIL bicubic resize, CLIP normalise."""
    out = np.empty((len(images), size, size, 3), dtype=np.float32)
    for i, arr in enumerate(images):
        im = Image.fromarray(np.asarray(arr, dtype=np.uint8))
        w, h = im.size
        side = min(w, h)
        top, left = (h - side) // 2, (w - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((size, size), resample=Image.BICUBIC)
        out[i] = np.asarray(im, dtype=np.float32) / 255.0
    out = (out - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _normalised(x: torch.Tensor) -> np.ndarray:
    x = x.detach().double().cpu().numpy()
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _features(out: Any) -> torch.Tensor:
    """transformers 4 returns the projected features; 5 returns an output whose pooler_output they are."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipEmbedder:
    """A transformers ``CLIPModel`` (eval, fp32) and its tokenizer, with the identity records need."""

    def __init__(self, model: Any, tokenizer: Any, source: str, weights_id: str):
        self.model = model.eval().float().requires_grad_(False)
        self.tokenizer = tokenizer
        self.source = source
        self.weights_id = weights_id
        v = model.config.vision_config
        self.image_size = int(v.image_size)
        self.arch = (self.image_size, int(v.patch_size), int(v.hidden_size), int(v.num_hidden_layers),
                     int(model.config.projection_dim))  # fmt: skip

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None) -> ClipEmbedder:
        directory = resolve_clip_weights(path)
        try:
            from transformers import AutoTokenizer, CLIPModel
        except ImportError:
            raise ClipWeightsError(
                "CMMD and CLIP score need transformers: pip install 'racedit[clip]'"
            ) from None
        model = CLIPModel.from_pretrained(directory, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        return cls(model, tokenizer, str(directory), weights_sha256(directory))

    @property
    def is_reference_network(self) -> bool:
        return self.arch == REFERENCE_ARCH

    @property
    def identity(self) -> dict[str, Any]:
        image, patch, width, layers, proj = self.arch
        return {
            "model": CLIP_NAME
            if self.is_reference_network
            else f"CLIP ViT (image {image}, patch {patch}, "
            f"width {width}, {layers} layers, projection {proj}): not the reference network",
            "hub_id": CLIP_MODEL_ID if self.is_reference_network else None,
            "weights": self.source,
            "weights_sha256": self.weights_id,
            "preprocessing": f"centre square crop, PIL bicubic resize to {image}, CLIP mean/std",
            "comparable_with_literature": self.is_reference_network,
        }

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) -> (B, D) float64, L2-normalised."""
        from fid.inception import strict_fp32

        x = preprocess(images, self.image_size).to(self._device())
        with strict_fp32():
            return _normalised(_features(self.model.get_image_features(pixel_values=x)))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Strings -> (N, D) float64, L2-normalised."""
        from fid.inception import strict_fp32

        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        tokens = {k: v.to(self._device()) for k, v in tokens.items()}
        with strict_fp32():
            return _normalised(_features(self.model.get_text_features(**tokens)))

    def to(self, device: torch.device | str) -> ClipEmbedder:
        self.model.to(device)
        return self


def embed_source(
    source: Any,
    embedder: ClipEmbedder,
    *,
    content_hash: str,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = True,
    desc: str = "CLIP",
) -> tuple[np.ndarray, bool]:
    """(N, D) float64 embeddings of every image of a ``fid.data`` source, in order; and whether cached.

    Cached as ``clip-<key>.npy`` next to the Inception features, keyed by the images' content hash, the
    CLIP identity and ``EMBEDDING_VERSION``."""
    from fid.features import default_cache_dir
    from racedit.progress import progress as progress_bar

    blob = json.dumps({"content": content_hash, "net": embedder.identity, "version": EMBEDDING_VERSION})
    path = Path(cache_dir or default_cache_dir()) / f"clip-{hashlib.sha256(blob.encode()).hexdigest()}.npy"
    if use_cache and path.is_file():
        cached = np.load(path, allow_pickle=False)
        if cached.shape[0] == source.num_images:
            return cached, True
    n = source.num_images
    chunks = [
        embedder.embed_images(batch)
        for batch in progress_bar(
            source.batches(0, n, batch_size),
            total=-(-n // batch_size),
            desc=f"{desc} [{source.describe()}]",
            disable=not progress,
            unit="batch",
        )
    ]
    emb = np.concatenate(chunks) if chunks else np.empty((0, embedder.arch[-1]))
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with tmp.open("wb") as fh:
                np.save(fh, emb)

        atomic_write(path, write)
    return emb, False


def class_prompts(class_names: Sequence[str]) -> list[str]:
    return [PROMPT_TEMPLATE.format(name) for name in class_names]


def clip_score(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> float:
    """Mean over samples of 100 * max(cos(image_i, text_i), 0); rows are paired (text of sample i's label)."""
    a = np.asarray(image_embeddings, dtype=np.float64)
    b = np.asarray(text_embeddings, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"clip_score expects paired (N, D) embeddings, got {a.shape} and {b.shape}")
    cos = np.einsum("nd,nd->n", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(np.mean(100.0 * np.maximum(cos, 0.0)))


def sample_labels(source: Any) -> np.ndarray:
    """The class labels of an ADM-format sample file (``arr_1``), in image order."""
    from fid.data import NpzImages

    if not isinstance(source, NpzImages):
        raise UserError(
            f"CLIP score needs the class of every sample: {source.describe()} is not an .npz with labels "
            "(arr_1, as sample.py writes)"
        )
    with np.load(source.path, allow_pickle=False) as z:
        if "arr_1" not in z.files:
            raise UserError(
                f"CLIP score needs the class labels: {source.path} has no arr_1 (sample.py writes it)"
            )
        labels = np.asarray(z["arr_1"]).astype(np.int64).reshape(-1)
    if labels.shape[0] != source.num_images:
        raise UserError(f"{source.path}: arr_1 has {labels.shape[0]} labels for {source.num_images} images")
    return labels


def clip_score_of_samples(
    embedder: ClipEmbedder, image_embeddings: np.ndarray, labels: np.ndarray, class_names: Sequence[str]
) -> float:
    """CLIP score of class-conditional samples: each image against the prompt of its own class."""
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise UserError(
            f"sample labels span {labels.min()}..{labels.max()} but there are {len(class_names)} class names "
            "(pass --clip-class-names FILE, one name per line)"
        )
    used = np.unique(labels)
    text = embedder.embed_texts(class_prompts([class_names[c] for c in used]))  # (C_used, D)
    row = np.searchsorted(used, labels)
    return clip_score(image_embeddings, text[row])
