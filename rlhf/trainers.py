"""Where the DPO settings lived before rlhf/dpo_trainer.py: run directories saved then name
`_target_: rlhf.trainers.KLDPOConfig` in their .hydra/config.yaml, and re-running one (docs/
reliability.md, "Reproducing a run") must still build it. Nothing else imports this module.
"""

from rlhf.dpo_trainer import KLDPOConfig

__all__ = ["KLDPOConfig"]
