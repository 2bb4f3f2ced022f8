"""The benchmark matrix: which layers, shapes, layouts, modes and dtypes are measured.

Adding a layer is adding one LayerSpec to LAYERS: its fastnorm/torch class
name, its family (which says which NumPy floor, float64 reference and ONNX op
it has: see numpy_floor.FLOORS, accuracy.REFERENCES, peers.ONNX_OPS), how its
constructor arguments follow from the input shape, and a few realistic shapes.
A layer fastnorm does not have yet (no `fastnorm.<name>`) is skipped with a note.

Fused cases are LayerSpecs too: `fusion` names what is fused into the layer `cls`
("add": layer(x, residual=r) -> (y, h), r being the case's second array; or an
activation name), and torch runs the composition (x + r then the module, or the
module then the activation). They also time fastnorm's normalization alone (the
"norm only" peer), which the fused forward should be within 10% of.
"""
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

# Modes. For layers without running statistics "train" is simply the forward.
MODES = ("train", "eval", "backward", "fwd+bwd")
# How many arrays of x's size the mode must read or write at least, in one pass:
# forward reads x and writes y; backward reads x and dy and writes dx.
TRAFFIC_ARRAYS = {"train": 2, "eval": 2, "backward": 3, "fwd+bwd": 5}
LAYOUTS = ("contiguous", "channels_last")
DTYPES = ("float32", "float64")
QUICK_MODES = ("train", "eval", "backward")


@dataclass(frozen=True)
class Shape:
    """An input shape. quick: also measured by --quick (contiguous only when
    quick_contiguous); tiny: latency-bound."""

    dims: tuple
    label: str
    quick: bool = False
    tiny: bool = False
    quick_contiguous: bool = False


@dataclass(frozen=True)
class Family:
    """What layers of one kind share."""

    name: str
    running_stats: bool  # eval forward differs from training forward
    channel_axis: bool   # (N, C, *) input, so 4D/5D inputs can be channels-last


FAMILIES = {f.name: f for f in (
    Family("batch", running_stats=True, channel_axis=True),
    Family("instance", running_stats=False, channel_axis=True),
    Family("group", running_stats=False, channel_axis=True),
    Family("lrn", running_stats=False, channel_axis=True),
    Family("layer", running_stats=False, channel_axis=False),
    Family("rms", running_stats=False, channel_axis=False),
)}


@dataclass(frozen=True)
class LayerSpec:
    """One layer: `args(shape)` gives the positional constructor arguments, which
    fastnorm, torch and the NumPy floor share (the SPEC fixes torch's signature)."""

    name: str
    family: str
    args: Callable[[tuple], tuple]
    shapes: tuple
    accuracy_shape: tuple
    torch_name: str = ""    # torch.nn class, when its name differs
    takes_dtype: bool = True  # False for layers without parameters or statistics (LRN)
    cls: str = ""           # fastnorm class, when the name differs (fused cases)
    fusion: str = ""        # "add" (residual), an activation name, or "" (none)

    @property
    def class_name(self):
        return self.cls or self.name

    @property
    def torch_class(self):
        return self.torch_name or self.class_name

    @property
    def activation(self):
        """The fused activation's name, or None."""
        return self.fusion if self.fusion not in ("", "add") else None

    @property
    def fam(self):
        return FAMILIES[self.family]


def _channels(shape):
    return (shape[1],)


def _last_dim(shape):
    return (shape[-1],)


def _groups(shape):
    """GroupNorm(32, C) as in diffusion UNets, fewer groups when C is not a multiple of 32."""
    return (math.gcd(shape[1], 32), shape[1])


def _alexnet_lrn(shape):
    return (5, 1e-4, 0.75, 2.0)  # AlexNet's size, alpha, beta, k


S = Shape
LAYERS = (
    LayerSpec("BatchNorm1d", "batch", _channels, (
        S((64, 128, 512), "1D conv (audio)", quick=True),
        S((4096, 1024), "MLP hidden", quick=True),
        S((256, 2048, 64), "large 1D", ),
        S((8, 16), "tiny", quick=True, tiny=True),
    ), accuracy_shape=(32, 16, 64)),
    LayerSpec("BatchNorm2d", "batch", _channels, (
        S((32, 64, 56, 56), "ResNet-50 stage 1", quick=True),
        S((32, 256, 14, 14), "ResNet-50 stage 3"),
        S((32, 64, 112, 112), "ResNet-50 stem (large)"),
        S((2, 8, 4, 4), "tiny", quick=True, tiny=True),
    ), accuracy_shape=(8, 16, 16, 16)),
    LayerSpec("BatchNorm3d", "batch", _channels, (
        S((2, 32, 16, 56, 56), "R3D video stage 1", quick=True, quick_contiguous=True),
        S((1, 32, 64, 64, 64), "3D UNet"),
        S((1, 4, 2, 3, 3), "tiny", tiny=True),
    ), accuracy_shape=(2, 8, 8, 16, 16)),
    LayerSpec("SyncBatchNorm", "batch", _channels, (
        S((32, 64, 56, 56), "ResNet-50 stage 1, 1 rank", quick=True, quick_contiguous=True),
        S((2, 8, 4, 4), "tiny", tiny=True),
    ), accuracy_shape=(8, 16, 16, 16)),
    LayerSpec("LayerNorm", "layer", _last_dim, (
        S((8, 512, 768), "BERT-base", quick=True),
        S((4, 16, 1024, 64), "QK-norm, head_dim 64", quick=True),
        S((32, 197, 384), "ViT-S"),
        S((4, 1024, 4096), "LLaMA-7B (large)"),
        S((2, 4, 32), "tiny", quick=True, tiny=True),
    ), accuracy_shape=(16, 64, 256)),
    LayerSpec("RMSNorm", "rms", _last_dim, (
        S((8, 512, 768), "BERT-base size", quick=True),
        S((4, 16, 1024, 64), "QK-norm, head_dim 64"),
        S((4, 1024, 4096), "LLaMA-7B (large)"),
        S((2, 4, 32), "tiny", quick=True, tiny=True),
    ), accuracy_shape=(16, 64, 256)),
    LayerSpec("GroupNorm", "group", _groups, (
        S((8, 128, 64, 64), "SD UNet 64x64", quick=True),
        S((8, 256, 56, 56), "diffusion UNet block"),
        S((16, 512, 16, 16), "SD UNet 16x16"),
        S((2, 8, 4, 4), "tiny", quick=True, tiny=True),
    ), accuracy_shape=(4, 64, 16, 16)),
    LayerSpec("InstanceNorm1d", "instance", _channels, (
        S((32, 64, 1024), "audio style", quick=True),
        S((2, 8, 16), "tiny", tiny=True),
    ), accuracy_shape=(8, 16, 512)),
    LayerSpec("InstanceNorm2d", "instance", _channels, (
        S((4, 64, 128, 128), "style transfer", quick=True),
        S((1, 128, 256, 256), "style transfer HD"),
        S((2, 8, 4, 4), "tiny", quick=True, tiny=True),
    ), accuracy_shape=(4, 16, 32, 32)),
    LayerSpec("InstanceNorm3d", "instance", _channels, (
        S((1, 32, 32, 64, 64), "3D UNet", quick=True, quick_contiguous=True),
        S((1, 4, 2, 3, 3), "tiny", tiny=True),
    ), accuracy_shape=(2, 8, 8, 16, 16)),
    LayerSpec("LocalResponseNorm", "lrn", _alexnet_lrn, (
        S((32, 96, 55, 55), "AlexNet conv1 (issue 4's shape)", quick=True),
        S((32, 256, 27, 27), "AlexNet conv2"),
        S((2, 8, 4, 4), "tiny", quick=True, tiny=True),
    ), accuracy_shape=(4, 16, 16, 16), takes_dtype=False),
    # fusions (issue 7): against torch's composition, and fastnorm's normalization alone
    LayerSpec("LayerNorm+add", "layer", _last_dim, (
        S((4096, 768), "BERT-base block", quick=True),
        S((2048, 4096), "LLaMA-7B block", quick=True),
        S((2, 4, 32), "tiny", tiny=True),
    ), accuracy_shape=(16, 64, 256), cls="LayerNorm", fusion="add"),
    LayerSpec("RMSNorm+add", "rms", _last_dim, (
        S((4096, 768), "BERT-base size block", quick=True),
        S((2048, 4096), "LLaMA-7B block", quick=True),
        S((2, 4, 32), "tiny", tiny=True),
    ), accuracy_shape=(16, 64, 256), cls="RMSNorm", fusion="add"),
    LayerSpec("BatchNorm2d+ReLU", "batch", _channels, (
        S((32, 64, 56, 56), "ResNet-50 stage 1", quick=True, quick_contiguous=True),
        S((2, 8, 4, 4), "tiny", tiny=True),
    ), accuracy_shape=(8, 16, 16, 16), cls="BatchNorm2d", fusion="relu"),
    LayerSpec("GroupNorm+SiLU", "group", _groups, (
        S((8, 256, 56, 56), "diffusion UNet block", quick=True),
        S((2, 8, 4, 4), "tiny", tiny=True),
    ), accuracy_shape=(4, 64, 16, 16), cls="GroupNorm", fusion="silu"),
)
LAYER_NAMES = tuple(spec.name for spec in LAYERS)


@dataclass(frozen=True)
class Case:
    """One measured combination (thread counts are looped over by the runner)."""

    layer: LayerSpec
    shape: Shape
    layout: str
    mode: str
    dtype: str

    @property
    def dims(self):
        return self.shape.dims

    @property
    def elements(self):
        return math.prod(self.dims)

    @property
    def input_bytes(self):
        return self.elements * np.dtype(self.dtype).itemsize

    @property
    def min_bytes(self):
        """The one-pass minimum memory traffic of the mode (parameters neglected)."""
        arrays = TRAFFIC_ARRAYS[self.mode]
        if self.layer.fusion == "add" and self.mode != "backward":
            arrays += 2  # the forward also reads the residual and writes h
        return arrays * self.input_bytes

    @property
    def data_key(self):
        """Cases with the same key share their input data."""
        return (self.dims, self.layout, self.dtype)

    @property
    def label(self):
        return f"{self.layer.name} {shape_text(self.dims)} {LAYOUT_SHORT[self.layout]} {self.mode} {DTYPE_SHORT[self.dtype]}"

    def as_dict(self):
        return {"layer": self.layer.name, "family": self.layer.family, "shape": list(self.dims),
                "shape_label": self.shape.label, "tiny": self.shape.tiny, "layout": self.layout,
                "mode": self.mode, "dtype": self.dtype, "elements": self.elements,
                "min_bytes": self.min_bytes, "fusion": self.layer.fusion}


LAYOUT_SHORT = {"contiguous": "contig", "channels_last": "ch-last"}
DTYPE_SHORT = {"float32": "f32", "float64": "f64"}


def shape_text(dims):
    return "(" + ",".join(str(d) for d in dims) + ")"


def layouts_for(spec, dims):
    """Channels-last exists for 4D/5D (N, C, *) inputs, as torch.channels_last(_3d)."""
    if spec.fam.channel_axis and len(dims) in (4, 5):
        return LAYOUTS
    return LAYOUTS[:1]


def modes_for(spec, shape, quick):
    modes = QUICK_MODES if quick else MODES
    if shape.tiny and quick:
        modes = ("train",)
    return tuple(m for m in modes if m != "eval" or spec.fam.running_stats)


def select_cases(*, quick, layers=None, dtypes=None, modes=None, layouts=None, tiny_only=False):
    """Expand the registry into cases, ordered so that cases sharing data are adjacent.

    quick: the shapes marked quick, float32, no fwd+bwd, tiny shapes in training
    forward only. tiny_only: every layer's tiny shape (the runner's smoke mode).
    """
    wanted = set(layers) if layers else None
    cases = []
    for spec in LAYERS:
        if wanted is not None and spec.name not in wanted:
            continue
        for shape in spec.shapes:
            if not shape.tiny if tiny_only else (quick and not shape.quick):
                continue
            shape_layouts = layouts_for(spec, shape.dims)
            if quick and (shape.tiny or shape.quick_contiguous):
                shape_layouts = shape_layouts[:1]
            for dtype in dtypes or (("float32",) if quick else DTYPES):
                for layout in shape_layouts:
                    if layouts and layout not in layouts:
                        continue
                    for mode in modes_for(spec, shape, quick):
                        if modes and mode not in modes:
                            continue
                        cases.append(Case(spec, shape, layout, mode, dtype))
    return cases


def make_array(dims, layout, dtype, rng, loc=0.0, scale=1.0):
    """Normal data of shape dims whose memory is in the given layout
    (channels-last: an (N, *spatial, C) array seen through a transpose)."""
    if layout == "channels_last":
        stored = (dims[0],) + tuple(dims[2:]) + (dims[1],)
        order = (0, len(dims) - 1) + tuple(range(1, len(dims) - 1))
        return _normal(stored, dtype, rng, loc, scale).transpose(order)
    return _normal(dims, dtype, rng, loc, scale)


def _normal(shape, dtype, rng, loc, scale):
    x = rng.standard_normal(shape, dtype=np.dtype(dtype))
    if scale != 1.0:
        x *= scale
    if loc != 0.0:
        x += loc
    return x

