"""Train a VAE on binary images, offline, and plot what it learned.

Run `python -m keras_elbo.demo` to train an MLP VAE on scikit-learn's 8x8
digits (bundled, no download) in well under a minute on a CPU, or pass
`--data binarized_mnist.npz` for statically binarized MNIST. It prints the
negative ELBO and the KL after each epoch, saves the model to `vae.keras`,
reloads it, and writes `reconstructions.png`, `samples.png` and `curves.png`.
Needs matplotlib and scikit-learn: `pip install "keras_elbo[demo]"`.
"""

import argparse
import math
import os

import keras
import numpy as np

import keras_elbo as ke
from keras_elbo import datasets

# Defaults that depend on the data set: (digits, MNIST).
_LATENT_DIM = (8, 32)
_HIDDEN = (128, 256)


def build_vae(
    num_pixels: int,
    latent_dim: int = 8,
    hidden: int = 128,
    prior: str = "mixture",
    num_components: int = 10,
    kl_mode: str = "auto",
    num_samples: int = 1,
    seed: int | None = None,
) -> keras.Model:
    """An MLP VAE whose output is one Bernoulli logit per pixel.

    The posterior layer is named `"posterior"` and the decoder, a nested
    model from z to logits, `"decoder"`.
    """
    prior_layer = (
        None if prior == "normal" else ke.MixturePrior(latent_dim, num_components, seed=seed)
    )
    kl = ke.KLRegularizer(prior=prior_layer, mode=kl_mode, num_samples=num_samples, seed=seed)
    # Another seed for z: with the KL's, its first Monte Carlo draw would repeat z.
    shifted = None if seed is None else seed + 1
    x = keras.Input((num_pixels,), name="image")
    h = keras.layers.Dense(hidden, activation="relu")(x)
    z = ke.GaussianPosterior(latent_dim, kl_regularizer=kl, seed=shifted, name="posterior")(h)
    decoder = keras.Sequential(
        [
            keras.Input((latent_dim,)),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(num_pixels),
        ],
        name="decoder",
    )
    return keras.Model(x, decoder(z), name="vae")


class EpochReport(keras.callbacks.Callback):
    """Prints one line per epoch: train and test -ELBO and KL."""

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        line = f"epoch {epoch + 1}/{self.params['epochs']}  train -ELBO {logs['loss']:.2f}"
        line += f"  KL {logs['kl']:.2f}"
        if "val_loss" in logs:
            line += f"  |  test -ELBO {logs['val_loss']:.2f}  KL {logs['val_kl']:.2f}"
        print(line + "  (nats per example)", flush=True)


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    try:
        import matplotlib
    except ImportError as error:  # an optional dependency: say how to get it
        raise ImportError('The demo needs matplotlib: pip install "keras_elbo[demo]"') from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _image_grid(images, rows, path, title):
    plt = _pyplot()
    side = math.isqrt(images.shape[-1])
    cols = math.ceil(len(images) / rows)
    fig, axes = plt.subplots(rows, cols, figsize=(cols, rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image in zip(axes.flat, images, strict=False):
        ax.imshow(image.reshape(side, side), cmap="gray_r", vmin=0.0, vmax=1.0)
    fig.suptitle(title)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_reconstructions(vae, x, path, seed=0, n=10):
    """Saves `n` images (top) over their reconstructions (bottom)."""
    # Shuffled first: MNIST's test rows are ordered by digit.
    x = x[np.random.default_rng(seed).permutation(len(x))[:n]]
    probs = keras.ops.convert_to_numpy(keras.ops.sigmoid(vae.predict(x, verbose=0)))
    title = "test images (top), Bernoulli means of p(x|z), z ~ q(z|x) (bottom)"
    _image_grid(np.concatenate([x, probs]), 2, path, title)


def plot_samples(vae, path, seed=0, n=100):
    """Saves the Bernoulli means of `n` images decoded from prior samples."""
    prior = vae.get_layer("posterior").kl_regularizer.prior
    latent_dim = vae.get_layer("posterior").latent_dim
    if prior is None:  # the standard normal
        z = np.random.default_rng(seed).standard_normal((n, latent_dim)).astype("float32")
    else:
        z = prior.distribution().sample(n, seed=(seed, 0))
    logits = vae.get_layer("decoder").predict(z, verbose=0)
    probs = keras.ops.convert_to_numpy(keras.ops.sigmoid(logits))
    _image_grid(probs, math.isqrt(n), path, "decoded samples of the prior p(z)")


def plot_curves(history, path):
    """Saves train/test -ELBO (left) and KL (right) per epoch."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    epochs = np.arange(1, len(history["loss"]) + 1)
    for ax, key, label in zip(axes, ("loss", "kl"), ("-ELBO", "KL"), strict=True):
        ax.plot(epochs, history[key], label="train")
        ax.plot(epochs, history[f"val_{key}"], label="test")
        ax.set(xlabel="epoch", ylabel=f"{label} (nats per example)", title=label)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def make_parser() -> argparse.ArgumentParser:
    """The command line of `python -m keras_elbo.demo`."""
    parser = argparse.ArgumentParser(
        prog="python -m keras_elbo.demo", description=__doc__.split("\n\n")[1]
    )
    add = parser.add_argument
    add("--data", metavar="PATH", help="binarized MNIST .npz (default: scikit-learn's digits)")
    add("--epochs", type=_positive_int, default=30, help="training epochs (default: 30)")
    add("--latent-dim", type=_positive_int, help="size of z (default: 8 digits, 32 MNIST)")
    add("--hidden", type=_positive_int, help="hidden units (default: 128 digits, 256 MNIST)")
    add(
        "--prior",
        choices=("normal", "mixture"),
        default="mixture",
        help="p(z): N(0, I) or a learned mixture of Gaussians (default: mixture)",
    )
    add(
        "--num-components",
        type=_positive_int,
        default=10,
        help="Gaussians of the mixture prior (default: 10)",
    )
    add(
        "--kl-mode",
        choices=("auto", "analytic", "mc"),
        default="auto",
        help="KL estimator: closed form (analytic; none exists for a mixture prior), "
        "Monte Carlo (mc), or closed form where one exists (default: auto)",
    )
    add(
        "--num-samples",
        type=_positive_int,
        default=1,
        help="Monte Carlo samples of the KL per example (default: 1)",
    )
    add("--batch-size", type=_positive_int, default=64, help="examples per step (default: 64)")
    add("--seed", type=int, default=0, help="seed of the split, weights, samples (default: 0)")
    add(
        "--output",
        metavar="DIR",
        default="demo_output",
        help="folder for vae.keras and the plots (default: demo_output)",
    )
    add(
        "--verbose",
        type=int,
        choices=(0, 1, 2),
        default=1,
        help="Keras verbosity: 0 silent, 1 progress bar, 2 one line per epoch (default: 1)",
    )
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Runs the demo; returns the final test ELBO and KL, and the history."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.prior == "mixture" and args.kl_mode == "analytic":
        # KLRegularizer raises this too, but inside Keras's long traceback.
        parser.error(
            "--kl-mode analytic: TFP has no closed-form KL against a mixture prior. "
            "Use --kl-mode mc (Monte Carlo) or auto, or --prior normal."
        )
    _pyplot()  # fail now, not after training, if matplotlib is missing
    keras.utils.set_random_seed(args.seed)
    if args.data:
        try:
            x_train, _, x_test = datasets.load_binarized_mnist(args.data)
        except (FileNotFoundError, ValueError) as error:
            parser.error(str(error))
    else:
        x_train, x_test = datasets.load_digits(seed=args.seed)
    mnist = int(bool(args.data))
    vae = build_vae(
        x_train.shape[1],
        latent_dim=args.latent_dim or _LATENT_DIM[mnist],
        hidden=args.hidden or _HIDDEN[mnist],
        prior=args.prior,
        num_components=args.num_components,
        kl_mode=args.kl_mode,
        num_samples=args.num_samples,
        seed=args.seed,
    )
    vae.compile(optimizer="adam", loss=ke.BernoulliNLL(from_logits=True))
    # An explicit progress bar before the report, so each epoch's line follows its bar.
    history = vae.fit(
        x_train,
        x_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x_test, x_test),
        callbacks=[keras.callbacks.ProgbarLogger(), EpochReport()],
        verbose=args.verbose,
    ).history
    test_elbo, test_kl = -history["val_loss"][-1], history["val_kl"][-1]
    print(f"final test ELBO {test_elbo:.2f}  KL {test_kl:.2f}  (nats per example)")

    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, "vae.keras")
    vae.save(path)
    reloaded = keras.saving.load_model(path, custom_objects=ke.custom_objects())
    logs = reloaded.evaluate(
        x_test, x_test, batch_size=args.batch_size, verbose=0, return_dict=True
    )
    print(
        f"saved {path}; reloaded, its test ELBO is {-logs['loss']:.2f} "
        "(equal up to Monte Carlo noise: each evaluation draws new z)"
    )

    plot_reconstructions(vae, x_test, os.path.join(args.output, "reconstructions.png"), args.seed)
    plot_samples(vae, os.path.join(args.output, "samples.png"), args.seed)
    plot_curves(history, os.path.join(args.output, "curves.png"))
    print(f"wrote reconstructions.png, samples.png and curves.png to {args.output}")
    return {
        "test_elbo": test_elbo,
        "test_kl": test_kl,
        "reloaded_test_elbo": -logs["loss"],
        "reloaded_test_kl": logs["kl"],
        "history": history,
        "model_path": path,
    }


if __name__ == "__main__":
    main()
