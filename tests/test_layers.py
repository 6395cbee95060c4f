"""The hand-written gradients of GroupNorm, attention and conv2d, the phase-split upsampling conv,
and mixed-precision training."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from jaxdiff import sharding, train, xla_flags
from jaxdiff.models import layers

# Tests of XLA:CPU's fusion decisions on the rewritten layers: those are the jaxlib's to make,
# and the rewrites were measured on these versions (older ones give the same numbers).
_TUNED_XLA = pytest.mark.skipif(not xla_flags.tuned_jaxlib(),
                                reason="XLA:CPU fusion choices of a jaxlib the layers were not tuned on")


def reference_group_norm(x, scale, bias, g, eps, act):
  b, c = x.shape[0], x.shape[-1]
  xg = x.reshape(b, -1, g, c // g)
  mean, var = xg.mean((1, 3), keepdims=True), xg.var((1, 3), keepdims=True)
  y = ((xg - mean) / jnp.sqrt(var + eps)).reshape(x.shape) * scale + bias
  return jax.nn.silu(y) if act else y


@pytest.mark.parametrize("shape, groups", [((3, 8, 8, 16), 4), ((2, 4, 4, 32), 32), ((5, 6, 12), 3), ((3, 16), 4)])
@pytest.mark.parametrize("act", [False, True])
def test_group_norm_values_and_gradients(shape, groups, act):
  x = 2.0 * jax.random.normal(jax.random.key(0), shape) + 1.0
  scale = jax.random.normal(jax.random.key(1), shape[-1:])
  bias = jax.random.normal(jax.random.key(2), shape[-1:])
  ours = functools.partial(layers.group_norm, num_groups=groups, eps=1e-6, act=act)
  ref = functools.partial(reference_group_norm, g=groups, eps=1e-6, act=act)
  np.testing.assert_allclose(ours(x, scale, bias), ref(x, scale, bias), atol=2e-6)
  loss = lambda f: (lambda *a: jnp.sum(jnp.sin(3.0 * f(*a))))  # noqa: E731
  for a, b in zip(jax.grad(loss(ours), (0, 1, 2))(x, scale, bias), jax.grad(loss(ref), (0, 1, 2))(x, scale, bias)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_group_norm_full_size_passes_read_per_channel_coefficients():
  # Each [B, H, W, C] pass of GroupNorm (forward and backward) must read [B, C] coefficients
  # computed once, not recompute group means per element: XLA fused the reshape-mean-broadcast
  # form into those passes, with a per-element group index that kept XLA:CPU from vectorising
  # them (the forward of [64, 32, 32, 64] twice as slow).
  b, h, c, g = 2, 5, 48, 16  # group shapes [2, 16] and [2, 16, 3] appear in no other array
  x = jax.random.normal(jax.random.key(0), (b, h, h, c))
  scale, bias = jnp.full((c,), 1.5), jnp.full((c,), 0.1)
  fwd = lambda x, s, t: layers.group_norm(x, s, t, g, 1e-6, True)  # noqa: E731
  grad = jax.grad(lambda x, s, t: jnp.sum(jnp.sin(fwd(x, s, t))), (0, 1, 2))
  for fn in (fwd, grad):
    hlo = jax.jit(fn).lower(x, scale, bias).compile().as_text()
    full = [comp for comp in re.split(r"\n(?=\S)", hlo)
            if re.match(rf"%\S+ \(.*\) -> f32\[({b},{h},{h}|{b},{h * h}),{c}\]", comp)]
    assert full, hlo
    for comp in full:
      assert not re.search(rf"f32\[{b},{g}[,\]]", comp), comp


def test_group_norm_input_is_not_copied_into_another_shape():
  # GroupNorm reduces and scales x in its own [B, H, W, C] shape. Over a [B, H*W, C] view,
  # XLA:CPU fused a cheap producer (here the skip concatenation of a U-Net's up block) into
  # that reshape and materialised it twice, [B, H, W, C] and [B, H*W, C], forward and backward
  # (small U-Net train step: 904 -> 834 MB of temporaries, 5% faster).
  b, h, c1, c2 = 4, 8, 16, 8
  x1, x2 = (jax.random.normal(jax.random.key(i), (b, h, h, c)) for i, c in enumerate((c1, c2)))
  k = 0.1 * jax.random.normal(jax.random.key(2), (3, 3, c1 + c2, 8))

  def loss(x1, x2, k):
    cat = jnp.concatenate([jnp.tanh(x1), 2.0 * x2], axis=-1)
    g = layers.group_norm(cat, jnp.full((c1 + c2,), 1.5), jnp.zeros(c1 + c2), 8, 1e-6, True)
    return jnp.sum(jnp.sin(layers.conv2d(g, k, (1, 1), ((1, 1), (1, 1))) + cat[..., :8]))

  hlo = jax.jit(jax.grad(loss, (0, 1, 2))).lower(x1, x2, k).compile().as_text()
  assert re.search(rf"f32\[{b},{h},{h},{c1 + c2}\]", hlo)
  assert not re.search(rf"f32\[{b},{h * h},{c1 + c2}\]", hlo), hlo


def test_sampling_attention_fuses_apart_from_its_neighbours():
  # Sampling's attention (`_attention_primal`) is fused by XLA:CPU into a kernel of its own;
  # without the reduce_precision boundaries that fusion took in the q/k/v projections (and,
  # in the U-Net, the previous block's convolutions, which then ran slower in YNNPACK).
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = layers.Conv(64, (3, 3), padding=((1, 1), (1, 1)))(x)
      return layers.AttentionBlock()(h + x)

  x = jax.random.normal(jax.random.key(0), (8, 16, 16, 64))  # at smaller sizes XLA fuses less
  net = Net()
  params = net.init(jax.random.key(1), x)
  hlo = jax.jit(net.apply).lower(params, x).compile().as_text()
  softmax = [c for c in re.split(r"\n(?=\S)", hlo) if "exponential(" in c]
  assert softmax, hlo
  for comp in softmax:
    assert "convolution(" not in comp and "rsqrt(" not in comp, comp
    for dot in re.findall(r"= \S+ dot\(.*", comp):
      assert "lhs_batch_dims" in dot, comp  # only the batched score and value products


def test_attention_block_weight_gradients_need_no_transposed_copy():
  # The q/k/v and output projections run on [B*H*W, C]: over a [B, H*W, C] input, XLA:CPU fed
  # each weight gradient's dot a transposed copy of the output gradient, [C, B*H*W].
  b, h, c = 2, 4, 8
  block = layers.AttentionBlock(num_groups=4)
  x = jax.random.normal(jax.random.key(0), (b, h, h, c))
  params = jax.tree.map(lambda a: a + 0.1, block.init(jax.random.key(1), x))
  loss = lambda p, x: jnp.sum(jnp.sin(block.apply(p, x)))  # noqa: E731
  hlo = jax.jit(jax.grad(loss, (0, 1))).lower(params, x).compile().as_text()
  entry = hlo[hlo.index("ENTRY"):]
  assert re.search(rf"= f32\[{c},{c}\]\S* dot\(", entry), entry  # the weight gradients are dots
  assert not re.findall(rf"%\S+ = f32\[{c},{b * h * h}\]", entry), entry


@pytest.mark.parametrize("heads", [1, 2])
def test_attention_matches_dot_product_attention(heads):
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 10, heads, 4)) for i in range(3))
  ref_out = jax.nn.dot_product_attention(q, k, v)
  np.testing.assert_allclose(layers.attention(q, k, v), ref_out, atol=1e-6)
  loss = lambda f: (lambda *a: jnp.sum(jnp.sin(f(*a))))  # noqa: E731
  ours = jax.grad(loss(layers.attention), (0, 1, 2))(q, k, v)
  ref = jax.grad(loss(jax.nn.dot_product_attention), (0, 1, 2))(q, k, v)
  # under differentiation the forward is the heads-folded form: its output too
  np.testing.assert_allclose(jax.vjp(layers.attention, q, k, v)[0], ref_out, atol=1e-6)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # attention_plain: the same numbers, and forward mode
  np.testing.assert_allclose(layers.attention_plain(q, k, v), ref_out, atol=1e-6)
  tangents = (q, k, v)
  ours_t = jax.jvp(layers.attention_plain, (q, k, v), tangents)[1]
  ref_t = jax.jvp(jax.nn.dot_product_attention, (q, k, v), tangents)[1]
  np.testing.assert_allclose(ours_t, ref_t, atol=1e-5)


@pytest.mark.parametrize("x_shape, k_shape, strides, padding, gemm", [
    ((2, 16, 16, 16), (3, 3, 16, 24), (1, 1), ((1, 1), (1, 1)), True),  # GEMM weight gradient
    ((2, 16, 20, 24), (1, 1, 24, 16), (1, 1), ((0, 0), (0, 0)), True),  # 1x1: one GEMM
    ((2, 16, 16, 16), (3, 3, 16, 8), (1, 1), ((0, 2), (2, 0)), False),  # 8 out channels: XLA's
    ((2, 16, 16, 16), (3, 3, 16, 16), (2, 2), ((0, 1), (0, 1)), False),  # strided: XLA's
    ((2, 8, 8, 32), (3, 3, 32, 32), (1, 1), ((1, 1), (1, 1)), False),  # small map: XLA's
    ((2, 15, 9, 8), (3, 3, 8, 8), (2, 2), ((1, 0), (0, 1)), False),  # strided, odd sizes
    ((2, 6, 6, 4), (3, 3, 4, 8), (1, 1), ((3, 2), (0, 0)), False),  # padding > k - 1: JAX's dx
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_conv2d_gradients_match_xla(x_shape, k_shape, strides, padding, gemm, dtype, monkeypatch):
  # The 3x3 GEMM path is taken when XLA runs convolutions through YNNPACK (jaxlib's default,
  # which jaxdiff's XLA flag turns off); force that case so both paths are checked.
  monkeypatch.setattr(layers.xla_flags, "ynn_convolutions_enabled", lambda environ=None: True)
  assert layers._use_matmul_weight_grad(x_shape, k_shape, strides) == gemm
  x = jax.random.normal(jax.random.key(0), x_shape).astype(dtype)
  k = (0.2 * jax.random.normal(jax.random.key(1), k_shape)).astype(dtype)
  ours = functools.partial(layers.conv2d, strides=strides, padding=padding)
  ref = functools.partial(layers.conv2d_plain, strides=strides, padding=padding)
  y = ours(x, k)
  assert y.dtype == dtype
  np.testing.assert_array_equal(y, ref(x, k))
  u = jax.random.normal(jax.random.key(2), y.shape).astype(dtype)
  loss = lambda f: (lambda a, b: jnp.sum(f(a, b).astype(jnp.float32) * u))  # noqa: E731
  tol = dict(rtol=1e-5, atol=1e-4) if dtype == jnp.float32 else dict(rtol=2e-2, atol=0.25)
  for a, b in zip(jax.grad(loss(ours), (0, 1))(x, k), jax.grad(loss(ref), (0, 1))(x, k)):
    assert a.dtype == b.dtype == dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)


def test_conv2d_gradients_inside_a_loop_are_canonical_convolutions():
  # Inside a while loop (a sampler's scan with classifier guidance or reverse-mode likelihood)
  # XLA:CPU does not bring JAX's own conv gradients into the NHWC/HWIO form its fast kernels
  # take (13-20x slower per iteration); conv2d's backward is written in that form directly.
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  ks = [0.1 * jax.random.normal(jax.random.key(i), (3, 3, 16, 16)) for i in range(2)]

  def grads(fn):
    def loss(ks, x):
      x = jnp.tanh(fn(x, ks[0], (1, 1), ((1, 1), (1, 1))))
      x = jnp.tanh(fn(x, ks[1], (2, 2), ((0, 1), (0, 1))))  # a Downsample
      return jnp.sum(x**2)
    body = lambda i, c: jax.tree.map(lambda a, b: a - 1e-3 * b, c, jax.grad(loss, (0, 1))(*c))  # noqa: E731
    return jax.jit(lambda ks, x: jax.lax.fori_loop(0, 3, body, (ks, x)))

  hlo = grads(layers.conv2d).lower(ks, x).compile().as_text()
  labels = re.findall(r"convolution\(.*?dim_labels=([^,\s]+)", hlo)
  assert len(labels) == 6 and set(labels) == {"b01f_01io->b01f"}, labels  # 2 forward, 2 dx, 2 dW
  hlo = grads(layers.conv2d_plain).lower(ks, x).compile().as_text()
  plain = re.findall(r"convolution\(.*?dim_labels=([^,\s]+)", hlo)
  for a, b in zip(jax.tree.leaves(grads(layers.conv2d)(ks, x)), jax.tree.leaves(grads(layers.conv2d_plain)(ks, x))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # (what the check guards against; if XLA canonicalizes inside loops one day, this fails
  # and the workaround in conv2d's backward can go)
  assert set(plain) != {"b01f_01io->b01f"}, plain


@_TUNED_XLA
def test_silu_output_is_materialised_for_the_weight_gradient_transpose():
  # The weight gradient of a conv after GroupNorm + SiLU transposes the conv's input to
  # [C, H, W, B]. Written as y * sigmoid(y), XLA:CPU recomputed the cheap product inside that
  # transpose, in transposed order (5x slower); group_norm's y / (1 + e^-y) is materialised once.
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 32))
  k = 0.1 * jax.random.normal(jax.random.key(1), (3, 3, 32, 32))

  def loss(x, k):
    h = layers.group_norm(x, jnp.ones(32), jnp.zeros(32), 8, 1e-6, True)
    return jnp.sum(jnp.tanh(layers.conv2d(h, k, (1, 1), ((1, 1), (1, 1)))))

  hlo = jax.jit(jax.grad(loss, (0, 1))).lower(x, k).compile().as_text()
  transposes = [c for c in re.split(r"\n(?=\S)", hlo) if re.search(r"ROOT \S+ = \S+ copy\(%transpose", c)]
  to_cfhw = [c for c in transposes if re.search(r"-> f32\[32,16,16,4\]", c)]
  assert to_cfhw, transposes
  for c in to_cfhw:
    ops = set(re.findall(r"= \S+ ([a-z-]+)\(", c))
    assert ops <= {"parameter", "bitcast", "transpose", "copy"}, (ops, c)


@_TUNED_XLA
def test_silu_keeps_no_extra_buffer_for_the_backward():
  # The backward's sigmoid must not share e^-y with the forward's SiLU: XLA would CSE the two,
  # compute e^-y in a pass of its own and keep it from the forward to the backward, one more
  # feature map per GroupNorm (the small U-Net's train step: 1083 -> 905 MB of temporaries).
  x = jax.random.normal(jax.random.key(0), (8, 16, 16, 64))
  k = 0.05 * jax.random.normal(jax.random.key(1), (3, 3, 64, 64))

  def temp_bytes(act):
    def loss(x, k):
      h = layers.group_norm(x, jnp.ones(64), jnp.zeros(64), 32, 1e-6, act)
      return jnp.sum(layers.conv2d(h, k, (1, 1), ((1, 1), (1, 1))) ** 2)
    compiled = jax.jit(jax.grad(loss, (0, 1))).lower(x, k).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  with_silu, without = temp_bytes(True), temp_bytes(False)
  assert with_silu < without + x.nbytes // 2, (with_silu, without, x.nbytes)


def test_conv_module_has_flax_conv_parameters():
  import flax.linen as nn
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 16))
  ours = layers.Conv(24, (3, 3), padding=((1, 1), (1, 1)))
  ref = nn.Conv(24, (3, 3), padding=((1, 1), (1, 1)))
  p = ours.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, p) == jax.tree.map(jnp.shape, ref.init(jax.random.key(1), x))
  p = jax.tree.map(lambda a: a + 0.1, p)  # nonzero bias
  np.testing.assert_allclose(ours.apply(p, x), ref.apply(p, x), rtol=1e-5, atol=1e-5)
  with pytest.raises(Exception, match=r"x.shape=\(16, 16, 16\) must be \[B, H, W, C\]"):
    ours.apply(p, x[0])


@pytest.mark.parametrize("shape", [(2, 5, 6, 8), (3, 4, 4, 16)])
@pytest.mark.parametrize("custom_vjp", [True, False])
def test_upsample_is_conv3x3_of_the_nearest_upsampled_map(shape, custom_vjp):
  """Four 2x2 phase convs on x == nearest 2x upsampling then Conv 3x3: values, gradients, params."""
  x = jax.random.normal(jax.random.key(0), shape)
  up = layers.Upsample(custom_vjp=custom_vjp)
  params = up.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, params) == {"params": {"conv": {"bias": (shape[-1],),
                                                                  "kernel": (3, 3, shape[-1], shape[-1])}}}
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), params)

  def reference(p, x):
    b, h, w, c = x.shape
    u = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    return jax.lax.conv_general_dilated(u, p["params"]["conv"]["kernel"], (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["params"]["conv"]["bias"]

  np.testing.assert_allclose(up.apply(params, x), reference(params, x), rtol=1e-5, atol=1e-5)
  loss = lambda f: (lambda p, x: jnp.sum(jnp.sin(f(p, x))))  # noqa: E731
  ours = jax.grad(loss(up.apply), (0, 1))(params, x)
  ref = jax.grad(loss(reference), (0, 1))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), ours, ref)
  if not custom_vjp:  # forward mode as well
    v = jax.random.normal(jax.random.key(3), x.shape)
    np.testing.assert_allclose(jax.jvp(lambda y: up.apply(params, y), (x,), (v,))[1],
                               jax.jvp(lambda y: reference(params, y), (x,), (v,))[1], rtol=1e-4, atol=1e-4)
  with pytest.raises(Exception, match=r"kernel.shape=\(1, 1, 8, 8\) must be \[3, 3, Cin, Cout\]"):
    layers.upsample_conv3x3(x[..., :8], jnp.ones((1, 1, 8, 8)))


def test_unet_without_custom_vjp_is_the_same_network_and_has_forward_mode():
  from jaxdiff.models import UNet
  kw = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4, dropout=0.0)
  fast, plain = UNet(**kw), UNet(**kw, custom_vjp=False)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  t = jnp.array([10.0, 500.0])
  init = lambda m: (lambda k: m.init(k, x, t, train=False)["params"])  # noqa: E731
  params = jax.jit(init(fast))(jax.random.key(1))  # (jit: eager init compiles op by op)
  # the same parameter tree, so either module applies a checkpoint of the other
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, jax.eval_shape(init(plain), jax.random.key(1)))
  f = lambda m: (lambda p, y: m.apply({"params": p}, y, t, train=False))  # noqa: E731
  np.testing.assert_allclose(jax.jit(f(fast))(params, x), jax.jit(f(plain))(params, x), atol=1e-6)
  loss = lambda m: (lambda p, y: jnp.sum(jnp.sin(f(m)(p, y))))  # noqa: E731
  grad = lambda m: jax.jit(jax.grad(loss(m), (0, 1)))  # noqa: E731  (jit: eager op-by-op is slow)
  for a, b in zip(jax.tree.leaves(grad(fast)(params, x)), jax.tree.leaves(grad(plain)(params, x))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  v = jax.random.normal(jax.random.key(2), x.shape)
  with pytest.raises(TypeError, match="custom_vjp"):
    jax.jvp(lambda y: f(fast)(params, y), (x,), (v,))
  jv = jax.jit(lambda y, v: jax.jvp(lambda z: f(plain)(params, z), (y,), (v,))[1])(x, v)
  u = jax.random.normal(jax.random.key(3), x.shape)
  vjp_u = jax.jit(lambda y, u: jax.vjp(lambda z: f(fast)(params, z), y)[1](u)[0])(x, u)
  # <u, J v> computed in forward mode (plain) equals <J^T u, v> in reverse mode (custom VJPs)
  np.testing.assert_allclose(jnp.sum(u * jv), jnp.sum(vjp_u * v), rtol=1e-4)


def _losses(dtype, steps=40):
  c = load_config("tiny")
  c.model.dtype = dtype
  c.optimizer.update(learning_rate=3e-3, warmup_steps=0)
  exp = train.build_experiment(c)
  opt = train.make_optimizer(**c.optimizer.to_dict(), num_steps=steps)
  mesh = sharding.create_mesh({"data": 1}, devices=jax.devices()[:1])
  init, _, state_sh = train.abstract_train_state(c, exp, opt, mesh)
  step = jax.jit(functools.partial(train.train_step, model=exp.model, loss_fn=train.make_loss(c, exp.process),
                                   optimizer=opt, ema_decay=0.9))
  state = jax.jit(init, out_shardings=state_sh)(jax.random.key(0))
  from jaxdiff.data import synthetic
  x, _ = synthetic.shapes(64, 8, 3, seed=0)
  x = jnp.asarray(x, jnp.float32) / 127.5 - 1.0
  out = []
  for i in range(steps):
    batch = {"x": jax.lax.dynamic_slice_in_dim(x, (8 * i) % 64, 8)}
    state, m = step(state, batch, jax.random.key(i))
    out.append(float(m["loss"]))
  return np.array(out), state


def test_bf16_training_follows_the_fp32_loss_curve():
  fp32, s32 = _losses("float32")
  bf16, s16 = _losses("bfloat16")
  # Parameters, EMA and optimizer state stay float32; only the compute is bfloat16.
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves((s16.params, s16.ema_params, s16.opt_state))
             if jnp.issubdtype(p.dtype, jnp.floating))
  assert not np.allclose(fp32, bf16)  # bf16 really ran
  assert np.all(np.isfinite(bf16))
  # Both learn by the same amount: the smoothed curves agree to 10% everywhere.
  smooth = lambda a: np.convolve(a, np.ones(8) / 8, mode="valid")  # noqa: E731
  np.testing.assert_allclose(smooth(bf16), smooth(fp32), rtol=0.1)
  assert smooth(bf16)[-1] < 0.6 * smooth(bf16)[0]


def test_xla_cpu_flag_defaults():
  from jaxdiff import xla_flags
  flag = xla_flags.CPU_CONV_FLAG
  assert xla_flags.default_flags({}, (0, 10)) == flag
  assert xla_flags.default_flags({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, (0, 11)) == flag
  assert xla_flags.default_flags({}, (0, 99)) == ""  # untested jaxlib: an unknown flag would abort XLA
  assert xla_flags.default_flags({"JAXDIFF_XLA_DEFAULTS": "0"}, (0, 10)) == ""
  mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=reduce"}
  assert xla_flags.default_flags(mine, (0, 10)) == ""  # the user's own setting wins
  env = {"XLA_FLAGS": "--a=1"}
  added = xla_flags.apply_defaults(env)
  assert env["XLA_FLAGS"] == ("--a=1 " + added).strip()
  assert xla_flags.ynn_convolutions_enabled({"XLA_FLAGS": flag}) is False
  assert xla_flags.ynn_convolutions_enabled({}) is True


def test_jaxdiff_import_put_convolutions_on_xla_eigen_kernels():
  """Importing jaxdiff (conftest's flags set first) keeps this process's convs off YNNPACK."""
  import os

  from jaxdiff import xla_flags
  if not xla_flags.default_flags({}):
    pytest.skip("jaxlib version outside the tested range: jaxdiff sets no flag")
  assert xla_flags.CPU_CONV_FLAG in os.environ["XLA_FLAGS"]
  x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
  hlo = jax.jit(layers.conv2d_plain, static_argnums=(2, 3)).lower(x, w, (1, 1), ((1, 1), (1, 1))).compile().as_text()
  assert "convolution(" in hlo and "__ynn_fusion" not in hlo


def test_threefry2x32_is_jax_threefry():
  from jax.extend.random import threefry_2x32

  rng = np.random.default_rng(0)
  for n in (1, 37):
    k = rng.integers(0, 2**32, 2, dtype=np.uint32)
    c = rng.integers(0, 2**32, 2 * n, dtype=np.uint32)
    a, b = layers.threefry2x32(k[0], k[1], c[:n], c[n:])
    ref = threefry_2x32((jnp.uint32(k[0]), jnp.uint32(k[1])), jnp.asarray(c))
    np.testing.assert_array_equal(np.concatenate([a, b]), ref)


@pytest.mark.parametrize("shape", [(64, 16, 16, 32), (33, 7, 9, 5), (40001,), (3, 1)])
def test_dropout_mask_is_bernoulli(shape):
  keep = 0.9
  m = np.asarray(layers.dropout_mask(jax.random.key(0), shape, keep))
  assert m.shape == shape and m.dtype == bool
  tol = lambda p, n: 5 * np.sqrt(p * (1 - p) / n) + 1e-9  # noqa: E731
  assert abs(m.mean() - keep) < tol(keep, m.size) or m.size < 10
  if m.ndim == 4:  # neighbours along every axis, and channels c and c + C/2 (one hash), independent
    pairs = [(m[1:], m[:-1]), (m[:, 1:], m[:, :-1]), (m[:, :, 1:], m[:, :, :-1]), (m[..., 1:], m[..., :-1])]
    if shape[-1] % 2 == 0:
      pairs.append((m[..., : shape[-1] // 2], m[..., shape[-1] // 2:]))
    for u, v in pairs:
      assert abs((u & v).mean() - keep**2) < tol(keep**2, u.size)
    other = np.asarray(layers.dropout_mask(jax.random.key(1), shape, keep))
    assert abs((m == other).mean() - (keep**2 + (1 - keep) ** 2)) < tol(0.82, m.size)
  np.testing.assert_array_equal(m, layers.dropout_mask(jax.random.key(0), shape, keep))


def test_dropout_values_module_and_bad_rate():
  x = jnp.full((8, 16, 16, 12), 2.0)
  y = np.asarray(layers.dropout(x, 0.25, jax.random.key(3)))
  assert set(np.unique(y)) <= {0.0, np.float32(2.0 / 0.75)}
  assert abs(y.mean() - 2.0) < 0.05  # inverted dropout keeps the mean
  assert layers.dropout(x, 0.0, jax.random.key(3)) is x
  for rate in (1.0, -0.1):
    with pytest.raises(Exception, match="rate"):
      layers.dropout(x, rate, jax.random.key(3))
  mod = layers.Dropout(0.25)
  np.testing.assert_array_equal(mod.apply({}, x, deterministic=True), x)
  z = mod.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
  assert 0 < float(jnp.mean(z == 0)) < 0.5
  # bfloat16 stays bfloat16; a legacy uint32 key works too
  assert layers.dropout(x.astype(jnp.bfloat16), 0.1, jax.random.PRNGKey(0)).dtype == jnp.bfloat16


def test_dropout_traces_its_cipher_once_per_shape(monkeypatch):
  # a U-Net's dropouts share a few shapes: each shape's ~100-op cipher is traced once, not
  # once per call (and not again for the gradient); a shape no other test uses, so the jit
  # cache is cold here
  calls = []
  cipher = layers.threefry2x32
  monkeypatch.setattr(layers, "threefry2x32", lambda *a: calls.append(1) or cipher(*a))
  x = jnp.ones((3, 5, 7, 14))

  def loss(x, key):
    for i in range(4):
      x = layers.dropout(x, 0.1, jax.random.fold_in(key, i)) * 1.5
    return jnp.sum(layers.dropout(x[..., :7], 0.1, key) ** 2)

  g = jax.jit(jax.grad(loss))(x, jax.random.key(0))
  assert len(calls) == 2  # one per shape: [.., 14] and [.., 7]
  y = x
  for i in range(4):
    y = layers.dropout(y, 0.1, jax.random.fold_in(jax.random.key(0), i)) * 1.5
  z = layers.dropout(y[..., :7], 0.1, jax.random.key(0))
  assert len(calls) == 2  # eager calls hit the same cache
  np.testing.assert_allclose(g[..., :7], jnp.where(z != 0, 2 * z * (y[..., :7] / x[..., :7]) / 0.9, 0), rtol=1e-6)


def test_dropout_mask_is_one_loop_free_fusion_and_sharding_invariant():
  shape = (16, 8, 8, 32)
  f = jax.jit(lambda k: layers.dropout_mask(k, shape, 0.9))
  # jax.random.bernoulli's threefry is a while loop over the whole array on CPU (12x slower)
  assert " while(" not in f.lower(jax.random.key(0)).compile().as_text()
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None, None, "model"))
  sharded = jax.jit(lambda k: layers.dropout_mask(k, shape, 0.9), out_shardings=spec)(jax.random.key(0))
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(sharded), np.asarray(f(jax.random.key(0))))
