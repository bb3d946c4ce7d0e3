"""Quiet start-up for `python -m keras_elbo.demo`.

Under `-m`, Python imports this package (and, through Keras, TensorFlow)
before the demo's own code runs. TensorFlow 2.21 prints its oneDNN and CUDA
driver lines while its libraries load, whatever `TF_CPP_MIN_LOG_LEVEL` says,
so the demo would open with them. `keras_elbo/__init__.py` calls
`quiet_demo_start()` before it imports Keras.
"""

import os
import sys


def quiet_demo_start():
    """Loads TensorFlow with its start-up lines sent to /dev/null, when this
    process is the demo and the user has not set `TF_CPP_MIN_LOG_LEVEL`.

    Level 3 then hides what TensorFlow logs once running (cuInit); the lines
    its libraries print while loading go to /dev/null with file descriptor 2.
    """
    argv = getattr(sys, "orig_argv", [])
    is_demo = "-mkeras_elbo.demo" in argv or any(
        a == "-m" and b == "keras_elbo.demo" for a, b in zip(argv, argv[1:], strict=False)
    )
    if not is_demo or "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    # Under JAX and PyTorch too: the demo calls `keras.utils.set_random_seed`,
    # which imports TensorFlow wherever it is installed (to seed tf.data).
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        pass
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
