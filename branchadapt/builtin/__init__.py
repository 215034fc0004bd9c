"""Generic implementations shipped with the core: splitters, samplers, and a small supervised
example (MLP backbone, synthetic grouped data, cross-entropy) that exercises the whole engine.
"""

from __future__ import annotations

from ..hookspecs import Register, hookimpl
from .example import ClusterData, CrossEntropy, MLPBackbone, SupervisedTask
from .samplers import MixedSampler, PerGroupSampler
from .splitters import DepthSplitter, SingleSplitter


@hookimpl
def register_splitters(register: Register) -> None:
    register(SingleSplitter, name="single")
    register(DepthSplitter, name="branches")


@hookimpl
def register_samplers(register: Register) -> None:
    register(PerGroupSampler, name="per_group")
    register(MixedSampler, name="mixed")


@hookimpl
def register_backbones(register: Register) -> None:
    register(MLPBackbone, name="mlp")


@hookimpl
def register_tasks(register: Register) -> None:
    register(SupervisedTask, name="supervised")


@hookimpl
def register_losses(register: Register) -> None:
    register(CrossEntropy, name="cross_entropy")


@hookimpl
def register_data(register: Register) -> None:
    register(ClusterData, name="clusters")
