r"""Vision Transformer (Dosovitskiy et al. 2021): ViT-S/32 of the SAF/MESA ImageNet experiments.

The architecture of big_vision's ``vit`` and timm's ``vit_small_patch32_224`` (class token,
learned position embedding, pre-LayerNorm blocks, final LayerNorm, linear head on the class
token), with ``D = width``, ``p = patch_size`` and ``n = (H / p) (W / p)`` patches::

  images [B, H, W, C]
    -> conv p x p / stride p (D), with bias            # patch embedding, [B, H/p, W/p, D]
    -> flatten, prepend class token, add position embedding   # [B, n + 1, D]
    -> depth x encoder block                           # [B, n + 1, D]
    -> LayerNorm -> class token -> Dense(num_classes)  # [B, num_classes]

  encoder block:  x = x + MultiHeadSelfAttention(num_heads)(LayerNorm(x))
                  x = x + Dense(D)(GELU(Dense(mlp_dim)(LayerNorm(x))))

ViT-S/32 (``patch_size=32``, ``width=384``, ``depth=12``, ``num_heads=6``,
``mlp_dim=1536``) at 224x224 (7x7 patches + the class token: 50 tokens) has 22,878,952
parameters for 1000 classes, timm's count for ``vit_small_patch32_224``.

The position embedding is learned for one sequence length, taken from the image size at
``init``: 224x224 gives ``[1, 50, D]``, a 64x64 test image ``[1, 5, D]``; parameters do
not depend on the image size otherwise. Applying the model to another size than the one it
was initialised with fails with Flax's parameter shape error (no interpolation). Image sides
must be multiples of ``patch_size``.

Initialisation follows timm (the paper's code base): truncated normal (std 0.02) for the
dense kernels and the position embedding, zero biases, class token ~ N(0, 1e-6), and
PyTorch's default uniform fan-in init for the patch embedding. No dropout (as in the
paper's 300-epoch AdamW runs). There is no BatchNorm: a training pass with
``mutable=['batch_stats']`` returns an empty collection. In a reduced-precision ``dtype``
LayerNorm statistics and the attention softmax are computed in float32.

References:
  Dosovitskiy et al, `An Image is Worth 16x16 Words: Transformers for Image Recognition at
  Scale <https://arxiv.org/abs/2010.11929>`_, ICLR 2021
"""

import functools
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

_DENSE_INIT = nn.initializers.truncated_normal(0.02)
# PyTorch's default Conv2d init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as timm keeps it.
_PATCH_INIT = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


class EncoderBlock(nn.Module):
  """Pre-LayerNorm transformer block: self-attention and a GELU MLP, each residual.

  Attributes:
    num_heads: attention heads (``width`` must be divisible by it).
    mlp_dim: hidden units of the MLP.
    dtype: computation dtype; parameters are float32.
  """

  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Applies the block.

    Args:
      x: [batch, tokens, width] in the computation dtype.

    Returns:
      [batch, tokens, width] in the computation dtype.
    """
    width = x.shape[-1]
    dense = functools.partial(
      nn.Dense, kernel_init=_DENSE_INIT, dtype=self.dtype, param_dtype=jnp.float32
    )
    norm = functools.partial(nn.LayerNorm, epsilon=1e-6, dtype=self.dtype, param_dtype=jnp.float32)
    y = norm(name='norm1')(x)
    y = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      kernel_init=_DENSE_INIT,
      force_fp32_for_softmax=True,
      deterministic=True,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name='attention',
    )(y)
    x = x + y
    y = norm(name='norm2')(x)
    y = dense(self.mlp_dim, name='mlp_fc1')(y)
    y = nn.gelu(y, approximate=False)  # timm's nn.GELU: the exact erf form.
    y = dense(width, name='mlp_fc2')(y)
    return x + y


class ViT(nn.Module):
  """Vision Transformer classifier on the class token.

  Attributes:
    num_classes: number of output logits.
    patch_size: side of the square patches (32).
    width: token dimension ``D`` (384).
    depth: number of encoder blocks (12).
    num_heads: attention heads per block (6).
    mlp_dim: hidden units of each block's MLP (1536).
    dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters are always float32 and
      logits are returned as float32.
  """

  num_classes: int
  patch_size: int = 32
  width: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_dim: int = 1536
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """Computes class logits.

    Args:
      images: float32 [batch, height, width, channels], normalised pixels; height and width
        multiples of ``patch_size`` and equal to those seen at ``init``.
      train: unused (no dropout, no BatchNorm); kept for the common calling convention.

    Returns:
      logits: float32 [batch, num_classes], unnormalised.

    Raises:
      ValueError: if the image sides are not positive multiples of ``patch_size``.
    """
    del train  # Same computation in training and evaluation.
    height, width = images.shape[1:3]
    p = self.patch_size
    if height < p or width < p or height % p or width % p:
      raise ValueError(
        f'ViT image sides must be multiples of patch_size={p}, got {height}x{width}.'
      )
    x = images.astype(self.dtype)
    x = nn.Conv(
      self.width,
      (p, p),
      strides=(p, p),
      padding='VALID',
      kernel_init=_PATCH_INIT,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name='embedding',
    )(x)  # [B, H/p, W/p, D]
    batch = x.shape[0]
    x = x.reshape(batch, -1, self.width)  # [B, n, D]
    cls = self.param('cls', nn.initializers.normal(1e-6), (1, 1, self.width), jnp.float32)
    x = jnp.concatenate([jnp.tile(cls.astype(self.dtype), (batch, 1, 1)), x], axis=1)
    pos_embedding = self.param(
      'pos_embedding', _DENSE_INIT, (1, x.shape[1], self.width), jnp.float32
    )  # [1, n + 1, D], learned for the init image size.
    x = x + pos_embedding.astype(self.dtype)
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, dtype=self.dtype, name=f'block{i + 1}')(x)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=jnp.float32, name='norm')(x)
    x = nn.Dense(
      self.num_classes,
      kernel_init=_DENSE_INIT,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name='head',
    )(x[:, 0])
    return x.astype(jnp.float32)


ViTS32 = functools.partial(ViT, patch_size=32, width=384, depth=12, num_heads=6, mlp_dim=1536)
