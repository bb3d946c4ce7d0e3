"""Training speed of a keras_elbo VAE on each Keras backend.

The MLP VAE of `benchmarks/speed.py` (784-512-256-32-256-512-784, batch 128),
built as a `keras_elbo.ELBOModel` with a `GaussianPosterior` and
`BernoulliNLL(from_logits=True)`, on TensorFlow, JAX and PyTorch:

  (a) analytic KL          (b) Monte Carlo KL, `mode="mc"`, 16 samples
  (c) the same network as a plain deterministic autoencoder (`keras.Model`, the
      same loss) on the same backend: the floor
  (d) the same VAE with `tfp.layers` on `tf_keras` (speed.py's variant (d))

Each (backend, variant) lives in a worker process of its own (`KERAS_BACKEND`
is read when Keras is imported) that builds the model, trains one epoch to
warm up (tracing, compilation), then trains one more epoch each time the driver
asks and answers with the epoch's wall time and the process CPU time
(`time.process_time`, every thread of the worker: less disturbed than wall
time by other work on a shared machine). The driver asks every worker once per
round, in an order rotated each round, so that machine noise hits all alike.

Each ratio is the median over rounds of the ratio of two epochs measured in
the same round, with a 90% bootstrap interval over rounds, for CPU and for wall
time. Goals: on each backend (a)/(c) <= 1.05; on JAX, at least 1.2 times as
fast as `tfp.layers`: (d)/(a) >= 1.2. A goal is "met" when the whole interval
is on the right side of its bound, "MISSED" when it is wholly on the wrong
side, "not resolved" otherwise (as in speed.py). Also each backend's (a)
against TensorFlow's (a), and (b)/(c), without goals.

    python benchmarks/backends.py --quick   # synthetic data, a minute or two
    python benchmarks/backends.py --data ../shared/data/binarized_mnist.npz \\
        --epoch-rows 12800 --rounds 7
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

# Run as a script (`python benchmarks/...`): the repository root on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._ratios import paired_ratio

HIDDEN, LATENT, PIXELS = (512, 256), 32, 784
BACKENDS = ("tensorflow", "jax", "torch")
VARIANTS = {
    "a": "keras_elbo, analytic KL",
    "b": "keras_elbo, mc KL, 16 samples",
    "c": "plain autoencoder",
    "d": "tfp.layers on tf_keras",
}
TFP_LAYERS = "tf_keras"  # the "backend" of variant (d)
MARK = "@@backends "  # prefixes the worker's answers on stdout
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------- worker side


def load(args):
    """The epoch's rows: binarized MNIST from `--data`, else synthetic 0/1 pixels."""
    if args.data and not args.quick:
        from keras_elbo import datasets

        x = datasets.load_binarized_mnist(args.data)[0]
    else:
        rng = np.random.default_rng(0)
        x = (rng.random((2560 if args.quick else 50000, PIXELS)) < 0.13).astype("float32")
    return np.ascontiguousarray(x[: args.epoch_rows]) if args.epoch_rows else x


def build(variant):
    if variant == "d":
        sys.path.insert(0, ROOT)
        from benchmarks import speed  # imports TensorFlow: only in this worker

        return speed.tfp_layers_vae()

    import keras

    import keras_elbo as ke

    def mlp(sizes, name):
        return keras.Sequential(
            [keras.layers.Dense(n, activation="relu") for n in sizes], name=name
        )

    x = keras.Input((PIXELS,))
    features = mlp(HIDDEN, "encoder")(x)
    if variant == "c":
        code = keras.layers.Dense(LATENT)(features)
        model = keras.Model(x, keras.layers.Dense(PIXELS)(mlp(HIDDEN[::-1], "decoder")(code)))
    else:
        mode, num_samples = ("analytic", 1) if variant == "a" else ("mc", 16)
        reg = ke.KLRegularizer(mode=mode, num_samples=num_samples)
        z = ke.GaussianPosterior(LATENT, kl_regularizer=reg)(features)
        model = ke.ELBOModel(x, keras.layers.Dense(PIXELS)(mlp(HIDDEN[::-1], "decoder")(z)))
    model.compile(optimizer="adam", loss=ke.BernoulliNLL(from_logits=True))
    return model


def package_versions():
    """Installed versions, read from the package metadata (nothing is imported)."""
    from importlib import metadata

    found = {}
    for name in ("keras", "tensorflow", "tensorflow-probability", "tf-keras", "jax", "torch"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def answer(payload):
    print(MARK + json.dumps(payload), flush=True)


def epoch(model, x, batch_size):
    wall, cpu = time.perf_counter(), time.process_time()
    model.fit(x, x, batch_size=batch_size, epochs=1, verbose=0, shuffle=False)
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def worker(args):
    """Build once, warm up one epoch, then one timed epoch per line on stdin."""
    import keras

    # No keras.utils.set_random_seed: it imports TensorFlow, when installed, on
    # every backend; the timings do not depend on the initial weights.
    x = load(args)
    model = build(args.variant)
    warm = epoch(model, x, args.batch_size)
    info = dict(
        backend=keras.backend.backend(),
        ready=True,
        rows=len(x),
        warmup=warm,
        jit_compile=getattr(model, "jit_compile", None),
        tensorflow_imported="tensorflow" in sys.modules,
    )
    answer(info)
    for line in sys.stdin:
        if line.strip() != "epoch":
            break
        answer(epoch(model, x, args.batch_size))


# ----------------------------------------------------------------- driver side


class Worker:
    def __init__(self, backend, variant, args, log_dir):
        self.name = f"{backend}/{variant}"
        command = [sys.executable, os.path.abspath(__file__), "--worker", "--variant", variant]
        command += ["--batch-size", str(args.batch_size)]
        if args.quick:
            command.append("--quick")
        if args.data:
            command += ["--data", os.path.abspath(args.data)]
        if args.epoch_rows:
            command += ["--epoch-rows", str(args.epoch_rows)]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
        env["KERAS_BACKEND"] = "tensorflow" if backend == TFP_LAYERS else backend
        self.log = os.path.join(log_dir, f"backends_{backend}_{variant}.log")
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                cwd=ROOT,
                env=env,
            )

    def read(self):
        for line in self.process.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
        with open(self.log) as log:
            tail = log.read()[-3000:]
        raise RuntimeError(f"worker {self.name} ended without an answer; its log:\n{tail}")

    def epoch(self):
        self.process.stdin.write("epoch\n")
        self.process.stdin.flush()
        return self.read()

    def close(self):
        if self.process.poll() is None:
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
            self.process.wait(timeout=60)


def verdict(low, high, bound, at_most=True):
    """ "met" when the whole interval is on the goal's side of `bound`."""
    if (high <= bound) if at_most else (low >= bound):
        return "met"
    if (low > bound) if at_most else (high < bound):
        gap = low / bound - 1 if at_most else 1 - high / bound
        return f"MISSED by {100 * gap:.1f}% or more"
    return "not resolved (the interval straddles the bound)"


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="binarized MNIST .npz (default: synthetic data)")
    p.add_argument("--quick", action="store_true", help="2560 synthetic rows, 3 rounds")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    p.add_argument("--epoch-rows", type=int, help="rows per epoch (default: all)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--backends", default=",".join(BACKENDS), help="comma-separated (default: all three)"
    )
    p.add_argument("--no-tfp-layers", action="store_true", help="leave variant (d) out")
    p.add_argument("--output", default="benchmarks/results", help="folder for the JSON")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    return p


def report(times, backends):
    """Print the table; return the ratios as a dict for the JSON."""
    results = {}

    def row(label, numerator, denominator, bound=None, at_most=True):
        if numerator not in times or denominator not in times:
            return
        entry = {}
        cells = []
        for clock in ("cpu", "wall"):
            ratio, low, high = paired_ratio(times[numerator][clock], times[denominator][clock])
            entry[clock] = {"ratio": ratio, "interval": [low, high]}
            cell = f"{clock} {ratio:.3f} [{low:.3f}, {high:.3f}]"
            if bound is not None:
                entry[clock]["verdict"] = verdict(low, high, bound, at_most)
                cell += f" {entry[clock]['verdict']}"
            cells.append(cell)
        results[label] = entry
        print(f"  {label:26s} " + "\n  {:26s} ".format("").join(cells))

    print("\nmedian epoch seconds (CPU time of the worker process / wall time):")
    for name, t in times.items():
        print(f"  {name:14s} cpu {np.median(t['cpu']):7.2f}   wall {np.median(t['wall']):7.2f}")
    print("\nmedian of same-round ratios [90% bootstrap interval over rounds] verdict")
    for backend in backends:
        print(f"{backend}:")
        row(f"{backend} (a)/(c) <= 1.05", f"{backend}/a", f"{backend}/c", 1.05)
        row(f"{backend} (b)/(c)", f"{backend}/b", f"{backend}/c")
    print("against tfp.layers on tf_keras (d):")
    for backend in backends:
        bound = 1.2 if backend == "jax" else None
        label = f"(d)/{backend} (a)" + (" >= 1.2" if bound else "")
        row(label, f"{TFP_LAYERS}/d", f"{backend}/a", bound, at_most=False)
    print("against TensorFlow's (a):")
    for backend in backends:
        if backend != "tensorflow":
            row(f"{backend} (a)/tensorflow (a)", f"{backend}/a", "tensorflow/a")
    return results


def main():
    args = parser().parse_args()
    if args.worker:
        return worker(args)
    backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise SystemExit(f"unknown backends {unknown}; choose among {list(BACKENDS)}")
    rounds = 3 if args.quick else args.rounds
    slots = [(b, v) for b in backends for v in "abc"]
    if not args.no_tfp_layers:
        slots.append((TFP_LAYERS, "d"))
    os.makedirs(args.output, exist_ok=True)
    load_before = os.getloadavg()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{load_before[0]:.2f}; {rounds} rounds of {len(slots)} workers, batch "
        f"{args.batch_size}, data {'synthetic' if args.quick or not args.data else args.data}"
    )
    workers = {}
    try:
        for backend, variant in slots:  # start all, then wait: imports overlap
            workers[f"{backend}/{variant}"] = Worker(backend, variant, args, args.output)
        info = {}
        for name, w in workers.items():
            info[name] = w.read()
            jit = info[name]["jit_compile"]
            print(
                f"  ready {name:14s} rows {info[name]['rows']}, jit_compile={jit}, warm-up "
                f"epoch {info[name]['warmup']['wall']:.1f} s, TensorFlow imported: "
                f"{info[name]['tensorflow_imported']}"
            )
        versions_seen = package_versions()
        print("versions: " + ", ".join(f"{k} {v}" for k, v in versions_seen.items()))
        times = {name: {"cpu": [], "wall": []} for name in workers}
        names = list(workers)
        start = time.perf_counter()
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                result = workers[name].epoch()
                times[name]["cpu"].append(result["cpu"])
                times[name]["wall"].append(result["wall"])
            print(
                f"round {r + 1}/{rounds} (cpu s): "
                + "  ".join(f"{n}={t['cpu'][-1]:.2f}" for n, t in times.items()),
                flush=True,
            )
        elapsed = time.perf_counter() - start
    finally:
        for w in workers.values():
            try:
                w.close()
            except Exception:  # a worker that already failed: its log tells why
                w.process.kill()
    results = report(times, backends)
    load_after = os.getloadavg()
    print(
        f"\ntimed rounds took {elapsed:.0f} s; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after (2 CPUs: above 2 means other work shared them)"
    )
    path = os.path.join(args.output, "backends.json")
    with open(path, "w") as f:
        json.dump(
            {
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "argv": sys.argv[1:],
                "versions": versions_seen,
                "workers": info,
                "times": times,
                "ratios": results,
                "load_average": [load_before, load_after],
            },
            f,
            indent=1,
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
