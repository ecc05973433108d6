"""Old import path of the plugin interface (``from hierarchy.stage import Stage``), kept for
published plugins; new code imports from ``hierarchy``."""
from hierarchy.config.stage import PLUGIN_API_VERSION, Prediction, Predictor, Stage, StageConfig

__all__ = ["PLUGIN_API_VERSION", "Prediction", "Predictor", "Stage", "StageConfig"]
