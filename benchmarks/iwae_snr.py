"""Signal-to-noise ratio of the encoder's gradient: IWAE against DReG.

Rainforth et al. (2018) showed that the encoder's gradient of the
importance-weighted bound loses its signal as K grows (SNR ~ 1/sqrt(K)); the
doubly reparameterised gradient (DReG, Tucker et al., 2019) does not. This
script measures it with `keras_elbo.ELBOModel(objective="iwae", dreg=...)`:
the network of Burda et al. (784-200-200-50, tanh), trained for
`--train-epochs` epochs with the ELBO on statically binarized MNIST, then, at
those fixed weights and for a fixed batch of images, `--draws` independent
gradients of the loss for K = 1, 5, 50 with and without DReG. For each
parameter, SNR = |mean| / standard deviation over the draws; the table gives
the median over the encoder's parameters (the layers before the posterior's
output) and over the decoder's.

Gradients are taken eagerly with `tf.GradientTape` (TensorFlow backend).

    python -m benchmarks.iwae_snr --data ../shared/data/binarized_mnist.npz
    python -m benchmarks.iwae_snr --quick   # synthetic data, few draws
"""

import argparse
import datetime
import os
import platform

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_elbo as ke  # noqa: E402
from benchmarks._common import load_mnist, write_results  # noqa: E402
from benchmarks.iwae import build  # noqa: E402


def gradient_draws(model, x, draws):
    """`draws` gradients of the training loss on `x`, one row each."""
    rows = []
    for _ in range(draws):
        with tf.GradientTape() as tape:
            # What a training step computes (the model's own sampling mode).
            with model._drawing_several():
                loss = model.compute_loss(x, x, model(x, training=True), training=True)
        grads = tape.gradient(loss, model.trainable_variables)
        rows.append(np.concatenate([g.numpy().ravel() for g in grads]))
    return np.array(rows)


def median_snr(rows):
    mean, std = np.abs(rows.mean(0)), rows.std(0, ddof=1)
    keep = std > 0
    return float(np.median(mean[keep] / std[keep]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="binarized MNIST .npz (synthetic data without it)")
    parser.add_argument("--train-epochs", type=int, default=1)
    parser.add_argument("--draws", type=int, default=500)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="synthetic data, 50 draws")
    parser.add_argument("--output", default="benchmarks/results")
    args = parser.parse_args()
    if args.quick:
        args.data, args.draws, args.train_epochs = None, 50, 1
    if args.data:
        x_train, x_test = load_mnist(args.data)
    else:
        rng = np.random.default_rng(0)
        x_train = (rng.random((2000, 784)) < 0.2).astype("float32")
        x_test = x_train[:100]
    x = x_test[np.random.default_rng(0).permutation(len(x_test))[: args.batch]]
    base = build("elbo", 1)
    base.fit(x_train, x_train, batch_size=100, epochs=args.train_epochs, verbose=0)
    posterior = next(layer for layer in base.layers if isinstance(layer, ke.Posterior))
    index = base.layers.index(posterior)
    encoder_vars = {id(v) for layer in base.layers[: index + 1] for v in layer.trainable_variables}
    sizes = [int(np.prod(v.shape)) for v in base.trainable_variables]
    is_encoder = np.concatenate(
        [
            np.full(n, id(v) in encoder_vars)
            for n, v in zip(sizes, base.trainable_variables, strict=True)
        ]
    )
    print(
        f"{datetime.date.today()}  {platform.machine()}, {os.cpu_count()} CPUs, Keras "
        f"{keras.__version__} on {keras.backend.backend()}; weights after "
        f"{args.train_epochs} ELBO epoch(s); {args.batch} test images, {args.draws} "
        "gradient draws per row",
        flush=True,
    )
    results = []
    print("\n| K | gradient | encoder SNR (median) | decoder SNR (median) |")
    print("|---|---|---|---|")
    for k in (1, 5, 50):
        for dreg in (False, True):
            model = ke.ELBOModel(
                base.input, base.output, objective="iwae", num_samples=k, dreg=dreg
            )
            model.compile(loss=ke.BernoulliNLL(from_logits=True))
            rows = gradient_draws(model, x, args.draws)
            row = {
                "K": k,
                "dreg": dreg,
                "encoder_snr": median_snr(rows[:, is_encoder]),
                "decoder_snr": median_snr(rows[:, ~is_encoder]),
            }
            results.append(row)
            print(
                f"| {k} | {'DReG' if dreg else 'IWAE'} | {row['encoder_snr']:.3f} "
                f"| {row['decoder_snr']:.3f} |",
                flush=True,
            )
    write_results(args, results, "iwae_snr")


if __name__ == "__main__":
    main()
