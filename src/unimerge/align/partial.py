"""Partial zipping: ZipIt! up to a cut, then one head per original model (a multi-head model).

Stoica et al., *ZipIt! Merging Models from Different Tasks without Training* (ICLR 2024,
https://arxiv.org/abs/2305.03053), Sec. 4.2 ("Partial Zip") and the official ``stop_at`` of
``ModelMerge`` (github.com/gstoica27/ZipIt, ``model_merger.py``): the layers up to the cut are zipped
as :func:`unimerge.align.zipit.zip_models` zips them; after the cut, each model keeps its own
remaining layers and reads the merged features through its slice ``U_m`` of the cut group's unmerge
matrix (the official code folds ``U_m`` into the next layer's weight; here it is applied to the
features, which is the same for a dense next layer and also holds when an activation comes first,
since ``U_m`` only copies features). The result returns one output per model.

The cut must split the traced graph in two: the output of ``stop_at`` must carry a zipped
permutation group and be the only tensor that flows from the layers up to it to the layers after
it (sequential MLPs and CNNs, or a cut between residual blocks).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

from torch import Tensor, fx, nn

from unimerge.align.derive import trace_groups
from unimerge.align.spec import Axis, PermutationSpec
from unimerge.align.trace import Feat, trace_graph
from unimerge.align.zipit import apply_zip, reading_axes, zip_state, zipped_groups
from unimerge.errors import AlignError

__all__ = ["PartialZip", "partial_zip"]


class PartialZip(nn.Module):
    """A zipped trunk and one head per original model.

    ``forward(*inputs)`` runs the trunk once and returns a tuple with one output per model: head
    ``m`` applied to ``U_m`` times the trunk's merged features (``U_m``: rows ``m*C .. (m+1)*C`` of
    the cut group's unmerge matrix, on channel axis ``axis.axis`` with ``axis.block`` entries per
    unit).
    """

    unmerge: Tensor

    def __init__(self, trunk: nn.Module, heads: Sequence[nn.Module], unmerge: Tensor, axis: Axis) -> None:
        super().__init__()
        self.trunk, self.heads, self.axis = trunk, nn.ModuleList(heads), axis
        self.register_buffer("unmerge", unmerge)  # (N * C, C)

    def unzip(self, features: Tensor, model: int) -> Tensor:
        """Model ``model``'s own features at the cut, read back from the merged ``features``."""
        c = self.unmerge.shape[1]
        return apply_zip(features, self.axis, self.unmerge[model * c : (model + 1) * c])

    def forward(self, *inputs: object) -> tuple[Tensor, ...]:
        h = self.trunk(*inputs)
        return tuple(head(self.unzip(h, m)) for m, head in enumerate(self.heads))


def _cut_node(graph: fx.Graph, stop_at: str) -> fx.Node:
    hits: list[fx.Node] = [n for n in graph.nodes if n.op != "output" and stop_at in (n.target, n.name)]
    if len(hits) != 1:
        named = [str(n.target) for n in graph.nodes if n.op == "call_module"]
        raise AlignError(
            f"Partial zipping: stop_at={stop_at!r} names {len(hits)} nodes of the traced model; pass the "
            f"name of a submodule called once, one of {named}."
        )
    return hits[0]


def _trunk_graph(graph: fx.Graph, cut: fx.Node) -> fx.Graph:
    """The nodes up to ``cut``, returning its output."""
    out, env = fx.Graph(), dict[fx.Node, fx.Node]()
    for node in graph.nodes:
        env[node] = out.node_copy(node, lambda n: env[n])
        if node is cut:
            break
    out.output(env[cut])
    return out


def _tail_graph(graph: fx.Graph, cut: fx.Node, stop_at: str) -> fx.Graph:
    """The nodes after ``cut``, reading its output as their only input."""
    out, nodes = fx.Graph(), list(graph.nodes)
    env = {cut: out.placeholder("features")}
    for node in nodes[nodes.index(cut) + 1 :]:
        for arg in node.all_input_nodes:
            if arg not in env and arg.op == "get_attr":
                env[arg] = out.node_copy(arg)
            elif arg not in env:
                raise AlignError(
                    f"Partial zipping: after stop_at={stop_at!r}, node {node.name!r} also reads {arg.name!r} "
                    "from before the cut. The cut's output must be the only tensor passing from the zipped "
                    "layers to the rest: cut a sequential MLP or CNN (nn.Sequential, or a chain of layers) "
                    "after a hidden layer or its activation, or a ResNet between blocks."
                )
        env[node] = out.node_copy(node, lambda n: env[n])
    return out


def _cut_group(
    model: nn.Module, example: tuple[object, ...], graph: fx.Graph, cut: fx.Node, zipped: set[str]
) -> tuple[str, Axis]:
    """The zipped group carried by the cut's output and its channel axis (as an activation Axis)."""
    tg, groups = trace_groups(model, example), dict[str, str | None]()
    names = tg.names()
    for node in graph.nodes:
        f = tg.feats.get(node.name)
        groups[node.name] = (
            names.get(tg.find(f.group)) if isinstance(f, Feat) and f.group is not None else None
        )
    feat, group = tg.feats.get(cut.name), groups[cut.name]
    if group is None or group not in zipped or not isinstance(feat, Feat):
        ok = [str(n.target) for n in graph.nodes if n.op == "call_module" and groups[n.name] in zipped]
        raise AlignError(
            f"Partial zipping: the output of stop_at={cut.target!r} carries no zipped permutation group (it "
            "is the model's input, a unit set kept in place, or reaches the output), so there is nothing "
            f"to unmerge there. Cut after a hidden layer instead: one of {ok}."
        )
    return group, Axis("", feat.axis, block=feat.block)


def partial_zip(
    models: Sequence[nn.Module],
    data: Iterable[object],
    stop_at: str,
    spec: PermutationSpec | None = None,
    *,
    example_inputs: Sequence[object] | None = None,
    alpha: float = 0.0,
    beta: float = 1.0,
    seed: int = 0,
) -> PartialZip:
    """``models`` zipped up to the output of submodule ``stop_at``, one head per model after it.

    Args:
        models: ``N >= 2`` models of one architecture, as for :func:`~unimerge.align.zipit.zip_models`.
        data: batches of model inputs on which the features are correlated.
        stop_at: the name of the submodule (``"2"`` in an ``nn.Sequential``, ``"layers.3"``) or traced
            node after which the models separate; its output must carry a permutation group.
        spec, example_inputs, alpha, beta, seed: as for :func:`~unimerge.align.zipit.zip_models`.

    Returns:
        A :class:`PartialZip` whose forward returns a tuple with one output per model.

    Raises:
        AlignError: ``stop_at`` names no single node, its output carries no zipped group, or the graph
            does not split at it (something after the cut reads a tensor from before it).
        ConfigError: as :func:`~unimerge.align.zipit.zip_models`.
    """
    found = zipped_groups(
        models, data, spec, example_inputs=example_inputs, alpha=alpha, beta=beta, seed=seed
    )
    zipped = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    zipped.load_state_dict(zip_state(found.spec, states, found.zips, reading_axes(models[0], found.spec)))
    graph = trace_graph(zipped, found.example).graph
    cut = _cut_node(graph, stop_at)
    group, axis = _cut_group(models[0], found.example, graph, cut, set(found.zips))
    trunk = fx.GraphModule(zipped, _trunk_graph(graph, cut))
    heads = [fx.GraphModule(copy.deepcopy(m), _tail_graph(graph, cut, stop_at)) for m in models]
    return PartialZip(trunk, heads, found.zips[group].unmerge.float(), axis)
