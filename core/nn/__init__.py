"""Shared building blocks every family composes (timm's ``layers/``)."""

from polymodal.nn.block import Attention, Block, BlockConfig, DropPath
from polymodal.nn.cache import KVCache
from polymodal.nn.embed import PatchEmbed, PositionEmbedding, init_weights, interpolate_grid, sincos_1d, sincos_2d
from polymodal.nn.mlp import ACTIVATIONS, Mlp, QuickGELU, make_activation
from polymodal.nn.modes import eval_mode
from polymodal.nn.norm import RMSNorm, make_norm
from polymodal.nn.stack import StackConfig, TransformerStack
from polymodal.nn.unet import UNet, UNetConfig  # after Attention: unet uses the fusions

__all__ = [
    "ACTIVATIONS",
    "Attention",
    "Block",
    "BlockConfig",
    "DropPath",
    "KVCache",
    "Mlp",
    "PatchEmbed",
    "PositionEmbedding",
    "QuickGELU",
    "RMSNorm",
    "StackConfig",
    "TransformerStack",
    "UNet",
    "UNetConfig",
    "eval_mode",
    "init_weights",
    "interpolate_grid",
    "make_activation",
    "make_norm",
    "sincos_1d",
    "sincos_2d",
]
