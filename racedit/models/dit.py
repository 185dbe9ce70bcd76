"""The (Race-)DiT backbone: one readable file, in the order data flows through it.

Faithful to DiT (Peebles & Xie 2023, facebookresearch/DiT ``models.py``): patch embedding, fixed
2-D sin-cos position embedding, timestep and label embedders, adaLN-Zero blocks, final adaLN layer,
unpatchify. Parameter names equal the official ones, so official checkpoints load key for key.

Two slots of every block are pluggable without touching the block code:
- the feed-forward (``racedit.models.ffn.Mlp`` or ``racedit.moe.MoEFeedForward``), chosen per block;
- the connection of each sublayer to the residual stream (``racedit.connections``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from racedit.config.core import from_dict
from racedit.connections import build_connection, build_stream
from racedit.interfaces import FeedForward, ForwardAux
from racedit.models.config import ModelConfig
from racedit.models.ffn import Mlp


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x (B, L, D), shift/scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#               Embedding layers for patches, timesteps and class labels       #
#################################################################################


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, L, D) with L = (H/p)(W/p), row-major patches; a strided conv as in ViT."""

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] % self.patch_size or x.shape[-2] % self.patch_size:
            raise ValueError(
                f"input {tuple(x.shape)} is not divisible into {self.patch_size}x{self.patch_size} patches"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


# Divisor shift of the frequency exponent: DiT divides by half, diffusers' Timesteps(downscale_freq_shift=1)
# (used by its DiTTransformer2DModel) by half - 1.
FREQ_SHIFT = {"official": 0, "diffusers": 1}


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: sinusoidal features (cos, sin) then a 2-layer SiLU MLP."""

    def __init__(self, dim: int, frequency_embedding_size: int = 256, convention: str = "official"):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = FREQ_SHIFT[convention]
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, dim), nn.SiLU(), nn.Linear(dim, dim))

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, freq_shift: int = 0) -> Tensor:
        """t (B,) possibly fractional -> (B, dim); the first half cos, the second half sin.

        Frequencies ``exp(-ln(max_period) i / (half - freq_shift))``, i < half: 0 is DiT's, 1 diffusers'
        (same operation order as diffusers' ``get_timestep_embedding``, so its features match bitwise).
        """
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period)
            * torch.arange(half, dtype=torch.float32, device=t.device)
            / (half - freq_shift)
        )
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: Tensor) -> Tensor:
        freq = self.timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors. With dropout > 0 a 'null' class (id = num_classes) exists for CFG."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    def forward(self, labels: Tensor, train: bool, force_drop_ids: Tensor | None = None) -> Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            if force_drop_ids is None:
                drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            else:
                drop = force_drop_ids == 1
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


#################################################################################
#                                 Core DiT model                                #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` (timm key names)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, L, D/heads)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))

    def flops(self, num_tokens: int) -> int:
        D = self.proj.in_features
        return 4 * num_tokens * D * D + 2 * num_tokens * num_tokens * D


class DiTBlock(nn.Module):
    """adaLN-Zero block. Each sublayer is ``T(h) = gate * F(modulate(LN(h), shift, scale))`` and its
    connection decides how T reads from and writes to the stream (plain residual: ``h + T(h)``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn: FeedForward,
        connections: tuple[nn.Module, nn.Module],
        mlp_norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = ffn
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))
        self.conn_attn, self.conn_mlp = connections

    def forward(self, state: Tensor, c: Tensor, aux: ForwardAux | None = None) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=1
        )

        def attn_branch(h: Tensor) -> Tensor:
            return gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(h), shift_msa, scale_msa))

        def mlp_branch(h: Tensor) -> Tensor:
            return gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(h), shift_mlp, scale_mlp), aux)

        state = self.conn_attn(state, attn_branch)
        return self.conn_mlp(state, mlp_branch)

    def flops(self, num_tokens: int) -> int:
        D = self.norm1.normalized_shape[0]
        return (
            self.attn.flops(num_tokens)
            + self.mlp.flops(num_tokens)
            + 6 * D * D  # adaLN, once per sample
            + self.conn_attn.flops(num_tokens)
            + self.conn_mlp.flops(num_tokens)
        )


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=True))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(ModelMixin, ConfigMixin):
    """Class-conditional diffusion transformer; ``model(x, t, y) -> (B, out_channels, H, W)``.

    Saved as ``config.json`` + ``model.safetensors`` by ``save_pretrained``; ``from_pretrained``
    rebuilds it. ``self.arch`` is the typed ``ModelConfig`` every caller reads; ``self.config`` is
    diffusers' plain copy of the same arguments, kept only for ``save_pretrained``/``from_pretrained``.
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = True,
        timestep_convention: str = "official",
        mlp_norm_eps: float = 1e-6,
        moe: dict[str, Any] | None = None,
        connection: dict[str, Any] | None = None,
    ):
        super().__init__()
        # The signature above is what diffusers' ConfigMixin serialises (config.json); ``register_to_config``
        # has already stored the arguments in ``self.config``. The one typed view of them is ``self.arch``,
        # validated by the config core (a test keeps the signature and ModelConfig's fields equal).
        given = {k: v for k, v in self.config.items() if not k.startswith("_")}
        if given.get("connection") is None:  # None = the plain residual connection
            given.pop("connection", None)
        arch = from_dict(ModelConfig, given)
        self.arch = arch
        D = arch.hidden_size
        self.gradient_checkpointing = False

        self.x_embedder = PatchEmbed(arch.patch_size, arch.in_channels, D)
        self.t_embedder = TimestepEmbedder(D, convention=arch.timestep_convention)
        self.y_embedder = LabelEmbedder(arch.num_classes, D, arch.class_dropout_prob)
        # Fixed sin-cos embedding; a frozen parameter (not a buffer) so official checkpoints map 1:1.
        self.pos_embed = nn.Parameter(torch.zeros(1, arch.num_tokens, D), requires_grad=False)
        self.stream = build_stream(arch.connection, D)
        self.blocks = nn.ModuleList(
            DiTBlock(
                D,
                arch.num_heads,
                self._build_ffn(arch, i),
                (build_connection(arch.connection, D, i, 0), build_connection(arch.connection, D, i, 1)),
                arch.mlp_norm_eps,
            )
            for i in range(arch.depth)
        )
        self.final_layer = FinalLayer(D, arch.patch_size, arch.out_channels)
        self.initialize_weights()

    @staticmethod
    def _build_ffn(arch: ModelConfig, layer_index: int) -> FeedForward:
        if arch.moe is not None and arch.moe.is_moe_block(layer_index):
            from racedit.moe import MoEFeedForward

            target_dim = (
                arch.patch_size * arch.patch_size * arch.in_channels
            )  # PLR predicts the target per token
            return MoEFeedForward(arch.hidden_size, arch.mlp_hidden, arch.moe, layer_index, target_dim)
        return Mlp(arch.hidden_size, arch.mlp_hidden)

    # ------------------------------------------------------------------------ save / load

    WEIGHTS_NAME = "model.safetensors"

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """diffusers' ``save_pretrained`` (config.json + safetensors), weights named ``model.safetensors``."""
        kwargs.setdefault("safe_serialization", True)
        if not kwargs["safe_serialization"]:
            raise ValueError("racedit models are saved as safetensors only (no pickles)")
        super().save_pretrained(save_directory, **kwargs)
        directory = Path(save_directory)
        diffusers_name = directory / "diffusion_pytorch_model.safetensors"
        if diffusers_name.exists():
            diffusers_name.replace(directory / self.WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> DiT:
        """Load a directory written by ``save_pretrained`` (racedit's or diffusers' weight file name)."""
        directory = Path(pretrained_model_name_or_path)
        if not (directory / cls.WEIGHTS_NAME).is_file():
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        from safetensors.torch import load_file

        config = cls.load_config(directory)
        model = cls.from_config(config)
        state = load_file(directory / cls.WEIGHTS_NAME)
        result = model.load_state_dict(state, strict=True)
        del result
        if kwargs.get("torch_dtype") is not None:
            model = model.to(kwargs["torch_dtype"])
        return model.eval()

    # ----------------------------------------------------------------------------- init

    def initialize_weights(self) -> None:
        """DiT's init; then every submodule with its own ``init_weights()`` (MoE, connections) runs it."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        grid = int(self.arch.num_tokens**0.5)
        self.pos_embed.data.copy_(
            torch.from_numpy(get_2d_sincos_pos_embed(self.arch.hidden_size, grid)).float()[None]
        )
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        for module in self.modules():
            if module is not self and hasattr(module, "init_weights"):
                module.init_weights()
        with torch.no_grad():  # hyper-connections: output projections' std x sqrt(n) (docs/design.md)
            for block in self.blocks:
                for conn, weights in (
                    (block.conn_attn, [block.attn.proj.weight]),
                    (block.conn_mlp, block.mlp.output_weights()),
                ):
                    if conn.output_init_gain != 1.0:
                        for w in weights:
                            w.mul_(conn.output_init_gain)

    # ---------------------------------------------------------------------------- forward

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, L, p*p*C) -> (B, C, H, W)."""
        c, p = self.arch.out_channels, self.arch.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def patchify(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, L, p*p*C), the token layout of the final layer (inverse of unpatchify)."""
        B, C, H, W = x.shape
        p = self.arch.patch_size
        x = x.reshape(B, C, H // p, p, W // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, aux: ForwardAux | None = None) -> Tensor:
        """x (B, C, H, W) latents, t (B,) timesteps, y (B,) labels (num_classes = null) -> (B, out, H, W)."""
        if x.shape[-1] != self.arch.input_size or x.shape[-2] != self.arch.input_size:
            raise ValueError(
                f"model expects {self.arch.input_size}x{self.arch.input_size} inputs, got {tuple(x.shape)}"
            )
        if aux is not None:
            aux.t = t
        h = self.x_embedder(x) + self.pos_embed  # (B, L, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (B, D)
        state = self.stream.expand(h)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                state = self._gradient_checkpointing_func(block, state, c, aux)
            else:
                state = block(state, c, aux)
        h = self.final_layer(self.stream.collapse(state), c)  # (B, L, p*p*out)
        return self.unpatchify(h)

    # ------------------------------------------------------------------------- accounting

    def flops(self, batch_size: int = 1) -> int:
        """Multiply-adds of one forward (one MAC = one FLOP, the DiT paper's convention)."""
        L, D, p = self.arch.num_tokens, self.arch.hidden_size, self.arch.patch_size
        per_sample = (
            L * self.arch.in_channels * p * p * D  # patch embedding
            + 256 * D
            + D * D  # timestep MLP
            + sum(block.flops(L) for block in self.blocks)
            + 2 * D * D
            + L * D * p * p * self.arch.out_channels  # final layer
        )
        return batch_size * per_sample

    def param_counts(self) -> dict[str, int]:
        """Parameter counts: full model, transformer blocks (total and activated per token)."""
        total = sum(p.numel() for p in self.parameters())
        block_total = sum(p.numel() for p in self.blocks.parameters())
        inactive = sum(m.inactive_params() for m in self.modules() if isinstance(m, FeedForward))
        training_only = sum(
            m.training_only_params() for m in self.modules() if hasattr(m, "training_only_params")
        )
        return {
            "params_total": total,
            "block_params_total": block_total - training_only,
            "block_params_activated": block_total - training_only - inactive,
            "training_only_params": training_only,
        }

    def optimizer_param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: weight decay on matrices only; never on biases, norms, embeddings tables' bias,
        the frozen position embedding, or what a module lists in its ``no_weight_decay()``."""
        no_decay: set[str] = set()
        for mod_name, module in self.named_modules():
            if hasattr(module, "no_weight_decay") and callable(module.no_weight_decay):
                no_decay |= {f"{mod_name}.{n}" if mod_name else n for n in module.no_weight_decay()}
        decay, other = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (other if param.ndim < 2 or name in no_decay else decay).append(param)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################
# Same math as MAE's / DiT's: half the channels encode the row, half the column.


def get_2d_sincos_pos_embed(dim: int, grid_size: int) -> np.ndarray:
    """(grid_size**2, dim) float64; rows are patches in row-major order."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb_h = _1d_sincos(dim // 2, grid[0])
    emb_w = _1d_sincos(dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _1d_sincos(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
