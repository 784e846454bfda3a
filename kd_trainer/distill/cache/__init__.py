"""The teacher cache: the frozen teacher's embeddings of the training set, computed once.

- :mod:`.build`: one pass of the teacher over the train split's replayed draws;
- :mod:`.store`: the directory layout, writing it, and :class:`TeacherCache` (open, lookup);
- :mod:`.fingerprint`: was a cache built for this teacher, train split and transform?
- :mod:`.policy`: which terms may read it, and so where a stage's teacher embeddings come from.
"""

from kd_trainer.distill.cache.build import build_teacher_cache
from kd_trainer.distill.cache.fingerprint import dataset_fingerprint, teacher_fingerprint, transform_fingerprint
from kd_trainer.distill.cache.policy import CACHEABLE_EMBEDDINGS, TeacherSourcePlan, plan_teacher_source, term_uses_cache
from kd_trainer.distill.cache.store import CACHE_META, CacheDamagedError, CacheMismatchError, TeacherCache

__all__ = [
    "CACHEABLE_EMBEDDINGS",
    "CACHE_META",
    "CacheDamagedError",
    "CacheMismatchError",
    "TeacherCache",
    "TeacherSourcePlan",
    "build_teacher_cache",
    "dataset_fingerprint",
    "plan_teacher_source",
    "teacher_fingerprint",
    "term_uses_cache",
    "transform_fingerprint",
]
