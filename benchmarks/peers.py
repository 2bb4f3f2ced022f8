"""The candidates timed against each other: fastnorm, torch, the NumPy floor, ONNX Runtime.

Each Peer answers `skip_reason(case)` (None when it can run the case) and
`build(case, x, dy, n_threads)`, a zero-argument callable doing the case's
work once. Thread counts are set by the runner for fastnorm and torch; ONNX
Runtime takes its count when a session is made.

What is timed per mode:
  train     layer in training mode, forward (torch under no_grad: the running
            statistics update, but no autograd graph is recorded)
  eval      layer in eval mode, forward (torch under inference_mode)
  backward  after one training forward: fastnorm/NumPy layer.backward(dy);
            torch autograd, torch.autograd.grad(y, (x, *parameters), dy,
            retain_graph=True): gradients of input and parameters, as fastnorm
  fwd+bwd   training forward then backward, each call a fresh forward

Fused cases (case.layer.fusion): fastnorm runs its fused layer (the residual is
the case's second array, dy); torch the composition, autograd giving the
gradients of x, the residual and the parameters; "norm only" is fastnorm's
normalization without the fusion, on x.
"""
import numpy as np

from .numpy_floor import FLOORS


def _layer_callable(layer, mode, x, dy, **forward_kwargs):
    """The work of `mode` for a layer with fastnorm's protocol."""
    def forward():
        return layer(x, **forward_kwargs)
    if mode == "eval":
        layer.eval()
        return forward
    layer.train()
    if mode == "train":
        return forward
    if mode == "backward":
        forward()
        return lambda: layer.backward(dy)

    def forward_backward():
        forward()
        return layer.backward(dy)
    return forward_backward


def _fusion_kwargs(case, x, dy):
    """Forward keywords of a fused case: the residual (the case's second array)."""
    return {"residual": dy} if case.layer.fusion == "add" else {}


def _dtype_kwargs(case, dtype_value):
    """The dtype keyword, for the layers that take one."""
    return {"dtype": dtype_value} if case.layer.takes_dtype else {}


class Peer:
    name = ""
    threaded = True  # follows the thread count being measured

    def available(self):
        """None when installed, else why not."""
        return None

    def skip_reason(self, case):
        return None

    def build(self, case, x, dy, n_threads):  # pragma: no cover - abstract
        raise NotImplementedError


class FastnormPeer(Peer):
    """fastnorm's layers. With preallocated_out, forwards write into one out= array
    made beforehand, so the page faults of fresh output memory are not timed."""

    name = "fastnorm"

    def __init__(self, fastnorm, preallocated_out=False):
        self.fastnorm = fastnorm
        self.preallocated_out = preallocated_out

    def skip_reason(self, case):
        if not hasattr(self.fastnorm, case.layer.class_name):
            return f"fastnorm has no {case.layer.class_name} yet"
        return None

    def make_layer(self, case, fused=True):
        layer_class = getattr(self.fastnorm, case.layer.class_name)
        kwargs = _dtype_kwargs(case, np.dtype(case.dtype))
        if fused and case.layer.activation:
            kwargs["activation"] = case.layer.activation
        return layer_class(*case.layer.args(case.dims), **kwargs)

    def build(self, case, x, dy, n_threads):
        layer = self.make_layer(case)
        kwargs = _fusion_kwargs(case, x, dy)
        if self.preallocated_out and case.mode in ("train", "eval"):
            layer.train(case.mode == "train")
            out = np.empty_like(x)  # same memory layout as x
            return lambda: layer(x, out=out, **kwargs)
        return _layer_callable(layer, case.mode, x, dy, **kwargs)


class NormOnlyPeer(FastnormPeer):
    """fastnorm's normalization alone on a fused case (what the fusion adds is its cost)."""

    name = "norm-only"

    def skip_reason(self, case):
        if not case.layer.fusion:
            return "not a fused case"
        return super().skip_reason(case)

    def build(self, case, x, dy, n_threads):
        return _layer_callable(self.make_layer(case, fused=False), case.mode, x, dy)


class NumpyPeer(Peer):
    name = "numpy"
    threaded = False  # NumPy's elementwise operations and reductions use one thread

    def skip_reason(self, case):
        return "no fused NumPy floor" if case.layer.fusion else None

    def make_layer(self, case):
        return FLOORS[case.layer.family](*case.layer.args(case.dims), dtype=np.dtype(case.dtype))

    def build(self, case, x, dy, n_threads):
        return _layer_callable(self.make_layer(case), case.mode, x, dy)


class TorchPeer(Peer):
    name = "torch"

    def __init__(self):
        import torch
        self.torch = torch

    def make_module(self, case):
        module_class = getattr(self.torch.nn, case.layer.torch_class)
        return module_class(*case.layer.args(case.dims),
                            **_dtype_kwargs(case, getattr(self.torch, case.dtype)))

    def composition(self, case, module):
        """f(x, r) -> output: the module, or torch's composition for a fused case."""
        if case.layer.fusion == "add":
            return lambda x, r: module(x + r)
        if case.layer.activation:
            tF = self.torch.nn.functional
            act = {"relu": tF.relu, "silu": tF.silu, "gelu": tF.gelu,
                   "gelu_tanh": lambda t: tF.gelu(t, approximate="tanh")}[case.layer.activation]
            return lambda x, r: act(module(x))
        return lambda x, r: module(x)

    def build(self, case, x, dy, n_threads):
        torch = self.torch
        module = self.make_module(case)
        f = self.composition(case, module)
        xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)
        rt = torch.from_numpy(dy.copy()) if case.layer.fusion == "add" else None
        if case.mode == "eval":
            module.eval()

            def run():
                with torch.inference_mode():
                    return f(xt, rt)
            return run
        module.train()
        if case.mode == "train":
            def run():
                with torch.no_grad():
                    return f(xt, rt)
            return run
        leaf = xt.requires_grad_()
        inputs = (leaf, *module.parameters())
        if rt is not None:
            inputs = (rt.requires_grad_(), *inputs)
        if case.mode == "backward":
            y = f(leaf, rt)
            return lambda: torch.autograd.grad(y, inputs, dyt, retain_graph=True)
        return lambda: torch.autograd.grad(f(leaf, rt), inputs, dyt)


# ---------------------------------------------------------------- ONNX Runtime

ONNX_OPSET = 23


def _onnx_batch(args, dims, dtype):
    c = args[0]
    return "BatchNormalization", [np.ones(c, dtype), np.zeros(c, dtype), np.zeros(c, dtype),
                                  np.ones(c, dtype)], {"epsilon": 1e-5}


def _onnx_instance(args, dims, dtype):
    c = args[0]
    return "InstanceNormalization", [np.ones(c, dtype), np.zeros(c, dtype)], {"epsilon": 1e-5}


def _onnx_group(args, dims, dtype):
    groups, c = args
    return ("GroupNormalization", [np.ones(c, dtype), np.zeros(c, dtype)],
            {"num_groups": groups, "epsilon": 1e-5})


def _onnx_layer(args, dims, dtype):
    ns = tuple(np.atleast_1d(args[0]))
    return ("LayerNormalization", [np.ones(ns, dtype), np.zeros(ns, dtype)],
            {"axis": -len(ns), "epsilon": 1e-5})


def _onnx_rms(args, dims, dtype):
    ns = tuple(np.atleast_1d(args[0]))
    return ("RMSNormalization", [np.ones(ns, dtype)],
            {"axis": -len(ns), "epsilon": float(np.finfo(dtype).eps)})


def _onnx_lrn(args, dims, dtype):
    size, alpha, beta, k = args
    return "LRN", [], {"size": size, "alpha": alpha, "beta": beta, "bias": k}


# family -> (node builder, the mode ONNX's inference op computes)
ONNX_OPS = {
    "batch": (_onnx_batch, "eval"),
    "instance": (_onnx_instance, "train"),
    "group": (_onnx_group, "train"),
    "layer": (_onnx_layer, "train"),
    "rms": (_onnx_rms, "train"),
    "lrn": (_onnx_lrn, "train"),
}


class OnnxRuntimePeer(Peer):
    """Forward only (ONNX Runtime is an inference engine), NCHW-contiguous input only.
    Its thread pool does not spin between runs, so it leaves the cores to the others."""

    name = "onnxruntime"

    def __init__(self):
        try:
            import onnx
            import onnxruntime
        except ImportError as error:
            self.onnx = self.ort = None
            self.missing = f"not installed ({error.name}); pip install onnxruntime onnx"
        else:
            self.onnx, self.ort, self.missing = onnx, onnxruntime, None
        self._failures = {}

    def available(self):
        return self.missing

    def skip_reason(self, case):
        if self.missing:
            return self.missing
        op = ONNX_OPS.get(case.layer.family)
        if case.layer.fusion:
            return "no fused ONNX operator measured"
        if op is None or op[1] != case.mode:
            return "no ONNX operator for this mode"
        if case.layout != "contiguous":
            return "ONNX operators take NCHW-contiguous input"
        return self._failures.get(self._key(case))

    @staticmethod
    def _key(case):
        return (case.layer.name, case.dims, case.dtype)

    def _model(self, case):
        onnx = self.onnx
        helper = onnx.helper
        dtype = np.dtype(case.dtype)
        op, params, attrs = ONNX_OPS[case.layer.family][0](case.layer.args(case.dims), case.dims, dtype)
        names = [f"p{i}" for i in range(len(params))]
        elem = helper.np_dtype_to_tensor_dtype(dtype)
        graph = helper.make_graph(
            [helper.make_node(op, ["x", *names], ["y"], **attrs)], "norm",
            [helper.make_tensor_value_info("x", elem, list(case.dims))],
            [helper.make_tensor_value_info("y", elem, list(case.dims))],
            [onnx.numpy_helper.from_array(p, n) for p, n in zip(params, names)])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])

    def build(self, case, x, dy, n_threads):
        ort = self.ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = n_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # no busy-waiting of ORT's pool after a run: it would steal cores from the next candidate
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(self._model(case).SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
            feed = {"x": x}
            session.run(None, feed)
        except Exception as error:  # an op or dtype this ONNX Runtime lacks
            reason = f"onnxruntime failed: {str(error).splitlines()[0][:120]}"
            self._failures[self._key(case)] = reason
            raise PeerUnavailable(reason) from None
        return lambda: session.run(None, feed)


class PeerUnavailable(Exception):
    """A peer found out while building that it cannot run the case."""


PEER_NAMES = ("fastnorm", "torch", "norm-only", "numpy", "onnxruntime")
ALWAYS = ("fastnorm", "torch", "norm-only")  # run whatever --peers says


def find(peer_list, name):
    return next(peer for peer in peer_list if peer.name == name)


def make_peers(fastnorm, names=PEER_NAMES, preallocated_out=False):
    """The peers to run, fastnorm and torch always first."""
    makers = {"fastnorm": lambda: FastnormPeer(fastnorm, preallocated_out), "torch": TorchPeer,
              "norm-only": lambda: NormOnlyPeer(fastnorm, preallocated_out),
              "numpy": NumpyPeer, "onnxruntime": OnnxRuntimePeer}
    return [makers[n]() for n in PEER_NAMES if n in names or n in ALWAYS]
