"""Knowledge distillation: losses, teacher loading, feature pairing and the forward hooks.

- :mod:`~lit_eff.distill.losses`: the soft-target KD loss (Hinton et al. 2015), the feature hint
  loss (FitNets) and its learned projection.
- :mod:`~lit_eff.distill.teacher`: a frozen teacher network from a checkpoint file.
- :mod:`~lit_eff.distill.layers`: feature layer pairs from name patterns, output widths.
- :mod:`~lit_eff.distill.distiller`: :class:`Distiller`, which adds the distillation gradient
  to a student's backward from a forward hook.

The Lightning callback is :class:`lit_eff.callbacks.KnowledgeDistillation`.
"""

from lit_eff.distill.distiller import Distiller
from lit_eff.distill.layers import PROJECTIONS, match_layers, output_width, pair_layers
from lit_eff.distill.losses import Projection, feature_loss, kd_loss
from lit_eff.distill.teacher import STUDENT, build_teacher, load_teacher_weights, network_of, read_teacher

__all__ = ["PROJECTIONS", "STUDENT", "Distiller", "Projection", "build_teacher", "feature_loss", "kd_loss",
           "load_teacher_weights", "match_layers", "network_of", "output_width", "pair_layers", "read_teacher"]
