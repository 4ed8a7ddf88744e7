"""Benchmark: a Keras model's layer outputs, convscope (Keras on torch) vs keract (Keras on TensorFlow).

Task: the post's own reading of VGG19 (random init, seed 0, no top): the outputs of
``model.layers[2:20]`` for one photo at 200x300, as ``keract.get_activations`` gives them.

  ours    ``convscope.activations(load_model("keras:VGG19", random=True), photo, layers, size)``;
  keract  ``keract.get_activations(model, x, layer_names)`` on the same weights (shared through a
          ``.weights.h5`` file) and the same preprocessed input, in a subprocess under
          ``KERAS_BACKEND=tensorflow``, since a Keras process has one backend. keract 4.5.2 reads
          tf.keras 2 internals (``_is_compiled``, ``_feed_inputs``) and fails on Keras 3; the peer
          then runs the post's own way, ``Model(outputs=[layer.output ...]).predict``, and says so.

keract needs TensorFlow, which convscope does not install. The peer runs in its own virtual
environment; without it the script says how to make one and times convscope alone:

    python3 -m venv /work/kerasbench-venv
    /work/kerasbench-venv/bin/pip install keras==3.15.1 tensorflow-cpu keract numpy h5py

Both timings are warm (one untimed call first) and the best of ``--repeat``; the arrays are compared
layer by layer (max |difference| / max |keract|).

Run: .venv/bin/python benchmarks/keras_activations.py [--repeat 3] [--peer-python PATH]
Quick smoke run: .venv/bin/python benchmarks/keras_activations.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

import _machine
import numpy as np
import torch

import convscope
from convscope.images import sample_photos

POST_LAYERS = ["block1_conv2", "block1_pool", "block2_conv1", "block2_conv2", "block2_pool", "block3_conv1",
               "block3_conv2", "block3_conv3", "block3_conv4", "block3_pool", "block4_conv1", "block4_conv2",
               "block4_conv3", "block4_conv4", "block4_pool", "block5_conv1", "block5_conv2", "block5_conv3"]
DEFAULT_PEER = Path(os.environ.get("CONVSCOPE_KERAS_PEER", "/work/kerasbench-venv")) / "bin" / "python"

PEER = r"""
import json, os, sys, time
os.environ["KERAS_BACKEND"] = "tensorflow"
import numpy as np
import keras, keract, tensorflow as tf
weights, x_file, out_file, repeat = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
layers = sys.argv[5].split(",")
model = keras.applications.VGG19(weights=None, include_top=False)
model.load_weights(weights)
x = np.load(x_file)
try:
    keract.get_activations(model, x, layer_names=layers)  # warm: keract builds its sub-model here
    peer = "keract.get_activations"
    run = lambda: keract.get_activations(model, x, layer_names=layers)
except AttributeError as err:  # keract reads tf.keras 2 internals (_is_compiled, _feed_inputs)
    peer = f"the post's Model(outputs=layer outputs).predict (keract fails on Keras 3: {err})"
    sub = keras.Model(inputs=model.input, outputs=[model.get_layer(n).output for n in layers])
    run = lambda: dict(zip(layers, sub.predict(x, verbose=0)))
    run()
times = []
for _ in range(repeat):
    start = time.perf_counter()
    acts = run()
    times.append(time.perf_counter() - start)
np.savez(out_file, **{k: np.asarray(v) for k, v in acts.items()})
print(json.dumps({"best": min(times), "keras": keras.__version__, "tensorflow": tf.__version__, "peer": peer,
                  "keract": getattr(keract, "__version__", "?")}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--size", default="200x300", help="HxW (default the post's 200x300)")
    parser.add_argument("--peer-python", type=Path, default=DEFAULT_PEER, help="python of a venv with tensorflow + keract")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64x96, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.repeat, args.size = 1, "64x96"
    size = tuple(int(v) for v in args.size.lower().split("x"))
    _machine.header(f"keras: VGG19 model.layers[2:20] at {size[0]}x{size[1]}, convscope (torch) vs keract (TF)")

    loaded = convscope.load_model("keras:VGG19", random=True, seed=0, device="cpu")
    photo = sample_photos()["chelsea"]
    ours_s = _machine.best_of(lambda: convscope.activations(loaded, photo, POST_LAYERS, size=size), args.repeat)
    ours = convscope.activations(loaded, photo, POST_LAYERS, size=size)
    print(f"convscope activations: {ours_s * 1000:.0f} ms (best of {args.repeat}, torch {torch.get_num_threads()} threads)")

    if not args.peer_python.exists():
        print(f"keract: no peer environment at {args.peer_python}. Create it with:\n"
              "  python3 -m venv /work/kerasbench-venv\n"
              "  /work/kerasbench-venv/bin/pip install keras==3.15.1 tensorflow-cpu keract numpy h5py\n"
              "(or pass --peer-python PATH)")
        _machine.footer(f"convscope {ours_s * 1000:.0f} ms for 18 layers at {size[0]}x{size[1]}; keract not run (no peer venv)")
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        loaded.module.keras_model.save_weights(tmp / "vgg19.weights.h5")
        x, _ = loaded.tensor(photo, size)
        np.save(tmp / "x.npy", x.permute(0, 2, 3, 1).numpy())  # the same caffe-preprocessed input, NHWC
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        done = subprocess.run([str(args.peer_python), "-c", PEER, str(tmp / "vgg19.weights.h5"), str(tmp / "x.npy"),
                               str(tmp / "keract.npz"), str(args.repeat), ",".join(POST_LAYERS)],
                              capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"keract run failed:\n{done.stderr[-2000:]}")
        peer = json.loads(done.stdout.strip().splitlines()[-1])
        theirs = dict(np.load(tmp / "keract.npz"))
    worst = 0.0
    for name in POST_LAYERS:
        a, b = ours.maps[name], theirs[name][0].transpose(2, 0, 1)
        assert a.shape == b.shape, (name, a.shape, b.shape)
        rel = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
        worst = max(worst, rel)
        print(f"  {name:<14} {'x'.join(map(str, a.shape)):<14} max rel diff {rel:.2e}")
    print(f"peer: {peer['peer']}")
    print(f"peer on TensorFlow: {peer['best'] * 1000:.0f} ms (best of {args.repeat}; keras {peer['keras']}, "
          f"tensorflow {peer['tensorflow']}, keract {peer['keract']})")
    who = "keract" if peer["peer"].startswith("keract") else "TF Model.predict"
    _machine.footer(f"convscope {ours_s * 1000:.0f} ms vs {who} {peer['best'] * 1000:.0f} ms "
          f"({peer['best'] / ours_s:.2f}x peer/convscope) for 18 layers at {size[0]}x{size[1]}; "
          f"max rel diff {worst:.1e}")


if __name__ == "__main__":
    main()
