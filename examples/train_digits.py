"""Train a NumPy MLP (or CNN) with fastnorm's normalization layers on handwritten digits.

    python examples/train_digits.py [--model mlp|cnn] [--epochs N] [--seed S] [--plot PATH]
                                    [--quick]

Needs `pip install "fastnorm[examples]"` (scikit-learn for the data set, which it
ships, so nothing is downloaded; matplotlib for the plot). The network

    x (64 pixels) -> Linear(64, 128) -> BatchNorm1d(128, activation="relu")
                  -> Linear(128, 64) -> LayerNorm(64) -> ReLU -> Linear(64, 10)

is trained with plain minibatch SGD on softmax cross-entropy. Linear layers,
ReLU and the loss are a few lines of NumPy each; the normalization layers are
fastnorm's, forward and backward (BatchNorm applies its ReLU in the same pass).
The same network without the two normalization layers is then trained with
the same learning rate, batches and initial weights, for comparison. Each
epoch prints the loss and the train/test accuracy (eval mode); the curves of
both runs go to a PNG.

--model cnn trains a small CNN instead, with fastnorm's BatchNorm2d(activation="relu")
after each convolution (NumPy im2col, forward and backward):

    x (1x8x8) -> Conv2d(1, 16, 3) -> BatchNorm2d(16, relu) -> AvgPool 2x2
              -> Conv2d(16, 32, 3) -> BatchNorm2d(32, relu) -> AvgPool 2x2 -> Linear(128, 10)
"""
import argparse
import os
import time

import numpy as np
from threadpoolctl import threadpool_limits
from numpy.lib.stride_tricks import sliding_window_view

import fastnorm as fn

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PLOT = os.path.join(HERE, "output", "train_digits.png")
TARGET_ACCURACY = 0.95


# --------------------------------------------------- NumPy layers (same protocol as fastnorm)

class Linear:
    """y = x @ weight + bias, with fastnorm's protocol: layer(x), layer.backward(dy), grads."""

    def __init__(self, n_in, n_out, rng):
        # He initialization: keeps the activations' scale through ReLU layers
        self.weight = (rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(np.float32)
        self.bias = np.zeros(n_out, np.float32)
        self.grads = {}

    def __call__(self, x):
        self._x = x
        return x @ self.weight + self.bias

    def backward(self, dy):
        self.grads = {"weight": self._x.T @ dy, "bias": dy.sum(axis=0)}
        return dy @ self.weight.T


class ReLU:
    grads = {}

    def __call__(self, x):
        self._mask = x > 0
        return x * self._mask

    def backward(self, dy):
        return dy * self._mask


class Conv2d:
    """Stride-1 'same' convolution, weight (out, in, k, k), k odd: patches of the padded
    input (im2col) times the weight matrix; backward adds the patch gradients back."""

    def __init__(self, c_in, c_out, k, rng):
        self.weight = (rng.standard_normal((c_out, c_in, k, k))
                       * np.sqrt(2.0 / (c_in * k * k))).astype(np.float32)
        self.bias = np.zeros(c_out, np.float32)
        self.grads = {}

    def __call__(self, x):
        n, c, h, w = self._shape = x.shape
        pad = self.weight.shape[-1] // 2
        padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        patches = sliding_window_view(padded, self.weight.shape[-2:], axis=(2, 3))
        self._cols = patches.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * w, -1)
        out = self._cols @ self.weight.reshape(len(self.weight), -1).T + self.bias
        # (N, H, W, O) memory seen as NCHW: fastnorm's BatchNorm2d takes it without a copy
        return out.reshape(n, h, w, -1).transpose(0, 3, 1, 2)

    def backward(self, dy):
        n, c, h, w = self._shape
        k = self.weight.shape[-1]
        rows = dy.transpose(0, 2, 3, 1).reshape(n * h * w, -1)
        self.grads = {"weight": (rows.T @ self._cols).reshape(self.weight.shape),
                      "bias": rows.sum(axis=0)}
        d_cols = (rows @ self.weight.reshape(len(self.weight), -1)).reshape(n, h, w, c, k, k)
        d_padded = np.zeros((n, c, h + k - 1, w + k - 1), dy.dtype)
        for i in range(k):  # each input pixel collects the gradients of the patches it is in
            for j in range(k):
                d_padded[:, :, i:i + h, j:j + w] += d_cols[..., i, j].transpose(0, 3, 1, 2)
        return d_padded[:, :, k // 2:k // 2 + h, k // 2:k // 2 + w]


class AvgPool2:
    """2x2 average pooling with stride 2 (even heights and widths)."""

    grads = {}

    def __call__(self, x):
        n, c, h, w = x.shape
        return x.reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))

    def backward(self, dy):
        return np.repeat(np.repeat(dy, 2, axis=2), 2, axis=3) / 4


class Flatten:
    grads = {}

    def __call__(self, x):
        self._shape = x.shape
        return x.reshape(len(x), -1)

    def backward(self, dy):
        return dy.reshape(self._shape)


class Network:
    """Layers run in order; any layer with train()/eval() (fastnorm's) follows the mode."""

    def __init__(self, layers):
        self.layers = layers

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)

    def train(self, mode=True):
        for layer in self.layers:
            if hasattr(layer, "train"):
                layer.train(mode)

    def sgd_step(self, lr):
        # fastnorm layers key their grads by parameter name ("weight", "bias") as Linear does
        for layer in self.layers:
            for name, grad in layer.grads.items():
                getattr(layer, name)[...] -= lr * grad


def build(model, normalized, seed):
    """The MLP or CNN with or without its normalization layers; the same seed gives the
    same weights in both, so the two runs differ only by normalization."""
    rng = np.random.default_rng(seed)
    if model == "mlp":
        fc1, fc2, fc3 = Linear(64, 128, rng), Linear(128, 64, rng), Linear(64, 10, rng)
        if normalized:
            return Network([fc1, fn.BatchNorm1d(128, activation="relu"),
                            fc2, fn.LayerNorm(64), ReLU(), fc3])
        return Network([fc1, ReLU(), fc2, ReLU(), fc3])
    conv1, conv2, fc = Conv2d(1, 16, 3, rng), Conv2d(16, 32, 3, rng), Linear(32 * 2 * 2, 10, rng)
    if normalized:
        norm1, norm2 = fn.BatchNorm2d(16, activation="relu"), fn.BatchNorm2d(32, activation="relu")
    else:
        norm1, norm2 = ReLU(), ReLU()
    # 8x8 images -> 16 maps 8x8 -> pooled 4x4 -> 32 maps 4x4 -> pooled 2x2 -> 10 classes
    return Network([conv1, norm1, AvgPool2(), conv2, norm2, AvgPool2(), Flatten(), fc])


# ----------------------------------------------------------------------- training

def softmax_cross_entropy(logits, labels):
    """Mean loss and its gradient w.r.t. the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)  # no overflow in exp
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = len(labels)
    loss = -log_probs[np.arange(n), labels].mean()
    grad = np.exp(log_probs)
    grad[np.arange(n), labels] -= 1
    return float(loss), (grad / n).astype(np.float32)


def accuracy(net, x, labels):
    net.train(False)
    correct = (net(x).argmax(axis=1) == labels).mean()
    net.train(True)
    return float(correct)


def load_data(model, seed):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # pixels are 0..16
    if model == "cnn":
        x = x.reshape(-1, 1, 8, 8)
    return train_test_split(x, digits.target, test_size=0.25, random_state=seed,
                            stratify=digits.target)


def train(name, net, data, args):
    x_train, x_test, y_train, y_test = data
    rng = np.random.default_rng(args.seed)  # same batch order for both networks
    history = {"loss": [], "train": [], "test": []}
    print(f"-- {name}")
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(x_train))
        losses = []
        # drop the last partial batch: BatchNorm needs more than one sample per batch
        for start in range(0, len(order) - args.batch_size + 1, args.batch_size):
            batch = order[start:start + args.batch_size]
            loss, grad = softmax_cross_entropy(net(x_train[batch]), y_train[batch])
            if not np.isfinite(loss):
                break
            net.backward(grad)
            net.sgd_step(args.lr)
            losses.append(loss)
        history["loss"].append(float(np.mean(losses)) if losses else float("nan"))
        history["train"].append(accuracy(net, x_train, y_train))
        history["test"].append(accuracy(net, x_test, y_test))
        print(f"epoch {epoch:3d}  loss {history['loss'][-1]:.4f}  "
              f"train acc {history['train'][-1]:.4f}  test acc {history['test'][-1]:.4f}")
    return history


def plot(histories, path):
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for (name, history), color in zip(histories.items(), ("tab:blue", "tab:orange")):
        epochs = np.arange(1, len(history["loss"]) + 1)
        ax_loss.plot(epochs, history["loss"], color=color, label=name)
        ax_acc.plot(epochs, history["test"], color=color, label=f"{name} (test)")
        ax_acc.plot(epochs, history["train"], color=color, linestyle="--",
                    label=f"{name} (train)")
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax_acc.axhline(TARGET_ACCURACY, color="gray", linewidth=0.8)
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (both runs)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--plot", default=DEFAULT_PLOT, help="PNG path (default: %(default)s)")
    parser.add_argument("--no-plot", action="store_true", help="skip the plot (no matplotlib)")
    parser.add_argument("--quick", action="store_true", help="few epochs (for the tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = min(args.epochs, 8)
    return args


def main(argv=None):
    args = parse_args(argv)
    data = load_data(args.model, args.seed)
    print(f"digits, {args.model}: {len(data[0])} train, {len(data[1])} test images; "
          f"lr {args.lr}, batch {args.batch_size}, {args.epochs} epochs, seed {args.seed}")
    histories = {}
    norms = "BatchNorm1d + LayerNorm" if args.model == "mlp" else "BatchNorm2d"
    for name, normalized in ((f"with {norms}", True), ("without normalization", False)):
        start = time.perf_counter()
        # the matrices here are small: BLAS threads would only wait on each other
        with threadpool_limits(limits=1, user_api="blas"):
            histories[name] = train(name, build(args.model, normalized, args.seed), data, args)
        print(f"   ({time.perf_counter() - start:.1f} s)")
    if not args.no_plot:
        plot(histories, args.plot)
        print(f"plot written to {args.plot}")
    normed, plain = (h["test"] for h in histories.values())
    print(f"first epoch with test accuracy >= {TARGET_ACCURACY:.0%}: normalized "
          f"{first_epoch_reaching(normed)}, without normalization {first_epoch_reaching(plain)}")
    print(f"final test accuracy: normalized {normed[-1]:.4f}, "
          f"without normalization {plain[-1]:.4f}")


def first_epoch_reaching(accuracies):
    return next((str(i + 1) for i, acc in enumerate(accuracies) if acc >= TARGET_ACCURACY),
                "not reached")


if __name__ == "__main__":
    main()
