"""Run a torch CNN's inference in NumPy with fastnorm, two ways, and time the norm steps.

    python examples/inference_cnn.py [--batch N] [--size HW] [--repeats R] [--threads T]

Needs torch (`pip install torch==2.13.0`). The torch model is three blocks of
Conv2d(3x3) -> BatchNorm2d -> ReLU, global average pooling and a Linear head,
randomly initialized; a few training-mode batches give its BatchNorms
non-trivial running statistics before it is put in eval mode. It is then run in
NumPy (convolution as a patch view and one tensordot) in two ways:

  folded: fastnorm.fold_batchnorm folds each eval BatchNorm into the conv's
          weight and bias, leaving conv -> ReLU;
  fused:  fastnorm.from_torch converts each block's (BatchNorm2d, ReLU) pair
          into one fastnorm BatchNorm2d(..., activation="relu"), which
          normalizes and applies ReLU in a single pass over memory.

Both outputs are compared with torch's (max abs error). Then the normalization
steps alone are timed on the real conv outputs, at the same thread count:
torch's BatchNorm2d followed by its in-place ReLU (two ops, as in the model) against
fastnorm's fused layer; medians over repeats, calls of the two interleaved.
"""
import argparse
import sys
import time

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

import fastnorm as fn

TOLERANCE = 1e-4  # float32 pipelines; the outputs are of order 1


def make_torch_cnn(seed, channels=(3, 16, 32, 32), classes=10, input_size=32):
    torch.manual_seed(seed)
    blocks = [torch.nn.Sequential(torch.nn.Conv2d(c_in, c_out, 3, padding=1),
                                  torch.nn.BatchNorm2d(c_out), torch.nn.ReLU(inplace=True))
              for c_in, c_out in zip(channels[:-1], channels[1:])]
    model = torch.nn.Sequential(*blocks, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(channels[-1], classes))
    with torch.no_grad():
        for block in blocks:  # BatchNorm's default weight 1, bias 0 would be too easy
            block[1].weight.uniform_(0.5, 1.5)
            block[1].bias.uniform_(-0.5, 0.5)
        model.train()
        for _ in range(10):  # running statistics away from their initial (0, 1)
            model(torch.randn(8, channels[0], input_size, input_size) * 2 + 0.5)
    return model.eval(), blocks


def conv2d(x, weight, bias):
    """Stride-1 'same' convolution of x (N, C, H, W) with weight (O, C, k, k), k odd.
    The result is an (N, O, H, W) view of channels-last memory, which fastnorm's
    BatchNorm2d reads as it is, without a copy."""
    pad = weight.shape[-1] // 2
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    patches = sliding_window_view(padded, weight.shape[-2:], axis=(2, 3))  # (N, C, H, W, k, k)
    out = np.tensordot(patches, weight, axes=([1, 4, 5], [1, 2, 3]))  # (N, H, W, O)
    out += bias
    return out.transpose(0, 3, 1, 2)


def numpy_params(conv):
    return conv.weight.detach().numpy(), conv.bias.detach().numpy()


def head(model, features):
    linear = model[-1]
    pooled = features.mean(axis=(2, 3))
    return pooled @ linear.weight.detach().numpy().T + linear.bias.detach().numpy()


def run_folded(model, blocks, x):
    for block in blocks:
        weight, bias = fn.fold_batchnorm(*numpy_params(block[0]), block[1], channel_axis=0)
        x = np.maximum(conv2d(x, weight, bias), 0)
    return x, head(model, x)


def run_fused(model, norms, x):
    for block, norm in zip(model, norms):
        x = norm(conv2d(x, *numpy_params(block[0])))
    return x, head(model, x)


def fused_norms(blocks):
    # block[1:] is torch.nn.Sequential(BatchNorm2d, ReLU): from_torch returns
    # BatchNorm2d(..., activation="relu") with the module's parameters and running stats
    norms = [fn.from_torch(block[1:]) for block in blocks]
    assert all(norm.activation == "relu" and not norm.training for norm in norms)
    return norms


def median_ms(calls, repeats):
    """Median time of each call in ms; the calls are interleaved in every round so that
    load from other processes on the machine falls on all of them alike."""
    for call in calls:  # warm-up: first-touch allocations, thread pools
        call()
        call()
    times = [[] for _ in calls]
    for _ in range(repeats):
        for call, record in zip(calls, times):
            start = time.perf_counter()
            call()
            record.append(time.perf_counter() - start)
    return [1e3 * float(np.median(record)) for record in times]


def time_norm_steps(blocks, norms, x, repeats):
    """Time the normalization steps on the conv outputs torch's model produces."""
    rows = []
    with torch.no_grad():
        for block, norm in zip(blocks, norms):
            conv_out = block[0](x)  # NCHW contiguous, shared with NumPy by .numpy()
            bn, relu = block[1], block[2]  # the model's own modules (ReLU in place)
            data = conv_out.numpy()
            # torch's BatchNorm alone too: what the fused ReLU costs on top of normalizing
            times = median_ms([lambda: relu(bn(conv_out)), lambda: norm(data),
                               lambda: bn(conv_out)], repeats)
            rows.append((tuple(conv_out.shape), *times))
            x = block[1:](conv_out)  # this block's output, next block's input
    return rows


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=fn.get_num_threads(),
                        help="threads for torch and fastnorm alike (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small batch, few repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.repeats = min(args.batch, 4), min(args.size, 32), 5
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    fn.set_num_threads(args.threads)
    model, blocks = make_torch_cnn(args.seed)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_features = torch.nn.Sequential(*blocks)(x).numpy()
        want = model(x).numpy()

    norms = fused_norms(blocks)
    print(f"model: {len(blocks)} x (Conv2d 3x3 -> BatchNorm2d -> ReLU) -> avgpool -> Linear; "
          f"input {tuple(x.shape)}")
    worst = 0.0
    for name, (features, logits) in (
            ("folded (fold_batchnorm, conv -> ReLU)", run_folded(model, blocks, x.numpy())),
            ("fused (from_torch, BatchNorm2d relu)", run_fused(model, norms, x.numpy()))):
        errors = (np.abs(features - want_features).max(), np.abs(logits - want).max())
        worst = max(worst, *errors)
        print(f"max abs error vs torch, {name}: features {errors[0]:.2e}, "
              f"logits {errors[1]:.2e}")

    print(f"\nnormalization steps, median of {args.repeats}, {args.threads} thread(s): "
          f"torch BatchNorm2d + ReLU (eval, two ops) vs fastnorm fused BatchNorm2d(relu)")
    rows = time_norm_steps(blocks, norms, x, args.repeats)
    rows.append(("all blocks", *(sum(row[i] for row in rows) for i in (1, 2, 3))))
    for shape, torch_ms, fast_ms, bn_ms in rows:
        print(f"  {str(shape):18s} torch {torch_ms:7.3f} ms  fastnorm {fast_ms:7.3f} ms  "
              f"speedup {torch_ms / fast_ms:5.2f}x  (torch BN alone {bn_ms:7.3f} ms)")
    if worst > TOLERANCE:
        print(f"error {worst:.2e} is above the tolerance {TOLERANCE:.0e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
