"""A TensorFlow/Keras reference pMoE (docs/faithful-behaviour.md §1) for side-by-side CPU throughput with the
PyTorch model.

Runs in its own virtual environment (not the project's; it does not import pmoe_backdoor):

    python3 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu numpy
    /tmp/tfenv/bin/python benchmarks/tf_reference.py --threads 2
    ONEDNN_MAX_CPU_ISA=AVX2 /tmp/tfenv/bin/python benchmarks/tf_reference.py --threads 2   # an AVX2-only CPU

Written from docs/faithful-behaviour.md §1, not from the authors' code: pre-activation WRN trunk (stem, one block
of 16k and one of 32k channels, stride-2 'same' convolutions), BN-ReLU-conv3x3/2 to the 8x8x640 map, four routers
(1x1 score conv, softmax over the 64 positions, top-16, the map times the softmax value there and 0 elsewhere), four
experts BN-ReLU-conv1x1 on the full masked map, concatenated, head BN-ReLU-average pool-dense-softmax. Keras
defaults (BN eps 1e-3, momentum 0.99, Glorot-uniform kernels, zero biases; routers Normal(0, 1e-4)).
Prints the trainable parameter count (3,962,890 at widen 10, 10 classes), then img/s of a training step
(SGD, categorical cross-entropy, batch 128, as the authors' ``model.fit``) and of inference
(``model.predict`` and a traced ``model(x, training=False)``) at each batch size, fp32, NHWC.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow import keras  # noqa: E402

layers = keras.layers
ops = keras.ops


def bn() -> layers.BatchNormalization:
    return layers.BatchNormalization(epsilon=1e-3, momentum=0.99)


def pre_act_block(x, out_ch: int, stride: int):
    """BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3 plus a 1x1 'valid' shortcut conv on the raw input."""
    h = layers.ReLU()(bn()(x))
    h = layers.Conv2D(out_ch, 3, strides=stride, padding="same")(h)
    h = layers.ReLU()(bn()(h))
    h = layers.Conv2D(out_ch, 3, strides=1, padding="same")(h)
    return layers.Add()([layers.Conv2D(out_ch, 1, strides=stride, padding="valid")(x), h])


class PatchRouter(layers.Layer):
    """One expert's router: 1x1 score conv (no bias), softmax over the H*W positions, top-k, gate the map."""

    def __init__(self, top_k: int, **kw):
        super().__init__(**kw)
        self.top_k = top_k

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(int(input_shape[-1]), 1), name="kernel",
                                      initializer=keras.initializers.RandomNormal(0.0, 1e-4))

    def call(self, feats):
        h, w = feats.shape[1], feats.shape[2]
        scores = ops.reshape(ops.matmul(feats, self.kernel), (-1, h * w))  # 1x1 conv; p = w*r + c
        probs = ops.softmax(scores, axis=-1)
        vals, idx = ops.top_k(probs, self.top_k, sorted=False)
        gate = ops.sum(ops.one_hot(idx, h * w) * vals[..., None], axis=1)  # the k values at their positions
        return feats * ops.reshape(gate, (-1, h, w, 1))


def build(num_classes: int = 10, widen: int = 10, experts: int = 4, top_k: int = 16) -> keras.Model:
    inp = keras.Input((32, 32, 3))
    x = layers.Conv2D(16, 3, padding="same")(inp)
    x = pre_act_block(x, 16 * widen, 1)
    x = pre_act_block(x, 32 * widen, 2)
    x = layers.ReLU()(bn()(x))
    feats = layers.Conv2D(64 * widen, 3, strides=2, padding="same")(x)
    outs = []
    for _ in range(experts):
        h = layers.ReLU()(bn()(PatchRouter(top_k)(feats)))
        outs.append(layers.Conv2D(16 * widen, 1)(h))
    x = layers.ReLU()(bn()(layers.Concatenate()(outs)))
    x = layers.Flatten()(layers.AveragePooling2D(8)(x))
    return keras.Model(inp, layers.Dense(num_classes, activation="softmax")(x))


def traced_train_step(model: keras.Model):
    """One SGD step (lr 0.1, categorical cross-entropy) on a resident batch, as a tf.function: no fit() overhead."""
    loss_fn, opt = keras.losses.CategoricalCrossentropy(), keras.optimizers.SGD(learning_rate=0.1)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss
    return step


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rates(fn, n_images: int, repeat: int) -> list[tuple[float, float]]:
    """(img/s, img per CPU-second) of ``repeat`` timed calls after one untimed warm-up call.

    On a shared machine the second figure, images per second of CPU time this process got (user + sys, all
    threads), depends less on what else runs than the wall-clock rate does.
    """
    fn()
    out = []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), cpu_seconds()
        fn()
        out.append((n_images / (time.perf_counter() - t0), n_images / (cpu_seconds() - c0)))
    return out


def fmt(r: list[tuple[float, float]]) -> str:
    wall = [a for a, _ in r]
    return (f"{statistics.median(wall):8.1f} img/s (median of {len(r)}; min {min(wall):.1f}, max {max(wall):.1f}); "
            f"{statistics.median(b for _, b in r):7.1f} img per CPU-second")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="intra- and inter-op threads")
    p.add_argument("--widen", type=int, default=10)
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--train-steps", type=int, default=4, help="steps per timed fit() call")
    p.add_argument("--batches", type=int, nargs="*", default=[1000, 250, 64], help="inference batch sizes")
    p.add_argument("--n", type=int, default=1000, help="images per timed inference call")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--skip-train", action="store_true")
    args = p.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    keras.utils.set_random_seed(0)
    model = build(widen=args.widen)
    print(f"# tensorflow {tf.__version__}, keras {keras.__version__}, {args.threads} threads, "
          f"TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS', '(default)')}, "
          f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '(default)')}")
    n_params = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    print(f"widen {args.widen}: {n_params:,} trainable parameters")
    rng = np.random.default_rng(0)
    if not args.skip_train:
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss="categorical_crossentropy")
        n = args.train_batch * args.train_steps
        xt = rng.random((n, 32, 32, 3), dtype=np.float32)
        yt = np.eye(10, dtype=np.float32)[rng.integers(0, 10, n)]
        r = rates(lambda: model.fit(xt, yt, batch_size=args.train_batch, epochs=1, shuffle=False, verbose=0),
                  n, args.repeat)
        print(f"train fp32 fit    batch {args.train_batch}: {fmt(r)}")
        step = traced_train_step(model)
        xb, yb = tf.constant(xt[:args.train_batch]), tf.constant(yt[:args.train_batch])
        r = rates(lambda: [step(xb, yb) for _ in range(args.train_steps)][-1].numpy(), n, args.repeat)
        print(f"train fp32 traced batch {args.train_batch}: {fmt(r)}")
    x = rng.random((args.n, 32, 32, 3), dtype=np.float32)
    traced = tf.function(lambda xb: model(xb, training=False))
    for bs in args.batches:
        r = rates(lambda: model.predict(x, batch_size=bs, verbose=0), args.n, args.repeat)
        print(f"infer fp32 predict batch {bs:>4}: {fmt(r)}")
        chunks = [tf.constant(x[s:s + bs]) for s in range(0, args.n, bs)]
        r = rates(lambda: [traced(c).numpy() for c in chunks], args.n, args.repeat)
        print(f"infer fp32 traced  batch {bs:>4}: {fmt(r)}")


if __name__ == "__main__":
    main()
