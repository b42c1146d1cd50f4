"""lit_eff: training-efficiency techniques as Lightning callbacks, with FLOPs accounting."""

from lit_eff import distill, flops, schedules, seeding, sparsity, supernet, tokens
from lit_eff.callbacks import DynamicSparsity, FlopsBudget, FlopsMonitor, MagnitudePruning, NMSparsity, StaticSparsity
from lit_eff.callbacks import TokenDrop, TokenMerge, TokenSkip
from lit_eff.callbacks import KnowledgeDistillation
from lit_eff.datamodules import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    SyntheticImageDataModule,
    TextDataModule,
)
from lit_eff.models import GPT, CausalLM, ImageClassifier
from lit_eff.supernet import SupernetModule

__version__ = "0.1.0"

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CausalLM",
    "DigitsDataModule",
    "DynamicSparsity",
    "FlopsBudget",
    "FlopsMonitor",
    "GPT",
    "ImageClassifier",
    "ImageFolderDataModule",
    "KnowledgeDistillation",
    "MagnitudePruning",
    "NMSparsity",
    "StaticSparsity",
    "SupernetModule",
    "SyntheticImageDataModule",
    "TextDataModule",
    "TokenDrop",
    "TokenMerge",
    "TokenSkip",
    "distill",
    "flops",
    "schedules",
    "seeding",
    "sparsity",
    "supernet",
    "tokens",
]
