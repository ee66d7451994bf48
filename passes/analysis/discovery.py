"""Discovery (an analysis): find each decoder block in a captured graph and label its linears by structure.

Used by the ``label_block_linears`` pass, by calibration and by ``find_linears``, so all three see the same keys
and roles. What ``discover`` guarantees:
* The graph's nodes are not changed; each matched linear node gets ``node.meta["teal"] = MatchedLinear``.
* Roles come from data flow alone:
  - an *attention site* is an SDPA call, or an eager ``matmul -> softmax -> matmul``; its query, key and value
    operands are traced back (through RoPE, q/k norms, GQA repeats, and KV-cache writes) to the nearest linears:
    those are q, k, v; one linear feeding all three is a fused ``qkv``;
  - the nearest linear downstream of the attention output is ``o``;
  - a linear whose input traces back to exactly two linears sharing one input, one through an activation, is
    ``down`` of a gated MLP whose other two are ``gate`` (the activated one) and ``up``; one linear reaching the
    down linear through a product of two parts of its output, one activated, is a fused ``gate_up``; a plain
    ``linear -> activation -> linear`` MLP is ``up``/``down`` (whatever products its activation is written with).
* Blocks are numbered by the order of their attention sites; an MLP joins the block of the latest attention
  feeding it, or, in a parallel block (GPT-J, Phi, Cohere: one norm; GPT-NeoX: a norm each), of the attention that
  reads the same residual stream (the same linears upstream).
* Anything else — lm_head, embeddings, linears in shapes it does not recognise — is never matched, and is reported.
* Module names are a cross-check only: when every key carries a layer number that differs from the structural
  index by one constant (a graph that starts mid-model after a graph break), the layer numbers are used.
* Keys are the weights' qualified names. Given ``names`` (``weight_names``: the placeholders whose example input is a
  known parameter, by identity), a key is the parameter's own name; otherwise it is read from Dynamo's source path,
  which is relative to the traced frame: after a graph break before the layer loop (OPT, BioGPT and XGLM with a
  static cache) that frame is a layer, not the model.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import networkx as nx
import torch
from torch import fx

from teal_fx.kernels.quantize import logical_shape
from teal_fx.passes.analysis.dataflow import (
    dataflow_graph,
    downstream_until,
    fake_value,
    is_activation,
    is_linear,
    is_matmul,
    is_mul,
    is_sdpa,
    is_softmax,
    linear_args,
    matmul_operands,
    mutated_arg,
    transposed_input,
    upstream_until,
)

_NORM_HINTS = {"rsqrt", "mean", "var", "layer_norm", "rms_norm", "std"}


@dataclass
class MatchedLinear:
    node: fx.Node
    key: str
    block: int
    role: str
    shape: tuple[int, int]


@dataclass
class AttentionSite:
    node: fx.Node  # the op whose output is the attention output (SDPA, or the eager attn @ v)
    query: list[fx.Node]
    key: list[fx.Node]
    value: list[fx.Node]
    kind: str  # "sdpa" | "eager"


@dataclass
class Discovery:
    """What ``discover`` found in one graph."""

    matched: list[MatchedLinear] = field(default_factory=list)
    unmatched: list[tuple[str, str]] = field(default_factory=list)  # (key, why)
    num_attention_sites: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # worth a log line, not a warning

    @property
    def num_blocks(self) -> int:
        return len({m.block for m in self.matched})

    def roles_by_block(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for m in self.matched:
            out.setdefault(m.block, []).append(m.role)
        return out

    def summary(self) -> str:
        lines = []
        if not self.matched:
            lines.append(
                f"teal: no decoder block recognised ({self.num_attention_sites} attention op(s) seen); "
                "the model runs dense."
            )
        else:
            patterns: dict[str, list[int]] = {}
            for b, roles in sorted(self.roles_by_block().items()):
                patterns.setdefault(",".join(roles), []).append(b)
            desc = "; ".join(f"blocks {_ranges(bs)}: {p}" for p, bs in patterns.items())
            lines.append(f"teal: matched {len(self.matched)} linears in {self.num_blocks} blocks ({desc})")
        if self.unmatched:
            lines.append(
                "teal: left dense: " + ", ".join(f"{k} ({why})" for k, why in self.unmatched[:12])
                + (f", ... {len(self.unmatched) - 12} more" if len(self.unmatched) > 12 else "")
            )
        for p in self.problems:
            lines.append(f"teal: {p}")
        return "\n".join(lines)


def _ranges(xs: list[int]) -> str:
    xs = sorted(xs)
    out, start = [], xs[0]
    for a, b in zip(xs, xs[1:] + [None]):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)


# --------------------------------------------------------------------------------------------- keys
_MODULE_PATH_RE = re.compile(r"\._modules\[['\"]([^'\"]+)['\"]\]|\[['\"]([^'\"]+)['\"]\]")


def _clean_path(path: str) -> str:
    """Turn a Dynamo source path (``L['self'].model.layers.0.q_proj``, ``L['self']._modules['model']...``, or
    ``L['args'][0].model...`` when a decorator's ``*args`` wrapper is the traced frame, as transformers >= 5.2x's
    ``deprecate_kwarg`` on ``forward`` is) into the module's qualified name relative to the compiled root
    (``model.layers.0.q_proj``)."""
    path = re.sub(r"^L\[['\"][^'\"]+['\"]\](?:\[\d+\])*", "", path)
    path = _MODULE_PATH_RE.sub(lambda m: "." + (m.group(1) or m.group(2)), path)
    return path.strip(".").replace("..", ".")


def _placeholder_path(name: str) -> Optional[str]:
    """Parse Dynamo's placeholder name for a parameter (``l_self_modules_a_modules_0_parameters_weight_``,
    ``l_args_0_modules_a_...``)."""
    m = re.match(r"^l_[a-z0-9]+_(?:\d+_)*(.*)_$", name)  # l_self_..., l_args_0_... (see _clean_path)
    if not m or "_parameters_" not in m.group(1):
        return None
    body = m.group(1)
    body = re.sub(r"^modules_", "", body)
    parts = re.split(r"_modules_|_parameters_", body)
    return ".".join(parts)


WeightNames = Mapping[fx.Node, str]


def weight_names(graph: fx.Graph, example_inputs: Sequence, name_of: Callable[[Any], Optional[str]]) -> dict[fx.Node, str]:
    """The placeholders of ``graph`` whose example input ``name_of`` names (a parameter, by identity) -> that name."""
    names = {}
    for ph, value in zip((n for n in graph.nodes if n.op == "placeholder"), example_inputs):
        name = name_of(value) if isinstance(value, torch.Tensor) else None
        if name is not None:
            names[ph] = name
    return names


def parameter_names(model: torch.nn.Module) -> Callable[[Any], Optional[str]]:
    """``name_of`` for ``weight_names``: a parameter of ``model`` (as it is now) -> its qualified name."""
    by_id = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    return lambda t: by_id.get(id(t))


def linear_key(n: fx.Node, names: Optional[WeightNames] = None) -> str:
    """The stable key of a linear: its weight's qualified name, from ``names``, the module stack or the weight node."""
    w = weight_param(linear_args(n)[1])
    if names and w in names:
        return names[w]
    if isinstance(w, fx.Node) and w.op == "get_attr":
        return str(w.target)
    stack = n.meta.get("nn_module_stack") or {}
    if stack:
        path, cls = list(stack.values())[-1]
        if isinstance(cls, type) and issubclass(cls, torch.nn.Linear) or "Linear" in str(cls):
            return _clean_path(path) + ".weight"
    if isinstance(w, fx.Node) and w.op == "placeholder":
        parsed = _placeholder_path(w.name)
        if parsed:
            return parsed
        return w.name
    return n.name


def unsharded(w: object) -> object:
    """The node of the whole parameter behind a tensor-parallel rank's local weight (``w.to_local()`` of a DTensor,
    as transformers' TP styles hand a linear its shard): plans are keyed and shaped on the unsharded parameter, so
    one plan serves any world size."""
    if isinstance(w, fx.Node) and w.args and (
            w.op == "call_method" and w.target == "to_local"
            # torch 2.13 may write a function ``to_local``; torch 2.11's Dynamo writes a function whose __name__ is
            # ``prim_to_local`` and __qualname__ ``TensorVariable.method_to_local.<locals>.to_local_fn_with_prim_types``
            or w.op == "call_function" and any("to_local" in getattr(w.target, a, "") for a in ("__name__",
                                                                                                "__qualname__"))):
        return w.args[0]
    return w


def weight_param(w: object) -> object:
    """The node of the parameter behind a linear's weight operand: through a tensor-parallel rank's ``to_local``
    (``unsharded``) and a transpose of a weight stored [in, out] (GPT-2's ``Conv1D``, as ``rewrite_matmul_as_linear``
    writes it)."""
    w = unsharded(w)
    return transposed_input(w) or w


def is_tensor_parallel(graph: fx.Graph) -> bool:
    """A tensor-parallel rank's graph: one with all-reduces (after its row-sharded linears)."""
    return any(n.op == "call_function" and "all_reduce" in str(n.target) for n in graph.nodes)


def _weight_shape(n: fx.Node) -> tuple[int, int]:
    _, w, _ = linear_args(n)
    w = unsharded(w)
    v = fake_value(w) if isinstance(w, fx.Node) else None
    if v is None:
        out = fake_value(n)
        inp = fake_value(linear_args(n)[0])
        return (int(out.shape[-1]), int(inp.shape[-1]))
    N, K = logical_shape(v)  # a packed int4 weight holds two outputs a row
    return (int(N), int(K))


def _layer_number(key: str) -> Optional[int]:
    m = re.search(r"\.(\d+)\.", "." + key)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------------------------- attention
def _arg_sources(g: nx.DiGraph, arg, site: fx.Node) -> list[fx.Node]:
    """The operand plus any in-place write into it that happens before ``site`` (a KV-cache update)."""
    if not isinstance(arg, fx.Node):
        return []
    return [arg] + [w for w in g.predecessors(site) if mutated_arg(w) is arg]


def find_attention_sites(graph: fx.Graph, g: nx.DiGraph) -> list[AttentionSite]:
    sites = []
    for n in graph.nodes:
        if is_sdpa(n):
            args = list(n.args) + [n.kwargs.get(k) for k in ("query", "key", "value")][len(n.args) :]
            q, k, v = args[0], args[1], args[2]
            sites.append(AttentionSite(n, _arg_sources(g, q, n), _arg_sources(g, k, n), _arg_sources(g, v, n), "sdpa"))
        elif is_softmax(n):
            scores, _ = upstream_until(g, [n], lambda m: is_matmul(m) or is_linear(m))
            outs, _ = downstream_until(g, [n], lambda m: is_matmul(m) or is_linear(m))
            scores = [m for m in scores if is_matmul(m)]
            outs = [m for m in outs if is_matmul(m)]
            if len(scores) != 1 or len(outs) != 1:
                continue
            s, o = scores[0], outs[0]
            qk, pv = matmul_operands(s), matmul_operands(o)
            if qk is None or pv is None:
                continue
            sites.append(AttentionSite(o, _arg_sources(g, qk[0], s), _arg_sources(g, qk[1], s), _arg_sources(g, pv[1], o),
                                       "eager"))
    order = {n: i for i, n in enumerate(graph.nodes)}
    return sorted(sites, key=lambda s: order[s.node])


def _nearest_linears_up(g: nx.DiGraph, start: list[fx.Node]) -> set[fx.Node]:
    found, _ = upstream_until(g, start, lambda m: is_linear(m) or m.op == "placeholder")
    return {m for m in found if is_linear(m)}


# --------------------------------------------------------------------------------------------- MLP
def _path_between(g: nx.DiGraph, a: fx.Node, b: fx.Node) -> set[fx.Node]:
    """Nodes strictly between ``a`` and ``b`` on data-flow paths that cross no other linear."""
    _, fwd = downstream_until(g, [a], lambda m: m is b or (is_linear(m) and m is not a))
    _, bwd = upstream_until(g, [b], lambda m: m is a or (is_linear(m) and m is not b))
    return (fwd & bwd) - {a, b}


def _looks_like_norm(nodes: set[fx.Node]) -> bool:
    for n in nodes:
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        if str(name) in _NORM_HINTS:
            return True
    return False


def _reads_same_stream(g: nx.DiGraph, x: fx.Node, q_input: Optional[fx.Node]) -> bool:
    """True when an MLP reading ``x`` runs in parallel with the attention whose q projection reads ``q_input``: both
    read the same residual stream, through one norm (GPT-J, Phi) or one each (GPT-NeoX), so the same linears lie
    upstream of both. In a sequential block the attention that follows reads the MLP's own output as well."""
    if q_input is None:
        return False
    if q_input is x:
        return True
    return {n for n in nx.ancestors(g, x) if is_linear(n)} == {n for n in nx.ancestors(g, q_input) if is_linear(n)}


def _halves_multiplied(g: nx.DiGraph, u: fx.Node, path: set[fx.Node]) -> bool:
    """True for a fused gate/up projection: a product in ``path`` whose two operands come from two different parts
    of ``u``'s output (chunk / split / slices), ``up * act(gate)``. A plain activation written with products of its
    own input (``0.5 * x * (1 + tanh(...))``) takes no part of ``u`` apart and is not one."""
    parts = {m for m in path if m.op == "call_function" and m.target is operator.getitem
             and isinstance(m.args[0], fx.Node) and (m.args[0] is u or m.args[0] in path and m.args[0].args
                                                       and m.args[0].args[0] is u)}
    for m in path:
        if not is_mul(m):
            continue
        ops = [a for a in m.args if isinstance(a, fx.Node) and (a in path or a is u)]
        if len(ops) != 2:
            continue
        seen = [parts & (nx.ancestors(g, a) | {a}) for a in ops]
        if seen[0] and seen[1] and not seen[0] & seen[1]:
            return True
    return False


def _match_mlp(g: nx.DiGraph, d: fx.Node, free: set[fx.Node]):
    """Return [(node, role)] for an MLP ending in linear ``d``, or None."""
    src = _nearest_linears_up(g, [linear_args(d)[0]])
    if not src <= free:
        return None
    if len(src) == 2:
        a, b = sorted(src, key=lambda n: n.name)
        if linear_args(a)[0] is not linear_args(b)[0]:
            return None
        pa, pb = _path_between(g, a, d), _path_between(g, b, d)
        if _looks_like_norm(pa | pb):
            return None
        act_a, act_b = any(map(is_activation, pa)), any(map(is_activation, pb))
        if act_a == act_b:
            return None
        gate, up = (a, b) if act_a else (b, a)
        return [(gate, "gate"), (up, "up"), (d, "down")]
    if len(src) == 1:
        (u,) = src
        path = _path_between(g, u, d)
        if _looks_like_norm(path) or not any(map(is_activation, path)):
            return None
        return [(u, "gate_up"), (d, "down")] if _halves_multiplied(g, u, path) else [(u, "up"), (d, "down")]
    return None


# --------------------------------------------------------------------------------------------- the pass
def discover(graph: fx.Graph, names: Optional[WeightNames] = None) -> Discovery:
    """Label every block linear of ``graph`` by structure (see the module docstring); ``names``: ``weight_names``."""
    g = dataflow_graph(graph)
    order = {n: i for i, n in enumerate(graph.nodes)}
    linears = [n for n in graph.nodes if is_linear(n)]
    sites = find_attention_sites(graph, g)
    result = Discovery(num_attention_sites=len(sites))
    label: dict[fx.Node, tuple[int, str]] = {}

    for i, site in enumerate(sites):
        q, k, v = (_nearest_linears_up(g, s) for s in (site.query, site.key, site.value))
        if len(q) == len(k) == len(v) == 1:
            if q == k == v:
                label[next(iter(q))] = (i, "qkv")
            elif len(q | k | v) == 3:
                for s, role in ((q, "q"), (k, "k"), (v, "v")):
                    label[next(iter(s))] = (i, role)
            else:
                result.problems.append(f"attention {i}: q/k/v share linears in a way not understood")
                continue
        else:
            result.problems.append(
                f"attention {i} ({site.kind}): expected one linear behind each of q/k/v, found "
                f"{len(q)}/{len(k)}/{len(v)}"
            )
            continue
        outs, _ = downstream_until(g, [site.node], is_linear)
        outs = {n for n in outs if is_linear(n)}
        if len(outs) == 1 and next(iter(outs)) not in label:
            label[next(iter(outs))] = (i, "o")
        else:
            result.problems.append(f"attention {i}: no single output projection after the attention")

    site_nodes = [s.node for s in sites]
    q_inputs = {}
    for n, (i, role) in label.items():
        if role in ("q", "qkv"):
            q_inputs[i] = linear_args(n)[0]
    free = {n for n in linears if n not in label}
    for d in sorted(free, key=order.get):
        if d not in free:
            continue
        mlp = _match_mlp(g, d, free - {d})
        if mlp is None:
            continue
        x = linear_args(mlp[0][0])[0]
        anc = nx.ancestors(g, x) | {x}
        j = max((i for i, s in enumerate(site_nodes) if s in anc), default=-1)
        block = j + 1 if _reads_same_stream(g, x, q_inputs.get(j + 1)) else j
        if block < 0:
            continue
        for n, role in mlp:
            label[n] = (block, role)
            free.discard(n)

    # structural index -> key layer numbers, when they agree up to one offset (graph breaks mid-model)
    keys = {n: linear_key(n, names) for n in linears}
    offsets = {(_layer_number(keys[n]) - b) if _layer_number(keys[n]) is not None else None for n, (b, _) in label.items()}
    offset = next(iter(offsets)) if len(offsets) == 1 and None not in offsets else 0
    if len(offsets) > 1 and label:
        result.notes.append("block numbers from structure and module names disagree; using structure")

    for n in linears:
        if n in label:
            b, role = label[n]
            m = MatchedLinear(n, keys[n], b + offset, role, _weight_shape(n))
            n.meta["teal"] = m
            result.matched.append(m)
        else:
            why = "output projection, kept dense" if _feeds_output_directly(n) else "not in a recognised block"
            result.unmatched.append((keys[n], why))
    _check_blocks(result)
    return result


def _feeds_output_directly(n: fx.Node) -> bool:
    """True for the output projection (lm_head): its value reaches the graph output without another linear."""
    todo, seen = [n], set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        if m.op == "output":
            return True
        todo.extend(u for u in m.users if not is_linear(u))
    return False


def _check_blocks(result: Discovery) -> None:
    for b, roles in result.roles_by_block().items():
        rs = set(roles)
        attn_ok = {"q", "k", "v", "o"} <= rs or {"qkv", "o"} <= rs
        mlp_ok = {"gate", "up", "down"} <= rs or {"gate_up", "down"} <= rs or {"up", "down"} <= rs
        if attn_ok and not rs - {"q", "k", "v", "qkv", "o"}:
            result.problems.append(f"block {b}: attention matched, its MLP not (a mixture of experts, or a shape not "
                                   "recognised): the MLP stays dense")
        elif not (attn_ok and mlp_ok):
            result.problems.append(f"block {b}: partial match ({','.join(roles)})")
