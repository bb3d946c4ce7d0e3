"""Train a VAE on binary images, offline, and plot what it learned.

Run `python -m keras_elbo.demo` to train an MLP VAE on scikit-learn's 8x8
digits (bundled, no download) in well under a minute on a CPU, or pass
`--data binarized_mnist.npz` for statically binarized MNIST. It prints the
loss (the negative ELBO, at KL weight 1 without free bits) and the KL after
each epoch, then the test ELBO and the importance-weighted test
log-likelihood, saves the model to `vae.keras`, reloads it, and writes
`reconstructions.png`, `samples.png` and `curves.png`.
Needs matplotlib and scikit-learn: `pip install "keras_elbo[demo]"`.
"""

import argparse
import math
import os
import sys

import keras
import numpy as np

import keras_elbo as ke
from keras_elbo import datasets
from keras_elbo.flows import FlowPosterior

# Defaults that depend on the data set: (digits, MNIST). The 1,438 digits
# take 23 steps an epoch: at 30 epochs the reconstructions are still one
# blurred average digit (test -ELBO 19.7), at 100 they are the digits (18.2).
_EPOCHS = (100, 30)
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
    free_bits: float = 0.0,
    seed: int | None = None,
    posterior: str = "gaussian",
    num_flows: int = 2,
    objective: str = "elbo",
    train_samples: int = 1,
    dreg: bool = False,
) -> keras.Model:
    """An MLP VAE whose output is one Bernoulli logit per pixel.

    An `ELBOModel`: `fit` logs the KL (`kl`) next to the loss. The encoder
    body is a nested model named `"encoder"` (a `VampPrior` shares it), the
    posterior layer `"posterior"` and the decoder, a nested model from z to
    logits, `"decoder"`. With `posterior="iaf"` the posterior
    is a `FlowPosterior` of `num_flows` steps, each a MADE of `hidden` units
    conditioned on the encoder's features. `objective`, `train_samples`
    and `dreg` are `ELBOModel`'s `objective`, `num_samples` and `dreg`.
    """
    encoder = keras.Sequential(
        [keras.Input((num_pixels,)), keras.layers.Dense(hidden, activation="relu")],
        name="encoder",
    )
    prior_layer = {
        "normal": lambda: None,
        "mixture": lambda: ke.MixturePrior(latent_dim, num_components, seed=seed),
        # Pseudo-inputs kept in [0, 1], like the binary pixels they stand for.
        "vamp": lambda: ke.VampPrior(
            encoder, num_components, (num_pixels,), activation="hard_sigmoid", seed=seed
        ),
    }[prior]()
    kl = ke.KLRegularizer(
        prior=prior_layer, mode=kl_mode, num_samples=num_samples, free_bits=free_bits, seed=seed
    )
    x = keras.Input((num_pixels,), name="image")
    if posterior == "iaf":
        posterior_layer = FlowPosterior(
            latent_dim,
            num_flows=num_flows,
            hidden_units=(hidden,),
            context=True,
            kl_regularizer=kl,
            seed=seed,
            name="posterior",
        )
    else:
        posterior_layer = ke.GaussianPosterior(
            latent_dim, kl_regularizer=kl, seed=seed, name="posterior"
        )
    z = posterior_layer(encoder(x))
    decoder = keras.Sequential(
        [
            keras.Input((latent_dim,)),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(num_pixels),
        ],
        name="decoder",
    )
    return ke.ELBOModel(
        x,
        decoder(z),
        name="vae",
        objective=objective,
        num_samples=train_samples,
        dreg=dreg,
    )


class EpochReport(keras.callbacks.Callback):
    """Prints one line per epoch: train and test loss and KL (and KL weight).

    The demo's only display of an epoch: `fit` runs with `verbose=0`, so no
    progress bar repeats the same numbers. The loss is the negative ELBO when
    the KL weight is 1 and free bits are off (the negative importance-weighted
    bound with `--objective iwae`); during a KL warm-up it is the weighted
    objective.
    """

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        line = f"epoch {epoch + 1}/{self.params['epochs']}  train loss {logs['loss']:.2f}"
        line += f"  KL {logs['kl']:.2f}"
        if "val_loss" in logs:
            line += f"  |  test loss {logs['val_loss']:.2f}  KL {logs['val_kl']:.2f}"
        if "kl_weight" in logs:
            line += f"  |  KL weight {logs['kl_weight']:.3f}"
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
    # Called directly, not through `predict`: on TensorFlow each new batch
    # shape retraces `predict`'s function, and it warns after five.
    probs = keras.ops.convert_to_numpy(keras.ops.sigmoid(vae(x, training=False)))
    title = "test images (top), Bernoulli means of p(x|z), z ~ q(z|x) (bottom)"
    _image_grid(np.concatenate([x, probs]), 2, path, title)


def plot_samples(vae, path, seed=0, n=100):
    """Saves the Bernoulli means of `n` images decoded from prior samples."""
    posterior = vae.get_layer("posterior")
    prior = posterior.kl_regularizer.prior
    if prior is None:  # the standard normal
        z = np.random.default_rng(seed).standard_normal((n, posterior.latent_dim))
        z = z.astype("float32")
    else:
        z = prior.distribution(posterior_layer=posterior).sample(n, seed=seed)
    logits = vae.get_layer("decoder")(z, training=False)
    probs = keras.ops.convert_to_numpy(keras.ops.sigmoid(logits))
    _image_grid(probs, math.isqrt(n), path, "decoded samples of the prior p(z)")


def plot_curves(history, path):
    """Saves train/test -ELBO (left) and KL (right) per epoch."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    epochs = np.arange(1, len(history["loss"]) + 1)
    labels = ("loss (-ELBO at KL weight 1)", "KL")
    for ax, key, label in zip(axes, ("loss", "kl"), labels, strict=True):
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
    add("--epochs", type=_positive_int, help="training epochs (default: 100 digits, 30 MNIST)")
    add("--latent-dim", type=_positive_int, help="size of z (default: 8 digits, 32 MNIST)")
    add("--hidden", type=_positive_int, help="hidden units (default: 128 digits, 256 MNIST)")
    add(
        "--prior",
        choices=("normal", "mixture", "vamp"),
        default="mixture",
        help="p(z): N(0, I), a learned mixture of Gaussians, or a VampPrior (default: mixture)",
    )
    add(
        "--num-components",
        type=_positive_int,
        default=10,
        help="Gaussians of the mixture prior, or pseudo-inputs of the VampPrior (default: 10)",
    )
    add(
        "--posterior",
        choices=("gaussian", "iaf"),
        default="gaussian",
        help="q(z|x): a diagonal Gaussian, or one refined by inverse autoregressive "
        "flows conditioned on the encoder's features (default: gaussian)",
    )
    add(
        "--num-flows",
        type=_positive_int,
        default=2,
        help="IAF steps of --posterior iaf (default: 2)",
    )
    add(
        "--kl-mode",
        choices=("auto", "analytic", "mc", "mc_entropy"),
        default="auto",
        help="KL estimator: closed form (analytic; none exists for a mixture or Vamp "
        "prior, or an IAF posterior), Monte Carlo (mc), Monte Carlo with exact entropy "
        "(mc_entropy; not for an IAF posterior), or the best available (default: auto)",
    )
    add(
        "--num-samples",
        type=_positive_int,
        default=1,
        help="Monte Carlo samples of the KL per example (default: 1)",
    )
    add(
        "--objective",
        choices=("elbo", "iwae"),
        default="elbo",
        help="training objective: the ELBO, or the importance-weighted bound of "
        "--train-samples samples (default: elbo)",
    )
    add(
        "--train-samples",
        type=_positive_int,
        default=1,
        help="samples of z per example in training, K of the objective (default: 1)",
    )
    add(
        "--dreg",
        action="store_true",
        help="train --objective iwae with doubly reparameterised gradients",
    )
    add(
        "--warmup",
        type=int,
        default=0,
        metavar="EPOCHS",
        help="KL warm-up: the KL weight rises linearly from 0 to 1 over this many "
        "epochs (default: 0, off)",
    )
    add(
        "--free-bits",
        type=float,
        default=0.0,
        help="nats per latent dimension below which the KL is not penalised (default: 0)",
    )
    add(
        "--iw-samples",
        type=_positive_int,
        default=100,
        help="importance samples for the final test log-likelihood (default: 100; "
        "published tables use 5000)",
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
        choices=(0, 1),
        default=1,
        help="1: one line per epoch, and a progress bar of the importance sampling; "
        "0: the final results only (default: 1)",
    )
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Runs the demo; returns the final test ELBO and KL, and the history."""
    parser = make_parser()
    args = parser.parse_args(argv)
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
    try:
        vae = build_vae(
            x_train.shape[1],
            latent_dim=args.latent_dim or _LATENT_DIM[mnist],
            hidden=args.hidden or _HIDDEN[mnist],
            prior=args.prior,
            num_components=args.num_components,
            kl_mode=args.kl_mode,
            num_samples=args.num_samples,
            free_bits=args.free_bits,
            seed=args.seed,
            posterior=args.posterior,
            num_flows=args.num_flows,
            objective=args.objective,
            train_samples=args.train_samples,
            dreg=args.dreg,
        )
        vae.compile(optimizer="adam", loss=ke.BernoulliNLL(from_logits=True))
    except ValueError as error:  # e.g. --kl-mode analytic with a mixture prior
        parser.error(str(error))
    callbacks = []
    if args.warmup > 0:
        callbacks.append(ke.KLAnnealing(ke.LinearWarmup(args.warmup), unit="epoch"))
    if args.verbose:
        # After KLAnnealing, which adds the epoch's KL weight to the logs.
        callbacks.append(EpochReport())
    history = vae.fit(
        x_train,
        x_train,
        batch_size=args.batch_size,
        epochs=args.epochs or _EPOCHS[mnist],
        validation_data=(x_test, x_test),
        callbacks=callbacks,
        verbose=0,  # EpochReport is the one display of each epoch
    ).history
    # The true ELBO (KL weight 1, no free bits) and the importance-weighted
    # log-likelihood that published tables report.
    elbo = ke.evaluate_elbo(vae, x_test, batch_size=500, seed=args.seed, verbose=0)
    test_elbo, test_kl = float(elbo["elbo"].mean()), float(elbo["kl"].mean())
    print(f"final test ELBO {test_elbo:.2f}  KL {test_kl:.2f}  (nats per example)")
    # A live progress bar in a terminal; in a log (a pipe, a file) one line
    # when done: Keras's bar writes backspaces and carriage returns otherwise.
    progress = (1 if sys.stdout.isatty() else 2) if args.verbose else 0
    log_px = ke.importance_weighted_log_likelihood(
        vae, x_test, num_samples=args.iw_samples, seed=args.seed, verbose=progress
    )
    test_log_px = float(log_px.mean())
    print(f"test log-likelihood {test_log_px:.2f} nats ({args.iw_samples} importance samples)")

    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, "vae.keras")
    vae.save(path)
    reloaded = keras.saving.load_model(path, custom_objects=ke.custom_objects())
    reloaded_elbo = ke.evaluate_elbo(reloaded, x_test, batch_size=500, verbose=0)
    print(
        f"saved {path}; reloaded, its test ELBO is {reloaded_elbo['elbo'].mean():.2f} "
        "(equal up to Monte Carlo noise: each evaluation draws new z)"
    )

    plot_reconstructions(vae, x_test, os.path.join(args.output, "reconstructions.png"), args.seed)
    plot_samples(vae, os.path.join(args.output, "samples.png"), args.seed)
    plot_curves(history, os.path.join(args.output, "curves.png"))
    print(f"wrote reconstructions.png, samples.png and curves.png to {args.output}")
    return {
        "test_elbo": test_elbo,
        "test_kl": test_kl,
        "test_log_likelihood": test_log_px,
        "reloaded_test_elbo": float(reloaded_elbo["elbo"].mean()),
        "reloaded_test_kl": float(reloaded_elbo["kl"].mean()),
        "history": history,
        "model_path": path,
    }


if __name__ == "__main__":
    main()
