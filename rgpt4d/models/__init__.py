"""rgpt4d models: the 4D-RGPT stack's modules (regional encoder; teacher, student, P4D heads to come)."""

from rgpt4d.models.regional_encoder import RegionalEncoder4D, RegionalEncoderConfig

__all__ = ["RegionalEncoder4D", "RegionalEncoderConfig"]
