"""Knowledge distillation: a student learns from a teacher's distributions, generations or rationales."""

from llmlab.distill.student import StudentConfig, check_tokenizers, drop_layers, fresh_student, make_student
from llmlab.train.losses import forward_kl, generalized_jsd, reverse_kl

__all__ = ["StudentConfig", "check_tokenizers", "drop_layers", "forward_kl", "fresh_student", "generalized_jsd",
           "make_student", "reverse_kl"]
