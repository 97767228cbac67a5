from engines.SegTrainer import SegTrainer, TrainStep

__all__ = ["SegTrainer", "TrainStep"]
