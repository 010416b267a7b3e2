"""Training examples: the samplers that cut and degrade examples from CT volumes, for the trainers (train/) and for
``--adapt`` (the fine-tuning on the input itself, infer/).

Every sampler is an :class:`~thinslice.examples.base.ExampleSampler`: an endless iterator of batches with one
checkpointed numpy generator. The package's rule: examples import io/, degrade/, models/, presets, errors and
device, never infer/, train/, cli/, evaluate/ or checkpoints/ (training examples need no pipeline; examples know no
trainer); ``tests/train/test_examples.py`` checks it.
"""

from thinslice.examples.base import ExampleSampler
from thinslice.examples.pairs import PairSampler
from thinslice.examples.patches import PatchSampler
from thinslice.examples.planes import PlaneSampler
from thinslice.examples.prior_pairs import CropBatches, PriorPairSampler

__all__ = ["CropBatches", "ExampleSampler", "PairSampler", "PatchSampler", "PlaneSampler", "PriorPairSampler"]
