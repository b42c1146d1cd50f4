"""Supernet training: elastic ViT/GPT, SupernetModule, subnet samplers, search and export."""

from lit_eff.supernet.elastic import ElasticGPT, ElasticViT
from lit_eff.supernet.export import PlainViT, export_subnet, load_subnet, save_subnet
from lit_eff.supernet.flops import SubnetFlops
from lit_eff.supernet.module import SupernetModule
from lit_eff.supernet.samplers import (ComplexityAware, DelayedShrinking, Draw, PerformanceAware, Sandwich,
                                       SubnetSampler, Uniform)
from lit_eff.supernet.space import SearchSpace, SubnetConfig

__all__ = ["ComplexityAware", "DelayedShrinking", "Draw", "ElasticGPT", "ElasticViT", "PerformanceAware",
           "PlainViT", "Sandwich", "SearchSpace", "SubnetConfig", "SubnetFlops", "SubnetSampler", "SupernetModule",
           "Uniform", "export_subnet", "load_subnet", "save_subnet"]
