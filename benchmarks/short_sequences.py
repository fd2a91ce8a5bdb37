"""Where the torch block path unrolls the LSTM (layers.UNROLL_MAX_STEPS).

    KERAS_BACKEND=torch python benchmarks/short_sequences.py

One axis of a BiLSTM2D (bidirectional LSTM over (N, T, C) sequences) on the
CPU, two ways on the same variables: ATen's fused kernel (oneDNN), as timm and
the fused route run it, and the unrolled torch ops on Keras' (in, out) weights.
Inference under `inference_mode`, and forward + backward with autograd. Medians
of 30 (15 with autograd) calls, one thread. Run by hand, not by CI.
"""

import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import torch  # noqa: E402

from keras_sequencer import layers  # noqa: E402

SHAPES = [  # (T, batch of rows, C, hidden): sequencer2d_s's stages at 28-224 px
    (1, 1, 384, 96), (1, 16, 384, 96), (2, 1, 384, 96), (2, 16, 384, 96), (2, 64, 384, 96),
    (4, 1, 192, 48), (4, 1, 384, 96), (4, 16, 384, 96), (8, 1, 384, 96), (8, 16, 384, 96),
    (16, 8, 384, 96), (32, 4, 192, 48), (32, 16, 192, 48),
]


def median_ms(fn, calls):
    for _ in range(5):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    torch.set_num_threads(1)
    print("| T | N | C | hidden | inference fused / unrolled ms | ratio | with autograd fused / unrolled ms | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for steps, rows, channels, hidden in SHAPES:
        layer = layers.BiLSTM2D(hidden)
        layer.build((None, steps, steps, channels))
        rnn = layer.rnn_h
        x = torch.randn(rows * steps, steps, channels)

        def fused(inputs):
            weights = layers._torch_rnn_weights(rnn, "lstm", layer._cache_h)
            return layers._torch_rnn(rnn, "lstm", inputs, weights)

        def unrolled(inputs):
            return layers._unrolled_torch_lstm(rnn, inputs)

        with torch.inference_mode():
            inference = [median_ms(lambda: f(x), 30) for f in (fused, unrolled)]
        xg = x.clone().requires_grad_()
        training = [median_ms(lambda: f(xg).sum().backward(), 15) for f in (fused, unrolled)]
        print(f"| {steps} | {rows * steps} | {channels} | {hidden} | {inference[0]:.3f} / {inference[1]:.3f} | "
              f"{inference[0] / inference[1]:.2f}x | {training[0]:.3f} / {training[1]:.3f} | "
              f"{training[0] / training[1]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
