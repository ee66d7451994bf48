"""What the passes need to know about FX nodes: which are linears, attentions, activations, in-place writes,
and the networkx data-flow graph of a GraphModule (with the edges that in-place writes add).

Works on Dynamo-level graphs (torch functions, ``call_method`` on tensors) and on ATen-level graphs alike.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Iterable, Optional

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx
from torch.multiprocessing.reductions import StorageWeakRef

import teal_fx.kernels  # noqa: F401  (registers torch.ops.teal)

aten = torch.ops.aten

# a QuantizedLinear's op is a linear too: its weight keeps the float weight's name (the plan's key)
QUANTIZED_LINEAR_TARGETS = {torch.ops.teal.quantized_linear, torch.ops.teal.quantized_linear.default}
LINEAR_TARGETS = {torch._C._nn.linear, F.linear, aten.linear.default} | QUANTIZED_LINEAR_TARGETS
SDPA_TARGETS = {F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default}
SOFTMAX_TARGETS = {torch.softmax, F.softmax, torch.Tensor.softmax, aten._softmax.default, aten.softmax.int}
MATMUL_TARGETS = {torch.matmul, operator.matmul, torch.bmm, aten.bmm.default, aten.matmul.default, torch.einsum,
                  torch.baddbmm, aten.baddbmm.default}
ACTIVATION_TARGETS = {
    F.silu, F.gelu, F.relu, F.mish, F.elu, F.leaky_relu, F.hardswish, F.softplus, F.sigmoid, F.tanh,
    torch.sigmoid, torch.tanh, torch.relu, torch.nn.functional.relu6,
    aten.silu.default, aten.gelu.default, aten.relu.default, aten.sigmoid.default, aten.tanh.default,
    # activations written out elementwise: exact GELU by erf, ELU-like branches by exp / expm1 (Apertus' xIELU)
    torch.erf, torch.exp, torch.expm1, aten.erf.default, aten.exp.default, aten.expm1.default,
}
ACTIVATION_METHODS = {"sigmoid", "tanh", "relu", "silu", "gelu", "erf", "exp", "expm1"}
MUL_TARGETS = {operator.mul, torch.mul, aten.mul.Tensor}
ADD_TARGETS = {operator.add, torch.add, aten.add.Tensor}


def is_linear(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in LINEAR_TARGETS


def linear_args(n: fx.Node) -> tuple[fx.Node, fx.Node, Optional[fx.Node]]:
    """(input, weight, bias) of a linear node, whether given positionally or by keyword."""
    if n.target in QUANTIZED_LINEAR_TARGETS:  # quantized_linear(x, weight, scales, bias)
        args = list(n.args) + [None] * (4 - len(n.args))
        return (args[0] if args[0] is not None else n.kwargs.get("x"), args[1] if args[1] is not None else
                n.kwargs.get("weight"), args[3] if args[3] is not None else n.kwargs.get("bias"))
    args = list(n.args) + [None] * (3 - len(n.args))
    x = args[0] if args[0] is not None else n.kwargs.get("input")
    w = args[1] if args[1] is not None else n.kwargs.get("weight")
    b = args[2] if args[2] is not None else n.kwargs.get("bias")
    return x, w, b


def graph_input_value(n: object, dims: int) -> Optional[torch.Tensor]:
    """The fake value of ``n`` if it is a graph input (placeholder or ``get_attr``) of ``dims`` dimensions, else None."""
    if not (isinstance(n, fx.Node) and n.op in ("placeholder", "get_attr")):
        return None
    v = fake_value(n)
    return v if isinstance(v, torch.Tensor) and v.dim() == dims else None


def _swaps_two_dims(t: fx.Node, rest: tuple) -> bool:
    """``t`` (applied to its first argument, with ``rest`` after it) swaps the two dimensions of a matrix."""
    if t.op == "call_function" and t.target is getattr:
        return rest == ("T",)
    if t.target in ("t", torch.t):
        return not rest
    if t.target in ("transpose", torch.transpose):
        return len(rest) == 2 and {d % 2 for d in rest if isinstance(d, int)} == {0, 1}
    if t.target == "permute":
        return rest in (((1, 0),), (1, 0), ((-1, -2),), (-1, -2))
    return False


def transposed_input(t: object) -> Optional[fx.Node]:
    """W where ``t`` is a transpose of W (``W.T``, ``W.t()``, ``torch.t(W)``, ``W.transpose(0, 1)`` in any spelling
    of the two dimensions, ``W.permute(1, 0)``) and W a 2-D graph input (placeholder or ``get_attr``), else None."""
    if not (isinstance(t, fx.Node) and t.op in ("call_function", "call_method") and t.args and not t.kwargs):
        return None
    w = t.args[0]
    return w if _swaps_two_dims(t, tuple(t.args[1:])) and graph_input_value(w, 2) is not None else None


def linear_scales(n: fx.Node) -> Optional[fx.Node]:
    """The scales of a quantized linear node (None for a float one)."""
    if n.target not in QUANTIZED_LINEAR_TARGETS:
        return None
    return n.args[2] if len(n.args) > 2 else n.kwargs.get("scales")


def is_call(n: fx.Node, targets: set, methods: Iterable[str] = ()) -> bool:
    if n.op == "call_function":
        return n.target in targets
    if n.op == "call_method":
        return n.target in set(methods)
    return False


def is_sdpa(n: fx.Node) -> bool:
    return is_call(n, SDPA_TARGETS)


def is_softmax(n: fx.Node) -> bool:
    return is_call(n, SOFTMAX_TARGETS, ("softmax",))


def is_matmul(n: fx.Node) -> bool:
    return is_call(n, MATMUL_TARGETS, ("matmul", "bmm", "__matmul__", "baddbmm"))


def matmul_operands(n: fx.Node) -> Optional[tuple[Any, Any]]:
    """The two multiplied operands of a matmul node (``baddbmm(input, batch1, batch2)``'s batch1 and batch2, as Bloom
    adds its alibi bias to the scores), or None where they are not given."""
    if n.target in (torch.baddbmm, aten.baddbmm.default, "baddbmm"):
        args = list(n.args[1:3]) + [n.kwargs.get(k) for k in ("batch1", "batch2")][len(n.args[1:3]):]
        return (args[0], args[1]) if len(args) == 2 and all(a is not None for a in args) else None
    return (n.args[0], n.args[1]) if len(n.args) >= 2 else None


def is_activation(n: fx.Node) -> bool:
    if n.op == "call_function":
        return n.target in ACTIVATION_TARGETS
    if n.op == "call_method":
        return n.target in ACTIVATION_METHODS
    if n.op == "call_module":
        return True  # a submodule Dynamo did not inline between two linears is an activation in practice
    return False


def is_mul(n: fx.Node) -> bool:
    return is_call(n, MUL_TARGETS, ("mul", "__mul__"))


_IN_PLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                       operator.iand, operator.ior}


def mutated_arg(n: fx.Node) -> Optional[fx.Node]:
    """The tensor an in-place op writes into: ``x.index_copy_(...)``, ``x.copy_(...)``, ``torch.relu_(x)``,
    ``aten.index_put_`` and other mutable ops, ``x[i] = y``, ``x += y``, ``F.silu(x, inplace=True)``. The operator
    module's ``and_`` / ``or_`` are not in place, for all their names."""
    if n.op not in ("call_method", "call_function") or not n.args or not isinstance(n.args[0], fx.Node):
        return None
    if n.target in _IN_PLACE_OPERATORS or n.kwargs.get("inplace") is True:
        return n.args[0]
    if n.op == "call_method":
        name = n.target
    elif isinstance(n.target, torch._ops.OpOverload):
        if n.target._schema.is_mutable:
            return n.args[0]
        name = n.target._schema.name.split("::")[-1]
    elif getattr(n.target, "__module__", None) in ("_operator", "operator"):
        return None
    else:
        name = getattr(n.target, "__name__", "") or ""
    return n.args[0] if name.endswith("_") and not name.endswith("__") else None


def dataflow_graph(graph: fx.Graph) -> nx.DiGraph:
    """A DiGraph over the nodes of ``graph``: an edge a -> b when b reads a, plus an edge w -> b when an in-place
    op w writes into a tensor that b reads later (a KV-cache update and the attention that reads the cache)."""
    g = nx.DiGraph()
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in graph.nodes:
        g.add_node(n)
        for a in n.all_input_nodes:
            g.add_edge(a, n)
    for w in graph.nodes:
        m = mutated_arg(w)
        if m is None:
            continue
        for u in m.users:
            if u is not w and order[u] > order[w]:
                g.add_edge(w, u)
    return g


def upstream_until(
    g: nx.DiGraph, start: Iterable[fx.Node], stop: Callable[[fx.Node], bool]
) -> tuple[set[fx.Node], set[fx.Node]]:
    """Walk the data flow backwards from ``start``; return (nodes where ``stop`` held, all nodes visited).

    The walk does not go past a stop node: it finds the *nearest* producers of a kind (e.g. the nearest linears).
    """
    return _walk(start, stop, g.predecessors)


def downstream_until(
    g: nx.DiGraph, start: Iterable[fx.Node], stop: Callable[[fx.Node], bool]
) -> tuple[set[fx.Node], set[fx.Node]]:
    """Like ``upstream_until``, forwards."""
    return _walk(start, stop, g.successors)


def _walk(start: Iterable[fx.Node], stop: Callable[[fx.Node], bool],
          step: Callable[[fx.Node], Iterable[fx.Node]]) -> tuple[set[fx.Node], set[fx.Node]]:
    found, seen = set(), set()
    todo = list(start)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if stop(n):
            found.add(n)
            continue
        todo.extend(step(n))
    return found, seen


def read_between(first: fx.Node, last: fx.Node, values: set, skip: Iterable[fx.Node] = ()) -> bool:
    """Whether a node after ``first`` and before ``last`` in graph order (``skip`` aside) takes one of ``values`` as an
    input: a fold that joins the two must not move such a read (a cache written by ``first``, say) across them."""
    skip = set(skip)
    n = first.next
    while n is not last and n.op != "root":
        if n not in skip and values & set(n.all_input_nodes):
            return True
        n = n.next
    return False


def other_operand(n: fx.Node, one) -> Optional[object]:
    """The operand of a binary node ``n`` that is not ``one`` (None unless ``n`` has exactly two, one of them ``one``)."""
    if len(n.args) != 2 or n.kwargs or one not in n.args or n.args[0] is n.args[1]:
        return None
    return n.args[1] if n.args[0] is one else n.args[0]


def only_user(n: fx.Node) -> Optional[fx.Node]:
    """The single node that reads ``n``, or None when none or several do (a fusion may then erase ``n``)."""
    return next(iter(n.users)) if len(n.users) == 1 else None


def fake_value(n: fx.Node) -> Any:
    """The fake tensor a node carries: Dynamo graphs keep it in ``example_value``, AOT graphs in ``val``."""
    return n.meta.get("val", n.meta.get("example_value"))


def storage_of(n: fx.Node) -> Any:
    """A weak reference to the storage of ``n``'s fake tensor (equal for every node that aliases it), or None."""
    v = fake_value(n)
    if not isinstance(v, torch.Tensor):
        return None
    try:
        return StorageWeakRef(v.untyped_storage())
    except (NotImplementedError, RuntimeError):  # tensors without a storage (sparse, some subclasses)
        return None


def carry_fake_value(dst: fx.Node, src: fx.Node) -> None:
    """``dst`` computes a value of ``src``'s shape and dtype: give it ``src``'s fake tensor (Dynamo's
    ``example_value``, AOT's ``val``, ``tensor_meta``), and nothing else of ``src``'s meta."""
    dst.meta.update({k: v for k, v in src.meta.items() if k in ("val", "example_value", "tensor_meta")})


def static_shape(n: object) -> Optional[tuple[int, ...]]:
    """The shape of a node's fake tensor when every dimension is a plain int (None: no tensor, or symbolic)."""
    v = fake_value(n) if isinstance(n, fx.Node) else None
    if not isinstance(v, torch.Tensor) or not all(isinstance(s, int) for s in v.shape):
        return None
    return tuple(v.shape)
