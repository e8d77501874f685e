"""Canonical graph text and structural graph diffs.

Users of a compiler-pass library need to *see* what a pass changed and pin it in regression tests,
so that an upgrade of torch, a new rule or a refactor shows up as a readable diff. This module
turns a graph (FX ``GraphModule``, ``LoraModel``-like object, ``ExportedProgram``, ONNX
``ModelProto``, or a saved file) into a canonical text -- one line per node -- and diffs two such
texts node by node.

Why node ids are *local*: FX names such as ``linear_37`` come from global counters and shift when a
pass inserts a node earlier in the graph, which would turn one local change into a diff of the
whole graph. A canonical id is instead ``<module path>/<key>#<n>``: the node's module path, its
graphlora role (for nodes a pass inserted) or its op, and its occurrence index among nodes with the
same key *within that module path*. Placeholders keep their user-facing names, parameters and
buffers are named by their attribute path.

The text format (version 1), one node per line, in graph (topological) order::

    # graphlora graph_text v1 fx
    fc1/weight = get_attr fc1.weight :: param f32[16,8]
    x = placeholder :: f32[s0,8]
    fc1/linear#0 = call_function aten.linear.default(%x, %fc1/weight, %fc1/bias) :: f32[s0,16]  # role=base
    fc1/lora_A.weight = get_attr fc1.lora_A.weight :: param f32[4,8]
    fc1/lora_a#0 = call_function aten.linear.default(%x, %fc1/lora_A.weight) :: f32[s0,4]  # role=lora_a adapter=default
    output = output((%fc2/linear#0,))

``<id> = <op> <target>(<args>) :: <type>  # <graphlora metadata>``; ``%id`` refers to another
node; symbolic sizes are renumbered ``s0, s1, ...`` by first appearance (torch's own symbol numbers
depend on what was traced before); parameters, buffers and constants are shown by name, kind, dtype
and shape, never by value; ``call_module`` targets list the module's own tensors the same way.
Subgraphs of higher-order ops follow their ``get_attr`` line, indented, with ids
``<subgraph id>::<local id>``. ONNX models use the same grammar (``# graphlora graph_text v1 onnx``):
``<path>/<OpType>#<n> = <domain.>OpType[<attributes>](<inputs>) :: <output types>``, initializers as
``<path>/<name> = initializer <full name> :: <type>``, and initializers with exporter-generated
names (``val_12``) as ``<first consumer id>:in<k>``.

The same text is what :func:`diff` parses back, so the transform pipeline can keep one text per
pass and diff them later (``diff(before_text, after_text)``).
"""

from graphlora.diff._common import GRAPH_TEXT_SUFFIX, HEADER
from graphlora.diff.compare import GraphDiff, NodeChange, diff
from graphlora.diff.files import graph_text, read_graph_text, save_graph_text

__all__ = [
    "GRAPH_TEXT_SUFFIX",
    "HEADER",
    "GraphDiff",
    "NodeChange",
    "diff",
    "graph_text",
    "read_graph_text",
    "save_graph_text",
]
