"""The LRP engine, one module per phase of the data flow:

1. capture (``capture``): one eager forward under a function mode and module hooks; what it learns about a
   tensor is one record (``records``);
2. the op registry (``ops``, with the name tables of ``optable`` and the sign analysis of ``signs``): one entry
   per op says how it carries relevance and puts the autograd functions of ``functions`` in place;
3. rules (``lrp.rules``): one small class per layer rule, on the linear ops of ``layers``;
4. propagate (``propagate``): rule choice once the forward is over, then the backward.

``targets`` says what is explained and ``session`` runs the model without changing it. Apps use the names
exported here.
"""

from .session import frozen, model_lock
from .targets import TargetSpec, class_targets, model_output

__all__ = ["frozen", "model_lock", "model_output", "class_targets", "TargetSpec"]
